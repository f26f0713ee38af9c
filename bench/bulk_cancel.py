"""Benchmark: a clinician's three days (30 sessions) cancelled in bulk across all five systems.

    .venv/bin/python bench/bulk_cancel.py --latency 0.05

Clients book 30 sessions in the directory (each then lives in the directory, the EHR and three
calendars; billing staff add an Encounter, a charge and a draft claim to each), then
``syncbridge bulk cancel`` runs beside the daemon. Every system answers each request after
``--latency`` seconds. Printed: seconds until the record changed, every copy was seen gone in its
system, every claim was seen suppressed in the EHR and the directory offered the freed hours
again; HTTP requests per system and API calls by kind where a sandbox counts them (batch parts
one by one). The scenario is tests/support/bulk_scenario.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncbridge.logging import configure  # noqa: E402
from tests.support.bulk_scenario import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every API request (default 0.05)")
    args = ap.parse_args()
    configure("warning", json_logs=False)
    with tempfile.TemporaryDirectory(prefix="sb-bulk-") as tmp:
        out = run(Path(tmp), latency=args.latency, timeout=600)
    print(f"{out.sessions} sessions cancelled in bulk at {args.latency * 1000:.0f} ms per request")
    print("seconds from the command: " + ", ".join(f"{k} {v:.1f}" for k, v in out.seconds.items()))
    print(f"HTTP requests: {sum(out.requests.values())} in all; " + ", ".join(f"{k} {v}" for k, v in sorted(out.requests.items())))
    for name, kinds in sorted(out.calls.items()):
        print(f"{name} API calls: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
