"""Chaos: every system failing on a fifth of its calls and down for a while, the daemon killed every few seconds.

All installed sandboxes run behind their injectors (429 and 503 with Retry-After, 500, answers
lost after the change took effect, on ``ERROR_RATE`` of requests), and each whole system in turn
is stopped (connections refused) for ``OUTAGE`` seconds and comes back with its data, while people
make ``EDITS`` changes: moving sessions in any system that can, cancelling them in any system,
cancelling from the command line, and conflicting edits to one session in two systems at once.
The daemon runs with the shipped outbox and mass-cancellation guard settings and is SIGKILLed and
restarted every few seconds throughout. After quiescence every system must agree with the
canonical record, with no duplicate event, no lost cancellation, no claim for a cancelled
session, no dead letter, and an audit chain that verifies.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from syncbridge.config import load_config
from syncbridge.demo import sandbox_config, start_sandboxes
from syncbridge.emulation import free_port
from syncbridge.engine import Engine
from syncbridge.model import Billing, Role, empty_snapshot, iso, new_canonical_id
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from tests.support.daemon import ROOT, DaemonProcess

pytestmark = pytest.mark.slow

EDITS = int(os.environ.get("SYNCBRIDGE_CHAOS_EDITS", "500"))
ERROR_RATE = 0.2
KILL_EVERY = (2.0, 5.0)  # seconds between SIGKILLs
OUTAGE = (6.0, 12.0)  # seconds a whole system is down, each in turn
NY = ZoneInfo("America/New_York")
CLINICIANS = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen", "dr_okafor": "Dr. Okafor"}
PER_CLINICIAN = max(20, EDITS // 8)  # about a fifth of the edits cancel: enough sessions stay live


class Person:
    """Somebody using one of the systems: retries when the system fails, gives up on a vanished copy."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.done: dict[str, int] = {}

    async def attempt(self, what: str, op: Callable[[], Awaitable[Any]]) -> bool:
        for _ in range(12):
            try:
                await op()
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (404, 410):
                    return False  # the copy is gone (cancelled meanwhile): nothing to edit
                await asyncio.sleep(0.2)  # 412 (it changed under me), 429, 5xx: look again and retry
                continue
            except (httpx.TransportError, KeyError, StopIteration):
                await asyncio.sleep(0.2)
                continue
            self.done[what] = self.done.get(what, 0) + 1
            return True
        return False


