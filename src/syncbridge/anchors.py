"""Audit anchors: the hash chain's head, signed with a key the store does not hold, kept outside it.

The chain alone (audit.py) shows an edited or removed entry to anyone who did not recompute it,
but its head lives in the same file, so someone able to write the store can edit an entry and
recompute every hash after it. Every ``audit.anchor_interval`` seconds (and at shutdown) the
daemon therefore writes an *anchor*: the head's sequence number and hash, signed with
HMAC-SHA256 under ``audit.key`` (a secret reference, typically a systemd credential), as a line
in the journal (``event: audit_anchor``) and, when ``audit.anchor_file`` is set, appended to that
file (make it append-only: ``chattr +a``, or on another host). ``syncbridge audit --verify``
checks the chain and then every anchor: a recomputed chain no longer has the anchored hashes, a
truncated log ends before the last anchor, a swapped store matches none, and an anchor forged
without the key fails its signature. What it cannot show: entries written after the last anchor
(at most one interval) rewritten by someone who can write the store, or anchors deleted by
someone who can write where they are kept (the journal and an append-only file resist that).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["EVENT", "Anchor", "AnchorCheck", "append_anchor", "check_anchors", "make_anchor", "read_anchors"]

EVENT = "audit_anchor"


def _mac(key: str, seq: int, head: str) -> str:
    return hmac.new(key.encode(), f"syncbridge-audit-anchor\x1f{seq}\x1f{head}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Anchor:
    at: str
    seq: int
    hash: str
    mac: str | None

    def line(self) -> str:
        return json.dumps({"event": EVENT, "at": self.at, "seq": self.seq, "hash": self.hash, "mac": self.mac}, sort_keys=True)


def make_anchor(seq: int, head: str, key: str | None) -> Anchor:
    """The anchor of a chain whose last entry is ``seq`` with hash ``head``."""
    return Anchor(datetime.now(UTC).isoformat(timespec="seconds"), seq, head, _mac(key, seq, head) if key else None)


def read_anchors(lines: Iterable[str]) -> list[Anchor]:
    """Anchors among lines of JSON: the anchor file, or the daemon's journal (other lines skipped)."""
    out: list[Anchor] = []
    for line in lines:
        start = line.find("{")
        if start < 0 or EVENT not in line:
            continue
        try:
            data: Any = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("event") == EVENT and isinstance(data.get("seq"), int) and isinstance(data.get("hash"), str):
            out.append(Anchor(str(data.get("at", "")), data["seq"], data["hash"], data.get("mac")))
    return out


@dataclass(frozen=True, slots=True)
class AnchorCheck:
    ok: bool
    anchors: int
    problem: str = ""


def check_anchors(anchors: list[Anchor], hash_at: dict[int, str], head_seq: int, key: str | None) -> AnchorCheck:
    """Does the store's chain (``hash_at``: entry number -> its hash, already verified as a chain)
    still hold what was anchored? Says which tampering it sees, first found first."""
    for n, a in enumerate(anchors, 1):
        if key is not None and (a.mac is None or not hmac.compare_digest(a.mac, _mac(key, a.seq, a.hash))):
            return AnchorCheck(False, n - 1, f"anchor {n} (of {a.at}, entry {a.seq}) has no valid signature: the anchors were forged or altered, or audit.key is not the key they were written with")
    for n, a in enumerate(anchors, 1):
        if a.seq > head_seq:
            return AnchorCheck(False, n - 1, f"the log ends at entry {head_seq} but the anchor of {a.at} records entry {a.seq}: entries were removed from the end (or an older copy of the store was put back)")
        if hash_at.get(a.seq) != a.hash:
            if n == 1 and a.seq == min((x.seq for x in anchors), default=a.seq):
                return AnchorCheck(False, 0, f"entry {a.seq} is not what the anchor of {a.at} records: the log was rewritten up to there, or this is not the store that was anchored (a swapped file)")
            return AnchorCheck(False, n - 1, f"entry {a.seq} is not what the anchor of {a.at} records: the log was rewritten (an entry changed and the chain recomputed) at or before entry {a.seq}")
    return AnchorCheck(True, len(anchors))


def append_anchor(path: Path, anchor: Anchor) -> None:
    """Append one line; the file is opened for appending only (an append-only file accepts nothing else)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(anchor.line() + "\n")
