"""The command line, run as an admin runs it: real processes, real files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import load_config
from syncbridge.engine import Engine
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from tests.support.replica import ReplicaVendor, open_db, touch

ROOT = Path(__file__).resolve().parents[2]


def sb(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", *args], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def practice(tmp_path: Path) -> Path:
    """A practice with an EHR and one calendar, synced once, with three sessions."""
    conf = {
        "practice": {"timezone": "America/New_York"},
        "store": {"path": str(tmp_path / "store.db")},
        "http": {"enabled": False},
        "clinicians": {"dr_lee": {"accounts": {"cal": {}}}},
        "connectors": {
            "ehr": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "ehr.db"), "role": "record"},
            "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db")},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    ehr = ReplicaVendor(str(tmp_path / "ehr.db"))
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    for i in range(3):
        asyncio.run(ehr.book(start + timedelta(hours=i), start + timedelta(hours=i, minutes=50), f"c{i}", clinician="dr_lee"))
    cfg = load_config(path)
    store = Store(cfg.store.path)
    engine = Engine(store, build_connectors(cfg), cfg)
    asyncio.run(engine.sync("ehr"))
    store.close()
    return path


def digest(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return hashlib.sha256(repr(list(conn.iterdump())).encode()).hexdigest()


def test_every_command_has_help() -> None:
    """`--help` works for every subcommand and says what it does."""
    for cmd in ("run", "check", "status", "cancel", "audit", "worklist", "retry", "resync", "demo"):
        done = sb(cmd, "--help", check=True)
        assert "usage: syncbridge" in done.stdout and len(done.stdout.splitlines()) > 3


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("practice:\n  timezone: Mars/Olympus\n", "practice.timezone: unknown time zone 'Mars/Olympus'"),
        ("store: {path: [unclosed\n", "not valid YAML"),
        ("connectors:\n  ehr:\n    type: epic-magic\n", "connectors.ehr.type: unknown connector type 'epic-magic'"),
        (
            "practice:\n  timezone: Mars/Olympus\nconnectors:\n  ehr:\n    type: epic-magic\n",
            "refused, 2 problems:\n  {bad}:2: practice.timezone: unknown time zone 'Mars/Olympus'"
            " (expected an IANA name such as America/New_York)\n  {bad}:5: connectors.ehr.type: unknown connector type",
        ),
    ],
)
def test_bad_config_is_refused_and_store_untouched(practice: Path, tmp_path: Path, text: str, expect: str) -> None:
    """`syncbridge check` refuses a broken config with key and line; the existing store is unchanged."""
    before = digest(tmp_path / "store.db")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    done = sb("check", "--config", str(bad))
    assert done.returncode == 2
    assert expect.format(bad=bad) in done.stderr and str(bad) in done.stderr
    assert sb("run", "--config", str(bad)).returncode == 2
    assert digest(tmp_path / "store.db") == before


def test_check_validates_and_reaches_connectors(practice: Path) -> None:
    """A good config checks ok and each connector answers a harmless read."""
    done = sb("check", "--config", str(practice), check=True)
    assert "config ok: 1 clinicians, 2 connectors" in done.stdout
    assert done.stdout.count(" ok ") == 2


def test_cancel_once_from_the_command_line(practice: Path) -> None:
    """`syncbridge cancel` records who and why, and queues the change for every system."""
    store = Store(load_config(practice).store.path)
    appt = store.appointments()[0]
    store.close()
    done = sb("cancel", appt.id, "--by", "clinician", "--reason", "conference", "--config", str(practice), check=True)
    assert "cancelled (cancel, fee none)" in done.stdout
    store = Store(load_config(practice).store.path)
    cancelled = store.appointment(appt.id)
    assert cancelled.fields["cancellation"]["by"] == "clinician" and cancelled.fields["cancellation"]["via"] == "cli"
    queued = {(i.connector, i.appointment_id) for i in store.outbox_due(float("inf"), 100)}
    assert ("ehr", appt.id) in queued
    status = sb("status", appt.id, "--config", str(practice), check=True)
    assert "cancelled by clinician" in status.stdout and "ehr" in status.stdout
    assert "is in 0 of 1 systems" in status.stdout  # not written yet: no daemon is running
    assert sb("cancel", appt.id, "--config", str(practice), check=True).stdout.endswith("already cancelled\n")


def test_status_lists_connectors(practice: Path) -> None:
    """`syncbridge status` shows each connector's health and queues."""
    done = sb("status", "--config", str(practice), check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("daemon: not running")  # nothing runs on this store
    assert lines[1].split()[:3] == ["connector", "type", "health"]
    assert any(line.startswith("ehr") and " ok " in line for line in lines)


def test_audit_verify_catches_tampering(practice: Path, tmp_path: Path) -> None:
    """`syncbridge audit --verify` passes on an intact log and fails, naming the entry, on an edited one."""
    assert "audit ok" in sb("audit", "--verify", "--config", str(practice), check=True).stdout
    with closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        conn.execute("UPDATE audit SET detail = '{}' WHERE seq = 2")
        conn.commit()
    done = sb("audit", "--verify", "--config", str(practice))
    assert done.returncode == 1 and "entry 2 was altered" in done.stderr


def test_commands_never_answer_from_a_new_empty_store(practice: Path, tmp_path: Path) -> None:
    """A config pointing at no store (a typo in store.path) is told so, not answered from an empty
    store created on the spot ("no appointment ..." for a session that exists)."""
    conf = yaml.safe_load(practice.read_text())
    conf["store"]["path"] = str(tmp_path / "stroe.db")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(conf))
    appt = Store(tmp_path / "store.db").appointments()[0].id
    for args in (("status",), ("status", appt), ("cancel", appt, "--by", "client"), ("audit",), ("worklist",)):
        done = sb(*args, "--config", str(wrong))
        assert done.returncode == 1, args
        assert f"there is no store at {tmp_path / 'stroe.db'}: the daemon creates it when it first starts" in done.stderr
    assert not (tmp_path / "stroe.db").exists()


