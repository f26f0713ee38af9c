"""The ``syncbridge`` command line. Every subcommand has ``--help``.

Exit codes: 0 ok, 1 a check failed (audit broken, connector unreachable), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .anchors import check_anchors, read_anchors
from .cli_bulk import add_bulk_parser
from .config import PracticeConfig, load_config
from .errors import ConfigError, MalformedRecord, StoreError, SyncbridgeError
from .instance_lock import store_daemon_pid
from .model import CANCELLED_STATES, CancelKind, CancelledBy, iso
from .store import Store, database_errors, store_error

__all__ = ["main"]

DEFAULT_CONFIG = os.environ.get("SYNCBRIDGE_CONFIG", "/etc/syncbridge/config.yaml")


def _config(args: argparse.Namespace) -> PracticeConfig:
    return load_config(args.config)


def _store(cfg: PracticeConfig, *, create: bool = False) -> Store:
    """The configured store. Only the daemon (and `auth`, which may run before it) creates one: a
    command pointed at the wrong path must not answer from a new, empty store."""
    if cfg.store.url:
        # a PostgreSQL store: the daemon upgrades its schema, a command only uses it
        return cfg.store.open(migrate=False)
    path = Path(cfg.store.path)
    if not create and not path.exists():
        raise StoreError(
            f"there is no store at {path.resolve()}: the daemon creates it when it first starts; check store.path "
            f"(a relative path is taken from the directory the command runs in)"
        )
    # only the daemon changes a store's schema (under its lock); a new one is created here by `auth`
    return cfg.store.open(migrate=not path.exists())


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


# --- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import run_daemon

    return run_daemon(args.config, _config(args))


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, resolve_secrets=True)  # a secret that cannot be used fails the check, not the daemon later
    print(f"config ok: {len(cfg.clinicians)} clinicians, {len(cfg.connectors)} connectors, store {cfg.store.path}")
    if args.no_connect:
        return 0
    from .registry import build_connectors

    connectors = build_connectors(cfg)

    async def probe() -> list[tuple[str, str, str, str]]:
        rows = []
        for name, c in connectors.items():
            try:
                seen = await asyncio.wait_for(c.check(), timeout=args.timeout)
                rows.append((name, c.config.type, "ok", seen))
            except SyncbridgeError as err:
                rows.append((name, c.config.type, "FAILED", str(err)))
            except TimeoutError:
                rows.append((name, c.config.type, "FAILED", f"no answer within {args.timeout:.0f}s: check the URL and the firewall"))
            finally:
                await c.close()
        return rows

    rows = asyncio.run(probe())
    print(_table(rows, ("connector", "type", "result", "detail / fix")))
    return 0 if all(r[2] == "ok" for r in rows) else 1


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _store(cfg)
    if args.appointment:
        return _status_one(cfg, store, args.appointment)
    counts = store.outbox_counts()
    open_work = store.worklist()
    rows = []
    now = datetime.now(UTC)
    for name, conn in cfg.connectors.items():
        st = store.connector_state(name)
        age = ""
        if st["updated_at"]:
            age = f"{(now - datetime.fromisoformat(st['updated_at'].replace('Z', '+00:00'))).total_seconds():.0f}s"
        pending, dead = counts.get(name, (0, 0))
        work = sum(1 for w in open_work if w.connector == name)
        health = "ok" if st["healthy"] else f"UNHEALTHY: {st['note'] or ''}"
        if st["degraded"]:
            health = f"DEGRADED: {st['degraded']}" if st["healthy"] else f"{health}; degraded: {st['degraded']}"
        rows.append((name, conn.type, health, st["last_good_pull"] or "never", age, pending, dead, work))
    pid = store_daemon_pid(cfg.store)
    running = "not running: nothing is synced until it starts (`systemctl start syncbridge`)" if pid is None else (
        f"running (pid {pid})" if pid > 0 else "running"
    )
    print(f"daemon: {running}")
    print(_table(rows, ("connector", "type", "health", "last good pull", "cursor age", "outbox", "dead", "worklist")))
    return 0


def _status_one(cfg: PracticeConfig, store: Store, appointment_id: str) -> int:
    appt = store.appointment(appointment_id)
    if appt is None:
        print(f"no appointment {appointment_id}", file=sys.stderr)
        return 1
    f = appt.fields
    print(f"{appt.id}  v{appt.version}  {f['status']}  {appt.local_start:%a %Y-%m-%d %H:%M %Z}  clinician {f['clinician']}  billing {f['billing']}")
    if f.get("cancellation"):
        c = f["cancellation"]
        print(f"cancelled by {c['by']} ({c['kind']}, fee {c['fee']}) at {c['at']} via {c['via']}")
    from .receipts import holds_current, receipt
    from .registry import build_connectors

    connectors = build_connectors(cfg)
    done = receipt(store, connectors, appt)
    took = f" within {max(done.seconds, 0):.0f} s" if done.seconds is not None else ""
    print(f"version {appt.version} is in {done.done} of {done.total} systems{took}")
    rows = []
    for link, applied_at in store.links_for(appt.id):
        state = "current" if holds_current(link, appt, connectors.get(link.connector)) else "pending"
        rows.append((link.connector, link.external_id or "-", f"v{link.applied_version}", applied_at or "-", "gone" if link.gone else state))
    print(_table(rows, ("connector", "external id", "applied", "at", "copy")))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .policy.cancellation import decide
    from .registry import build_connectors

    cfg = _config(args)
    store = _store(cfg)
    now = datetime.now(UTC)
    if args.series:
        targets = [
            a for a in store.appointments()
            if a.fields.get("series_id") == args.appointment and a.start > now and a.fields["status"] not in CANCELLED_STATES
        ]
        if not targets:
            print(f"no future sessions of series {args.appointment} to cancel", file=sys.stderr)
            return 1
    else:
        appt = store.appointment(args.appointment)
        if appt is None:
            print(f"no appointment {args.appointment}", file=sys.stderr)
            return 1
        if appt.fields["status"] in CANCELLED_STATES:
            print(f"{appt.id} is already {appt.fields['status']}")
            return 0
        targets = [appt]
    tags = frozenset(t for t, on in (("waive", args.waive), ("crisis", args.crisis)) if on)
    engine = Engine(store, build_connectors(cfg), cfg)
    for appt in targets:
        status, record = decide(
            cfg.policy.cancellation, start=appt.start, now=now, via="cli", tags=tags, by=args.by, kind=args.kind, reason=args.reason,
        )
        version = engine.change(appt.id, dict(appt.fields) | {"status": status, "cancellation": record}, via="cli", kind="cancelled")
        print(f"{appt.id} {status} ({record['kind']}, fee {record['fee']}) as version {version}; the daemon applies it everywhere")
    return 0


def cmd_bulk(args: argparse.Namespace) -> int:
    from .cli_bulk import cmd_bulk as run_bulk
    from .engine import Engine
    from .registry import build_connectors

    cfg = _config(args)
    return run_bulk(args, cfg, Engine(_store(cfg), build_connectors(cfg), cfg))


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _store(cfg)
    if args.verify:
        result = store.verify_audit()
        if not result.ok:
            print(f"AUDIT BROKEN after {result.entries} good entries: {result.problem}", file=sys.stderr)
            return 1
        source = args.anchors or cfg.audit.anchor_file
        if source is None:
            print(f"audit ok: {result.entries} entries, head {result.head} (chain only: no anchors given, see --anchors)")
            return 0
        try:
            anchors = read_anchors(Path(source).read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError as err:
            print(f"cannot read the anchors in {source}: {err.strerror}", file=sys.stderr)
            return 2
        key = cfg.audit.key.reveal() if cfg.audit.key else None
        head = store.audit_head()
        checked = check_anchors(anchors, store.audit_hashes(a.seq for a in anchors), head[0] if head else 0, key)
        if not checked.ok:
            print(f"AUDIT BROKEN: {checked.problem}", file=sys.stderr)
            return 1
        signed = "signed, key checked" if key else "NOT checked against a key (set audit.key)"
        print(f"audit ok: {result.entries} entries, head {result.head}; {checked.anchors} anchors from {source} match ({signed})")
        return 0
    entries = store.audit_entries(appointment_id=args.appointment, kind=args.kind, limit=args.limit)
    for e in reversed(entries):
        print(json.dumps(e, sort_keys=True))
    if not entries:
        which = " and ".join(w for w in (
            f"appointment {args.appointment}" if args.appointment else "", f"kind {args.kind!r}" if args.kind else "",
        ) if w)
        kinds = store.audit_kinds()
        known = f" (kinds in the log: {', '.join(kinds)})" if args.kind and kinds else ""
        print(f"no audit entries{' for ' + which if which else ''}{known}", file=sys.stderr)
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _store(cfg)
    now = iso(datetime.now(UTC))
    if args.action in ("close", "confirm"):
        item = next((w for w in store.worklist() if w.id == args.id), None)
        if item is None:
            print(f"no open worklist item {args.id}", file=sys.stderr)
            return 1
        with store.tx() as tx:
            if args.action == "confirm" and item.kind == "mass_cancel_guard":
                tx.approve_held(item.connector)
            tx.close_work(item.key, now, "cli")
            tx.audit.add(now, f"worklist_{args.action}", item.connector, item.appointment_id, {"key": item.key})
        print(f"worklist item {item.id} {args.action}ed")
        return 0
    items = store.worklist(include_closed=args.all)
    rows = [(w.id, w.kind, w.connector or "", w.opened_at, w.closed_at or "open", w.instruction) for w in items]
    print(_table(rows, ("id", "kind", "connector", "opened", "closed", "what to do")) if rows else "worklist is empty")
    return 0


def _unknown_connector(cfg: PracticeConfig, name: str) -> bool:
    """True (after saying so) when ``name`` is not a configured connector."""
    if name in cfg.connectors:
        return False
    print(f"no connector {name!r} (known: {', '.join(cfg.connectors)})", file=sys.stderr)
    return True


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if _unknown_connector(cfg, args.connector):
        return 2
    store = _store(cfg)
    appt = store.appointment(args.appointment)
    if appt is None:
        print(f"no appointment {args.appointment}", file=sys.stderr)
        return 1
    import time

    with store.tx() as tx:
        tx.outbox_now(args.connector, appt.id, appt.version, time.time())  # now, even if it was waiting out a backoff
        tx.close_work(f"dead:{args.connector}:{appt.id}", iso(datetime.now(UTC)), "cli")
    print(f"{appt.id} queued for {args.connector}")
    return 0


def cmd_resync(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if _unknown_connector(cfg, args.connector):
        return 2
    store = _store(cfg)
    with store.tx() as tx:
        tx.forget_cursor(args.connector)
        tx.audit.add(iso(datetime.now(UTC)), "resync_requested", args.connector, None, {})
    print(f"{args.connector}: cursor forgotten; the daemon reconciles it from scratch on its next poll")
    return 0


def cmd_dry_run(args: argparse.Namespace) -> int:
    """Pull every system into a scratch copy of the store and list the writes that would follow."""
    import tempfile

    from .engine import Engine
    from .registry import build_connectors
    from .retry import Backoff, retrying

    cfg = _config(args)
    if cfg.store.url:
        raise StoreError(
            "dry-run pulls into a scratch copy of a SQLite store: make one with `syncbridge migrate-store --to FILE` "
            "(the daemon stopped), then run dry-run with a configuration whose store.path is that file"
        )
    scratch = Path(tempfile.mkdtemp(prefix="syncbridge-dry-run-")) / "scratch.db"
    if Path(cfg.store.path).exists():
        with sqlite3.connect(cfg.store.path) as live, sqlite3.connect(scratch) as copy:
            live.backup(copy)  # the live store is only read
    store = Store(scratch)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)

    backoff = Backoff(cfg.outbox.backoff_base, cfg.outbox.backoff_max)

    async def pull_all() -> list[tuple[str, str]]:
        failures = []
        for name in connectors:
            try:  # a throttled or unreachable system is read again, as the daemon would, for up to a minute
                await retrying(functools.partial(engine.sync, name), backoff, name, budget=60.0)
            except SyncbridgeError as err:
                failures.append((name, str(err)))
        for c in connectors.values():
            await c.close()
        return failures

    failures = asyncio.run(pull_all())
    rows = []
    for item in store.outbox_due(float("inf"), 100_000):
        appt = store.appointment(item.appointment_id)
        link = store.link(item.connector, item.appointment_id)
        if appt is None:
            continue
        action = "cancel" if appt.cancelled else ("update" if link and not link.gone else "create")
        rows.append((item.connector, action, appt.id, appt.local_start.strftime("%Y-%m-%d %H:%M"), appt.fields["clinician"]))
    rows.sort()
    print(f"dry run: nothing was written; {len(rows)} writes would follow")
    if rows:
        shown = rows if args.all else rows[: args.limit]
        print(_table(shown, ("connector", "would", "appointment", "starts", "clinician")))
        if len(shown) < len(rows):
            print(f"... {len(rows) - len(shown)} more (--all to list them)")
    for name, err in failures:
        print(f"{name}: could not be read: {err}", file=sys.stderr)
    held = [w for w in store.worklist() if w.kind == "mass_cancel_guard"]
    for w in held:
        print(f"held: {w.instruction}", file=sys.stderr)
    store.close()
    scratch.unlink(missing_ok=True)
    return 1 if failures else 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy the configured store into another (SQLite <-> PostgreSQL) and verify the copy (store_copy.py)."""
    from .pg import is_url
    from .secrets import SecretRef
    from .store_copy import migrate_store

    cfg = _config(args)
    target = args.to
    if is_url(target):
        from urllib.parse import urlsplit

        if urlsplit(target).password is not None or "password=" in target.lower():
            raise ConfigError("--to", "the URL holds a password: leave it out and give it by reference, --password-ref env:NAME, "
                              "file:PATH or credential:NAME (or libpq's ~/.pgpass)")
    password, ref = None, None
    if args.password_ref:
        kind, _, value = args.password_ref.partition(":")
        if kind not in ("env", "file", "credential") or not value:
            raise ConfigError("--password-ref", f"{args.password_ref!r} is not a secret reference: give env:NAME, file:PATH or "
                              "credential:NAME")
        if not is_url(target):
            raise ConfigError("--password-ref", "the target is a SQLite file, which has no password")
        secret = SecretRef(**{kind: value})
        password, ref = secret.reveal(), f"{{{kind}: {value}}}"
    return migrate_store(cfg.store, target, password=password, password_ref=ref, copy_broken_audit=args.copy_broken_audit,
                         report=functools.partial(print, flush=True))


