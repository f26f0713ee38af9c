"""Audit anchors kept outside the store: a chain recomputed without the key, a truncated tail, a
swapped store and a forged anchor are each found, and said apart (`syncbridge audit --verify`)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from syncbridge.anchors import append_anchor, check_anchors, make_anchor, read_anchors
from syncbridge.audit import GENESIS, entry_hash
from syncbridge.store import Store
from tests.support.daemon import ROOT

KEY = "audit-key-known-only-to-systemd"


def _store(path: Path, entries: int) -> Store:
    store = Store(path)
    with store.tx() as tx:
        for i in range(entries):
            tx.audit.add(f"2026-12-07T10:00:{i:02d}Z", "applied", "ehr", f"sb-{i}", {"version": i})
    return store


def _anchor(store: Store, anchors: Path, key: str | None = KEY) -> None:
    head = store.audit_head()
    assert head is not None
    append_anchor(anchors, make_anchor(head[0], head[1], key))


def _rewrite(path: Path, seq: int, detail: str) -> None:
    """What someone who can write the store but lacks the key does: change an entry, recompute the chain."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT seq, at, kind, connector, appointment_id, detail FROM audit ORDER BY seq").fetchall()
        prev = GENESIS
        for s, at, kind, conn_name, appt, text in rows:
            text = detail if s == seq else text
            digest = entry_hash(prev, s, at, kind, conn_name, appt, text)
            conn.execute("UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?", (text, prev, digest, s))
            prev = digest
        conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rows[-1][0], prev))


def _check(store: Store, anchors: Path, key: str | None = KEY) -> tuple[bool, str]:
    found = read_anchors(anchors.read_text().splitlines())
    head = store.audit_head()
    result = check_anchors(found, store.audit_hashes(a.seq for a in found), head[0] if head else 0, key)
    return result.ok, result.problem


def test_untouched_log_matches_its_anchors(tmp_path: Path) -> None:
    """A log written on after its anchors still matches every one of them."""
    store = _store(tmp_path / "s.db", 5)
    _anchor(store, tmp_path / "anchors")
    with store.tx() as tx:
        tx.audit.add("2026-12-07T11:00:00Z", "applied", "ehr", "sb-9", {})
    _anchor(store, tmp_path / "anchors")
    assert _check(store, tmp_path / "anchors") == (True, "")
    assert store.verify_audit().ok


def test_chain_recomputed_without_the_key_is_found(tmp_path: Path) -> None:
    """An entry changed and every hash after it recomputed: the chain verifies, the anchors do not."""
    store = _store(tmp_path / "s.db", 8)
    _anchor(store, tmp_path / "anchors")
    store.close()
    _rewrite(tmp_path / "s.db", 3, '{"version":"forged"}')
    store = Store(tmp_path / "s.db")
    assert store.verify_audit().ok  # the chain alone cannot see it
    ok, problem = _check(store, tmp_path / "anchors")
    assert not ok and "the log was rewritten" in problem and "entry 8" in problem


def test_truncated_tail_is_found(tmp_path: Path) -> None:
    """Entries removed from the end and the head set back: the last anchor names an entry that is gone."""
    store = _store(tmp_path / "s.db", 6)
    _anchor(store, tmp_path / "anchors")
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("DELETE FROM audit WHERE seq > 4")
        conn.execute("UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit WHERE seq = 4) WHERE id = 1")
    store = Store(tmp_path / "s.db")
    assert store.verify_audit().ok
    ok, problem = _check(store, tmp_path / "anchors")
    assert not ok and "entries were removed from the end" in problem


def test_swapped_store_is_found(tmp_path: Path) -> None:
    """Another store put in the place of the anchored one matches none of its anchors."""
    store = _store(tmp_path / "s.db", 4)
    _anchor(store, tmp_path / "anchors")
    other = Store(tmp_path / "other.db")
    with other.tx() as tx:
        for i in range(6):
            tx.audit.add(f"2026-12-08T10:00:{i:02d}Z", "observed", "cal", f"sb-x{i}", {})
    ok, problem = _check(other, tmp_path / "anchors")
    assert not ok and "not the store that was anchored" in problem


def test_anchor_forged_without_the_key_is_found(tmp_path: Path) -> None:
    """Whoever rewrites the log and writes a matching anchor without the key fails the signature check."""
    store = _store(tmp_path / "s.db", 5)
    store.close()
    _rewrite(tmp_path / "s.db", 2, '{"version":"forged"}')
    store = Store(tmp_path / "s.db")
    _anchor(store, tmp_path / "anchors", key="a-guess")
    ok, problem = _check(store, tmp_path / "anchors")
    assert not ok and "no valid signature" in problem


@pytest.mark.parametrize("tamper", ["rewrite", "truncate"])
def test_cli_verify_fails_and_says_which(tmp_path: Path, tamper: str) -> None:
    """`syncbridge audit --verify` with the anchors exits 1 and names what it found; 0 before."""
    store = _store(tmp_path / "s.db", 6)
    anchors = tmp_path / "anchors.log"
    _anchor(store, anchors)
    store.close()
    (tmp_path / "audit-key").write_text(KEY)
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({"store": {"path": str(tmp_path / "s.db")},
                                    "audit": {"key": {"file": str(tmp_path / "audit-key")}, "anchor_file": str(anchors)}}))

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "syncbridge.cli", "audit", "--verify", "--config", str(conf)], cwd=ROOT,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)

    good = verify()
    assert good.returncode == 0 and "1 anchors" in good.stdout and "key checked" in good.stdout, good.stdout + good.stderr
    shutil.copy(tmp_path / "s.db", tmp_path / "before.db")
    if tamper == "rewrite":
        _rewrite(tmp_path / "s.db", 2, '{"version":"forged"}')
        said = "the log was rewritten"
    else:
        with sqlite3.connect(tmp_path / "s.db") as conn:
            conn.execute("DELETE FROM audit WHERE seq > 3")
            conn.execute("UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit WHERE seq = 3) WHERE id = 1")
        said = "entries were removed from the end"
    bad = verify()
    assert bad.returncode == 1 and said in bad.stderr, bad.stdout + bad.stderr