def test_damaged_store_is_refused_plainly(practice: Path, tmp_path: Path) -> None:
    """A store damaged on disk gets a sentence saying so and what to do, not a traceback; the
    daemon refuses to start on it and leaves the file as it found it."""
    store = tmp_path / "store.db"
    data = bytearray(store.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[page:] = b"\xa5" * (len(data) - page)  # every page but the schema's
    store.write_bytes(bytes(data))
    for args in (("status",), ("cancel", "sb-anything", "--by", "client"), ("run",)):
        done = sb(*args, "--config", str(practice))
        assert done.returncode == 1, args
        assert "Traceback" not in done.stderr
        assert f"the store {store} cannot be used" in done.stderr or "the store cannot be used" in done.stderr
        assert "the file is damaged: restore the last backup" in done.stderr, done.stderr
    assert store.read_bytes() == bytes(data)


def test_bad_records_are_skipped_and_nothing_stored_is_lost(practice: Path, tmp_path: Path) -> None:
    """A 10 MB event and one ending before it starts are refused by name; the good ones and the store stay intact."""
    cfg = load_config(practice)
    store = Store(cfg.store.path)
    before = {a.id: a.fields for a in store.appointments()}
    ehr = ReplicaVendor(str(tmp_path / "ehr.db"))
    start = datetime(2027, 5, 3, 15, tzinfo=UTC)
    huge = asyncio.run(ehr.book(start, start + timedelta(minutes=50), "c-huge", clinician="dr_lee"))
    with closing(open_db(str(tmp_path / "ehr.db"))) as conn:
        touch(conn, huge, title="x" * (10 * 2**20))
    backwards = asyncio.run(ehr.book(start, start - timedelta(hours=1), "c-back", clinician="dr_lee"))
    good = asyncio.run(ehr.book(start + timedelta(hours=2), start + timedelta(hours=3), "c-good", clinician="dr_lee"))
    engine = Engine(store, build_connectors(cfg), cfg)
    report = asyncio.run(engine.sync("ehr"))
    assert report.rejected == 2 and report.created == 1
    problems = {e["detail"]["external_id"]: e["detail"]["problem"] for e in store.audit_entries(kind="rejected")}
    assert "over the 1,048,576-byte limit" in problems[huge]
    assert "ends" in problems[backwards] and "before it starts" in problems[backwards]
    after = {a.id: a.fields for a in store.appointments()}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    assert store.link_by_external("ehr", good) is not None
    assert store.verify_audit().ok


def test_worklist_and_resync(practice: Path) -> None:
    """An admin can list the worklist and ask for a from-scratch resync of one connector."""
    assert "worklist is empty" in sb("worklist", "--config", str(practice), check=True).stdout
    done = sb("resync", "ehr", "--config", str(practice), check=True)
    assert "cursor forgotten" in done.stdout
    store = Store(load_config(practice).store.path)
    assert store.cursor("ehr") is None
    assert sb("resync", "nope", "--config", str(practice)).returncode == 2
    appt = store.appointments()[0].id
    refused = sb("retry", "nope", appt, "--config", str(practice))
    assert refused.returncode == 2 and "no connector 'nope' (known: cal, ehr)" in refused.stderr
    assert store.outbox_counts().get("nope") is None  # nothing queued for a system that does not exist


def test_audit_filters_say_when_nothing_matches(practice: Path) -> None:
    """A filter that matches nothing says so, and a kind that is not in the log lists those that are."""
    done = sb("audit", "--kind", "obsreved", "--config", str(practice), check=True)
    assert done.stdout == ""
    assert "no audit entries for kind 'obsreved' (kinds in the log: " in done.stderr and "observed" in done.stderr
    done = sb("audit", "--kind", "observed", "--config", str(practice), check=True)
    assert done.stdout.count('"kind": "observed"') == 3 and done.stderr == ""


def test_dry_run_shows_writes_and_writes_nothing(practice: Path, tmp_path: Path) -> None:
    """`syncbridge dry-run` lists what would be written to each system and changes no system and no store."""
    before_store = digest(tmp_path / "store.db")
    before_cal = ReplicaVendor(str(tmp_path / "cal.db")).all_items()
    done = sb("dry-run", "--config", str(practice), check=True)
    assert "dry run: nothing was written; 3 writes would follow" in done.stdout
    assert done.stdout.count("cal  create") == 3 or done.stdout.count(" create ") == 3
    assert digest(tmp_path / "store.db") == before_store
    assert ReplicaVendor(str(tmp_path / "cal.db")).all_items() == before_cal


def test_resync_rebuilds_without_duplicates(practice: Path, tmp_path: Path) -> None:
    """After `syncbridge resync`, a from-scratch pull adds nothing twice and cancels nothing."""
    cfg = load_config(practice)
    store = Store(cfg.store.path)
    engine = Engine(store, build_connectors(cfg), cfg)
    from syncbridge.outbox import Outbox

    asyncio.run(Outbox(engine).drain())
    asyncio.run(engine.sync("cal"))
    before = {a.id: a.version for a in store.appointments()}
    sb("resync", "cal", "--config", str(practice), check=True)
    sb("resync", "ehr", "--config", str(practice), check=True)
    report = asyncio.run(engine.sync("cal"))
    asyncio.run(engine.sync("ehr"))
    assert report.created == 0 and report.updated == 0
    assert {a.id: a.version for a in store.appointments()} == before
    assert len(ReplicaVendor(str(tmp_path / "cal.db")).all_items()) == 3


def test_cancel_a_whole_series(tmp_path: Path) -> None:
    """`syncbridge cancel SERIES --series` cancels every future session of a weekly series, and only those."""
    conf = {
        "store": {"path": str(tmp_path / "store.db")},
        "http": {"enabled": False},
        "clinicians": {"dr_lee": {}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    cfg = load_config(path)
    store = Store(cfg.store.path)
    engine = Engine(store, {}, cfg)
    from syncbridge.model import empty_snapshot, iso

    now = datetime.now(UTC).replace(microsecond=0)
    for week in range(-1, 4):
        start = now + timedelta(weeks=week, hours=2)
        snap = empty_snapshot() | {"clinician": "dr_lee", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                                   "timezone": "America/New_York", "series_id": "series-7"}
        engine.change(f"sb-w{week + 1}", snap, via="test")
    assert store.conn.execute("SELECT clinician FROM series WHERE id = 'series-7'").fetchone() == ("dr_lee",)
    done = sb("cancel", "series-7", "--series", "--by", "client", "--config", str(path), check=True)
    assert done.stdout.count(" cancelled ") == 4
    states = {a.id: a.fields["status"] for a in store.appointments()}
    assert states == {"sb-w0": "booked", "sb-w1": "cancelled", "sb-w2": "cancelled", "sb-w3": "cancelled", "sb-w4": "cancelled"}


def test_version_says_whether_the_engine_is_compiled() -> None:
    """`syncbridge --version` names the version and whether this install's engine was compiled."""
    from importlib import metadata
    from importlib.machinery import EXTENSION_SUFFIXES

    import syncbridge.engine

    done = sb("--version", check=True)
    compiled = (syncbridge.engine.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))
    assert done.stdout.startswith(f"syncbridge {metadata.version('syncbridge')}, engine ")
    assert ("engine compiled" in done.stdout) == compiled
    assert ("engine interpreted" in done.stdout) != compiled


@pytest.mark.parametrize("full", [False, True])
def test_check_says_how_billing_is_found_in_the_ehr(tmp_path: Path, full: bool) -> None:
    """`syncbridge check` tells the admin how this EHR's charges and claims will be found: plain
    searches where the server shows no _revinclude, one search where its CapabilityStatement lists it."""
    from syncbridge_connectors.fhir.emulator import FHIREmulator, running

    emulator = FHIREmulator(static_token="check-token")
    if full:
        emulator.full()
    server = running(emulator)
    try:
        emulator.put({"resourceType": "Practitioner", "id": "pr-1"})
        (tmp_path / "token").write_text("check-token")
        conf = {
            "store": {"path": str(tmp_path / "store.db")},
            "http": {"enabled": False},
            "clinicians": {"dr_lee": {"accounts": {"ehr": {"practitioner": "Practitioner/pr-1"}}}},
            "connectors": {"ehr": {"type": "fhir", "base_url": server.base_url, "auth": "static", "token": {"file": str(tmp_path / "token")}}},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(conf))
        done = sb("check", "--config", str(path), check=True)
        if full:
            assert "billing discovery: one search with _revinclude" in done.stdout
        else:
            assert "billing discovery: plain searches (Encounter, then ChargeItem and Claim)" in done.stdout
            assert "serves no CapabilityStatement" in done.stdout
    finally:
        server.stop()


@pytest.mark.slow
def test_demo_tells_what_each_system_got_and_cleans_up(tmp_path: Path) -> None:
    """`syncbridge demo` names what each system holds (sessions, or a directory's dates of free slots),
    and removes its temporary folder, store and key included, when it stops."""
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "demo", "--no-wait"], cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offers free slots on" in done.stdout and " sessions" in done.stdout and "events into" not in done.stdout
    assert "cancelled in" in done.stdout and "billing in" in done.stdout
    assert list(tmp_path.glob("syncbridge-demo-*")) == []