def test_chaos(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SYNCBRIDGE_CHAOS_SEED", "7")))
    sandboxes = start_sandboxes(tmp_path, list(CLINICIANS), say=lambda _t: None)
    try:
        _run(tmp_path, sandboxes, rng)
    finally:
        for s in sandboxes.values():
            s.close()


def _run(tmp: Path, sandboxes: dict[str, Any], rng: random.Random) -> None:
    port = free_port()
    conf = sandbox_config(tmp, sandboxes, CLINICIANS, port, poll_interval=1.0)
    conf["logging"] = {"level": "info", "json": True}
    for c in conf["connectors"].values():
        c["full_sweep_interval"] = 20
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    cfg = load_config(path)
    connectors = build_connectors(cfg)
    roles = {n: c.capabilities.role for n, c in connectors.items()}
    holds_all = {n for n, c in connectors.items() if c.capabilities.accepts_new}  # a directory holds only its own bookings
    store = Store(cfg.store.path)
    engine = Engine(store, connectors, cfg)
    today, ids = seed_sessions(engine, CLINICIANS, PER_CLINICIAN)
    store.close()
    for c in connectors.values():
        asyncio.run(c.close())

    current = [DaemonProcess(tmp, conf)]
    try:
        _chaos(tmp, sandboxes, rng, conf, cfg, path, roles, holds_all, ids, today, current)
    finally:
        if current[0].proc.poll() is None:  # a failed run leaves no daemon behind
            current[0].proc.kill()
            current[0].proc.wait()


def _chaos(
    tmp: Path, sandboxes: dict[str, Any], rng: random.Random, conf: dict[str, Any], cfg: Any, path: Path,
    roles: dict[str, Role], holds_all: set[str], ids: list[str], today: datetime, current: list[DaemonProcess],
) -> None:
    daemon = current[0]
    watch = Store(cfg.store.path)

    def settled() -> bool:
        return all(p == 0 for p, _ in watch.outbox_counts().values())

    def linked(appt: str, name: str) -> str | None:
        link = watch.link(name, appt)
        return link.external_id if link is not None and not link.gone else None

    _wait(daemon, "initial copy", lambda: settled() and all(
        linked(a, n) for a in ids for n in sandboxes if n in holds_all and sandboxes[n].look and _serves(cfg, n, a, watch)
    ), 240)

    # billing staff bill every session in the EHR: an Encounter, a charge and a claim (some already sent)
    ehr = next((n for n, r in roles.items() if r == Role.RECORD and sandboxes[n].connector_config.get("type") == "fhir"), None)
    if ehr is not None:
        _seed_billing(sandboxes[ehr], {a: ext for a in ids if (ext := linked(a, ehr))})

    for s in sandboxes.values():
        if s.injector is not None:
            s.injector.configure(latency=0.005, error_rate=ERROR_RATE)

    # --- the daemon is killed and restarted throughout ---------------------------------------
    stop_killing = threading.Event()
    kills = [0]

    def killer() -> None:
        while not stop_killing.wait(rng.uniform(*KILL_EVERY)):
            current[0].proc.kill()
            current[0].proc.wait()
            kills[0] += 1
            current[0] = DaemonProcess(tmp, conf)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()

    # --- each whole system goes down in turn and comes back (a maintenance window, a crash) ------
    down: set[str] = set()
    outages: list[tuple[str, float]] = []
    edits_done = threading.Event()
    systems = [n for n, s in sandboxes.items() if s.injector is not None]
    outage_rng = random.Random(rng.random())

    def outager() -> None:
        for turn in range(10 * len(systems)):
            name = systems[turn % len(systems)]
            if edits_done.is_set() and {n for n, _ in outages} >= set(systems):
                return
            length = outage_rng.uniform(*OUTAGE)
            injector = sandboxes[name].injector
            down.add(name)
            injector.outage(True)
            time.sleep(length)
            injector.outage(False)
            down.discard(name)
            outages.append((name, length))
            time.sleep(outage_rng.uniform(1.0, 3.0))

    outage_thread = threading.Thread(target=outager, daemon=True)
    outage_thread.start()

    # --- people edit everywhere ------------------------------------------------------------
    person = Person(rng)
    cancelled: set[str] = set()
    movable = [n for n, s in sandboxes.items() if s.move and n in holds_all]
    cancellers = [n for n, s in sandboxes.items() if s.delete_event and n in holds_all]
    directories = [n for n, s in sandboxes.items() if s.book and s.delete_event]
    cli_cancels: list[str] = []
    #: (directory, external id) of bookings clients made, and those they cancelled again
    bookings: list[tuple[str, str]] = []
    client_cancelled: set[tuple[str, str]] = set()

    async def client_books(name: str) -> None:
        book = sandboxes[name].book
        assert book is not None
        start = today + timedelta(days=rng.randint(1, 20), hours=rng.randint(0, 7), minutes=30)
        if name in down:
            return  # the directory is down for its clients too
        try:
            ext = await book(rng.choice(list(CLINICIANS)), start, start + timedelta(minutes=50))
        except httpx.TransportError:
            return  # it went down as the client clicked: no booking
        bookings.append((name, ext))

    async def client_cancels() -> None:
        open_ = [b for b in bookings if b not in client_cancelled and b[0] not in down]
        if not open_:
            return
        name, ext = rng.choice(open_)
        delete = sandboxes[name].delete_event
        assert delete is not None
        if await person.attempt("client cancel", lambda: delete(ext)):
            client_cancelled.add((name, ext))

    async def move(appt: str, name: str) -> None:
        ext = linked(appt, name)
        mover = sandboxes[name].move
        if ext is None or mover is None:
            return
        start = today + timedelta(days=rng.randint(1, 20), hours=rng.randint(0, 7))
        await person.attempt("move", lambda: mover(ext, start, start + timedelta(minutes=50)))

    async def cancel(appt: str, name: str) -> None:
        ext = linked(appt, name)
        delete = sandboxes[name].delete_event
        if ext is None or delete is None:
            return
        if await person.attempt("cancel", lambda: delete(ext)):
            cancelled.add(appt)

    async def edits() -> None:
        for i in range(EDITS):
            live = [a for a in ids if a not in cancelled]
            if not live:
                break
            appt = rng.choice(live)
            roll = rng.random()
            if roll < 0.6 and movable:
                await move(appt, rng.choice(movable))
            elif roll < 0.75 and len(movable) > 1:  # two people move the same session in two systems at once
                a, b = rng.sample(movable, 2)
                await asyncio.gather(move(appt, a), move(appt, b))
            elif roll < 0.85 and movable and cancellers:  # one moves it while another cancels it
                await asyncio.gather(move(appt, rng.choice(movable)), cancel(appt, rng.choice(cancellers)))
            elif roll < 0.93 and cancellers:
                await cancel(appt, rng.choice(cancellers))
            elif roll < 0.96 and directories:
                await client_books(rng.choice(directories))
            elif roll < 0.98 and directories:
                await client_cancels()
            else:
                cli_cancels.append(appt)
                cancelled.add(appt)
                done = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "syncbridge.cli", "cancel", appt, "--config", str(path)],
                    cwd=ROOT, capture_output=True, text=True, timeout=60,
                )
                assert done.returncode == 0, done.stderr
            if i % 50 == 49:
                await asyncio.sleep(0.5)

    started = time.monotonic()
    asyncio.run(edits())
    edits_done.set()
    outage_thread.join()
    stop_killing.set()
    thread.join()
    for s in sandboxes.values():
        if s.injector is not None:
            s.injector.configure()
    daemon = current[0]
    print(f"\n{EDITS} edits in {time.monotonic() - started:.0f}s with {kills[0]} kills: {person.done}, "
          f"{len(cancelled)} cancelled ({len(cli_cancels)} from the CLI), {len(bookings)} directory bookings "
          f"({len(client_cancelled)} cancelled there); outages: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in outages) + "; injected: "
          + ", ".join(f"{n}={dict(s.injector.failures)}" for n, s in sandboxes.items() if s.injector))
    assert kills[0] >= 3
    assert {n for n, _ in outages} == set(systems)

    # --- quiescence: every system agrees with the canonical record ----------------------------
    def problems() -> list[str]:
        if not settled():
            return ["outbox not empty"]
        return disagreements(watch, sandboxes, roles, ehr, ids, bookings, client_cancelled, cancelled)

    deadline = time.monotonic() + 240
    found = problems()
    while found and time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log.read_text()[-3000:]}")
        time.sleep(2)
        found = problems()
    assert watch.dead_letters() == [], watch.dead_letters()
    assert not found, "\n".join(found[:20]) + _history(watch, found)
    from collections import Counter

    print("billing as reported, each checked against the EHR:", dict(Counter(a.fields["billing"] for a in watch.appointments())))
    assert daemon.stop() == 0
    watch.close()
    verify = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "audit", "--verify", "--config", str(path)], cwd=ROOT, capture_output=True, text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def seed_sessions(engine: Engine, clinicians: Iterable[str], per_clinician: int) -> tuple[datetime, list[str]]:
    """Sessions booked at the front desk from tomorrow on, four a day per clinician, two hours apart
    from 9:00 New York time: today's 9:00 and the appointment ids."""
    today = datetime.now(NY).replace(hour=9, minute=0, second=0, microsecond=0)
    ids: list[str] = []
    for clinician in clinicians:
        for n in range(per_clinician):
            start = today + timedelta(days=1 + n // 4, hours=2 * (n % 4))
            appt = new_canonical_id()
            engine.change(appt, empty_snapshot() | {
                "clinician": clinician, "client_key": f"k{len(ids)}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                "timezone": "America/New_York", "service_code": "90834", "location": "Room 1",
            }, via="front-desk", kind="booked")
            ids.append(appt)
    return today, ids


def disagreements(
    watch: Store, sandboxes: dict[str, Any], roles: dict[str, Role], ehr: str | None, ids: list[str],
    bookings: list[tuple[str, str]], client_cancelled: set[tuple[str, str]], cancelled: set[str],
) -> list[str]:
    """Where a system and the canonical record disagree once the outbox is empty: a booking that
    never reached the record, a lost cancellation, a cancelled session still billable in the EHR or
    live in a system, a live copy at another time, an event no appointment owns (a duplicate).
    ``cancelled`` gains the sessions the clients cancelled through a system (``client_cancelled``)."""
    out: list[str] = []
    booked_ids = []
    for name, ext in bookings:
        link = watch.link_by_external(name, ext)
        if link is None:
            out.append(f"booking {ext} in {name} never reached the record")
            continue
        booked_ids.append(link.appointment_id)
        if (name, ext) in client_cancelled:
            cancelled.add(link.appointment_id)
    for appt in ids + booked_ids:
        record = watch.appointment(appt)
        assert record is not None
        if appt in cancelled and not record.cancelled:
            out.append(f"lost cancellation of {appt}")
        in_record = [lk.connector for lk, _ in watch.links_for(appt) if roles.get(lk.connector) == Role.RECORD and lk.external_id]
        if record.cancelled and in_record and record.fields.get("billing") not in (Billing.SUPPRESSED, Billing.FEE_SELF_PAY, Billing.NEEDS_VOID):
            # (a session cancelled before it ever reached the EHR has nothing there to bill)
            out.append(f"{appt} cancelled but billing {record.fields.get('billing')} in {in_record}")
        for name, sandbox in sandboxes.items():
            link = watch.link(name, appt)
            copy = link.external_id if link is not None and not link.gone else None
            if sandbox.look is None or copy is None:
                continue
            seen = asyncio.run(sandbox.look(copy))
            if record.cancelled and seen.state == "live":
                out.append(f"{appt} cancelled but live in {name}")
            if not record.cancelled and (seen.state != "live" or seen.start != record.start):
                out.append(f"{appt} in {name}: {seen.state} at {seen.start}, record says {record.start}")
    if ehr is not None:
        out += _billing_problems(sandboxes[ehr], watch, ehr)
    for name, sandbox in sandboxes.items():
        if sandbox.live_ids is None:
            continue
        for ext in asyncio.run(sandbox.live_ids()):
            link = watch.link_by_external(name, ext)
            if link is None:
                out.append(f"{name} has an event no appointment owns (a duplicate): {ext}")
            elif (rec := watch.appointment(link.appointment_id)) is not None and rec.cancelled:
                out.append(f"{name} still shows cancelled {link.appointment_id} as {ext}")
    return out


def _serves(cfg: Any, name: str, appt: str, store: Store) -> bool:
    record = store.appointment(appt)
    return record is not None and name in cfg.clinicians[record.fields["clinician"]].accounts


def _wait(daemon: DaemonProcess, what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log.read_text()[-3000:]}")
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s\n{daemon.log.read_text()[-3000:]}")


def _history(store: Store, found: list[str]) -> str:
    """What the store recorded of the first appointments named in a failure, to tell why."""
    out = []
    for appt in dict.fromkeys(w for line in found for w in line.split() if w.startswith("sb-")):
        out.append(f"\n--- {appt}: outbox {store.conn.execute('SELECT * FROM outbox WHERE appointment_id = ?', (appt,)).fetchall()}")
        out.append(f"links {[(lk.connector, lk.etag, lk.applied_version, lk.gone) for lk, _ in store.links_for(appt)]}")
        out.extend(f"{e['seq']} {e['kind']} {e['connector']} {str(e.get('detail'))[:200]}" for e in reversed(store.audit_entries(appointment_id=appt, limit=40)))
        if len(out) > 120:
            break
    return "\n".join(out)


def _fhir(sandbox: Any) -> httpx.Client:
    conf = sandbox.connector_config
    token = Path(conf["token"]["file"]).read_text().strip()
    return httpx.Client(base_url=conf["base_url"], headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _seed_billing(sandbox: Any, appointments: dict[str, str]) -> None:
    """An Encounter, a billable ChargeItem and a Claim for every session, as billing staff make them;
    every seventh claim already sent to the payer (active)."""
    with _fhir(sandbox) as http:
        items = list(appointments.items())
        for k in range(0, len(items), 50):
            chunk = items[k : k + 50]
            encounters = [{"resource": {"resourceType": "Encounter", "status": "planned", "appointment": [{"reference": f"Appointment/{ext}"}]},
                           "request": {"method": "POST", "url": "Encounter"}} for _, ext in chunk]
            made = http.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": encounters}).raise_for_status().json()["entry"]
            billing = []
            for n, answer in enumerate(made):
                ref = {"reference": f"Encounter/{answer['resource']['id']}"}
                status = "active" if (k + n) % 7 == 0 else "draft"
                billing += [
                    {"resource": {"resourceType": "ChargeItem", "status": "billable", "context": ref, "code": {"text": "90834"}},
                     "request": {"method": "POST", "url": "ChargeItem"}},
                    {"resource": {"resourceType": "Claim", "status": status, "use": "claim", "item": [{"sequence": 1, "encounter": [ref]}]},
                     "request": {"method": "POST", "url": "Claim"}},
                ]
            http.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": billing}).raise_for_status()


def _all(http: httpx.Client, rtype: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url: str | None = f"/{rtype}?_count=500"
    while url:
        bundle = http.get(url).raise_for_status().json()
        out += [e["resource"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return out


def _billing_problems(sandbox: Any, store: Store, ehr: str) -> list[str]:
    """Billing as the EHR shows it against what syncbridge reports: a session reported suppressed
    must have no live charge or draft claim, and a session that is live owes no self-pay fee."""
    out: list[str] = []
    with _fhir(sandbox) as http:
        encounters = _all(http, "Encounter")
        charges = _all(http, "ChargeItem")
        claims = _all(http, "Claim")
    by_appt: dict[str, set[str]] = {}
    for e in encounters:
        for a in e.get("appointment", []):
            by_appt.setdefault(a["reference"].removeprefix("Appointment/"), set()).add(f"Encounter/{e['id']}")
    fees = {i["value"]: c for c in charges for i in c.get("identifier", []) if i.get("system") == "urn:syncbridge:fee"}
    for appt in store.appointments():
        link = store.link(ehr, appt.id)
        encs = by_appt.get(link.external_id, set()) if link is not None and link.external_id else set()
        billing = appt.fields.get("billing")
        if billing in (Billing.SUPPRESSED, Billing.FEE_SELF_PAY, Billing.NEEDS_VOID):
            for c in charges:
                if c.get("context", {}).get("reference") in encs and c.get("status") in ("planned", "billable"):
                    out.append(f"{appt.id} reported {billing} but ChargeItem/{c['id']} is {c['status']}")
            for c in claims:
                named = {e["reference"] for it in c.get("item", []) for e in it.get("encounter", [])}
                if named & encs and c.get("status") == "draft":
                    out.append(f"{appt.id} reported {billing} but Claim/{c['id']} is draft")
                if named & encs and c.get("status") == "active" and billing != Billing.NEEDS_VOID:
                    out.append(f"{appt.id} reported {billing} but Claim/{c['id']} went to the payer (needs_void expected)")
        if not appt.cancelled and (fee := fees.get(appt.id)) is not None and fee.get("status") == "billable":
            out.append(f"{appt.id} is live but its self-pay fee ChargeItem/{fee['id']} is billable")
    return out