def cmd_auth(args: argparse.Namespace) -> int:
    from .host import DaemonHost, Vault
    from .registry import build_connectors

    cfg = _config(args)
    connectors = build_connectors(cfg)
    if args.connector not in connectors:
        raise ConfigError("connectors", f"no enabled connector named {args.connector!r} (have: {', '.join(sorted(connectors)) or 'none'})")
    connector = connectors[args.connector]
    if args.clinician not in connector.clinicians:
        raise ConfigError(
            f"clinicians.{args.clinician}.accounts.{args.connector}",
            f"clinician {args.clinician!r} has no account in {args.connector}; add it to the config first",
        )
    store = _store(cfg, create=True)
    vault = Vault(store, cfg.store.secret_key)
    vault._cipher()  # refuse before the person signs in, not after
    connector.host = DaemonHost(args.connector, store, vault, None, lambda _name: None)

    async def sign_in() -> str:
        try:
            return await connector.authorize(args.clinician)
        finally:
            await connector.close()

    try:
        print(asyncio.run(sign_in()))
    except NotImplementedError as err:
        print(f"syncbridge: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_passwd(args: argparse.Namespace) -> int:
    """Print the hash line of a console user's password (typed twice at a terminal, else the first line of stdin)."""
    import getpass

    from .console.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: " if args.user else "password: ")
        if getpass.getpass("again: ") != password:
            print("syncbridge: the two passwords differ; nothing printed", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 10:
        print("syncbridge: use a password of at least 10 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    who = args.user or "NAME"
    print(f"store this line in a root-only file (mode 0600) and reference it in the config as\n"
          f"  console.users.{who}.password_hash: {{file: /etc/syncbridge/secrets/console-{who}}}", file=sys.stderr)
    return 0


# --- parser --------------------------------------------------------------------------------


class _Version(argparse.Action):
    """``--version``: the installed version, and whether the engine's per-change modules were
    compiled at install; worked out only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:  # noqa: A002 (argparse's name)
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib import import_module, metadata
        from importlib.machinery import EXTENSION_SUFFIXES

        engine_file = import_module("syncbridge.engine").__file__ or ""
        how = "compiled" if engine_file.endswith(tuple(EXTENSION_SUFFIXES)) else "interpreted (README, \"Deploying on a server\", step 1)"
        print(f"syncbridge {metadata.version('syncbridge')}, engine {how}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syncbridge", description="Cancel once, anywhere: keeps calendars, the EHR and directories in step.")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default: {DEFAULT_CONFIG}, or $SYNCBRIDGE_CONFIG)")
    p.add_argument("--version", action=_Version, help="the version, and whether the engine is compiled")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file (also accepted before the command)")

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        sp.set_defaults(func=func)
        return sp

    add("run", cmd_run, "run the daemon (polls, webhooks, outbox) until SIGTERM")
    c = add("check", cmd_check, "validate the config, then authenticate to each connector and make one harmless read")
    c.add_argument("--no-connect", action="store_true", help="only validate the file")
    c.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for each connector")
    s = add("status", cmd_status, "per connector: health, last good pull, cursor age, outbox, dead letters, worklist")
    s.add_argument("appointment", nargs="?", help="show one appointment and where its current version was applied")
    k = add("cancel", cmd_cancel, "cancel a session once, from the command line; the daemon applies it everywhere")
    k.add_argument("appointment", help="canonical appointment id (see `syncbridge status`), or a series id with --series")
    k.add_argument("--series", action="store_true", help="cancel every future session of the series (therapy ended)")
    k.add_argument("--kind", choices=[e.value for e in CancelKind], help="default: cancel, or late_cancel inside the late-cancel window")
    k.add_argument("--by", choices=[e.value for e in CancelledBy], default=CancelledBy.CLIENT.value, help="who cancelled (default: client)")
    k.add_argument("--reason", help="free text, kept only in the store and the EHR")
    k.add_argument("--waive", action="store_true", help="waive any late-cancel or no-show fee")
    k.add_argument("--crisis", action="store_true", help="clinical reason (crisis, illness): fee waived by default")
    add_bulk_parser(add, cmd_bulk, common)
    a = add("audit", cmd_audit, "show the audit log, or --verify its hash chain")
    a.add_argument("--verify", action="store_true", help="check that no entry was edited or deleted (exit 1 if one was)")
    a.add_argument("--anchors", type=Path, help="with --verify: anchors to check the log against (the anchor file, or "
                   "`journalctl -u syncbridge -o cat` saved to a file); default audit.anchor_file")
    a.add_argument("--appointment", help="only entries of this appointment")
    a.add_argument("--kind", help="only entries of this kind (observed, applied, conflict, ...)")
    a.add_argument("--limit", type=int, default=50)
    w = add("worklist", cmd_worklist, "what a person must do: read-only systems, claims already sent, held batches")
    w.add_argument("action", nargs="?", choices=["list", "close", "confirm"], default="list")
    w.add_argument("id", nargs="?", type=int, help="worklist item id for close/confirm")
    w.add_argument("--all", action="store_true", help="include closed items")
    r = add("retry", cmd_retry, "queue a dead-lettered write again after fixing its cause")
    r.add_argument("connector")
    r.add_argument("appointment")
    y = add("resync", cmd_resync, "forget a connector's cursor and reconcile it from scratch (no duplicates)")
    y.add_argument("connector")
    dr = add("dry-run", cmd_dry_run, "read every system and show what the daemon would write, without writing anything")
    dr.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    dr.add_argument("--all", action="store_true", help="show every row")
    ms = add("migrate-store", cmd_migrate_store, "copy the store into a new PostgreSQL database or SQLite file, every table and "
             "the audit chain, then verify the copy (the daemon stopped; the source is only read)")
    ms.add_argument("--to", required=True, metavar="URL_OR_PATH", help="the new store: postgresql://ROLE@HOST/DATABASE (no password in "
                    "it; the database exists and is empty) or the path of a new SQLite file")
    ms.add_argument("--password-ref", metavar="REF", help="the target database's password by reference: env:NAME, file:PATH or "
                    "credential:NAME (systemd); default: libpq's own (~/.pgpass, peer or certificate authentication)")
    ms.add_argument("--copy-broken-audit", action="store_true", help="copy an audit chain that does not verify as it is (refused "
                    "by default): the copy is verified to break exactly where the source does")
    au = add("auth", cmd_auth, "sign one clinician in to a connector interactively (OAuth); the token is stored encrypted")
    au.add_argument("connector", help="connector name from the config (e.g. google)")
    au.add_argument("clinician", help="clinician key from the config")
    d = add("demo", cmd_demo, "run the built-in sandbox: emulators, a small practice, one cancellation")
    d.add_argument("--state-dir", help="where the demo keeps its store (default: a new temporary folder)")
    d.add_argument("--no-wait", action="store_true", help="exit after the cancellation instead of serving the status page")
    pw = add("passwd", cmd_passwd, "print the hash of a console user's password, to keep in a secret file the config refers to")
    pw.add_argument("user", nargs="?", help="the console user the hash is for (only shown in the advice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worklist" and args.action in ("close", "confirm") and args.id is None:
        parser.error(f"worklist {args.action} needs an item id")
    try:
        return int(args.func(args))
    except ConfigError as err:
        if err.more:
            print(f"syncbridge: configuration refused, {len(err.problems)} problems:", file=sys.stderr)
            for problem in err.problems:
                print(f"  {problem.text}", file=sys.stderr)
        else:
            print(f"syncbridge: configuration refused: {err}", file=sys.stderr)
        return 2
    except MalformedRecord as err:
        print(f"syncbridge: {err}", file=sys.stderr)
        return 2
    except database_errors() as err:
        print(f"syncbridge: {store_error(err)}", file=sys.stderr)
        return 1
    except SyncbridgeError as err:
        print(f"syncbridge: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
