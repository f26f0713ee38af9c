"""The contract suite against the file-backed test system, as mirror and as record.

This proves the suite and the engine independently of any vendor; the product connectors run
the same suite against their emulators and real servers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.contract.suite import ConnectorContract, Harness
from tests.support.replica import ReplicaVendor


class TestReplicaMirror(ConnectorContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        path = str(tmp_path / "replica.db")
        return Harness({"type": "tests.support.replica:ReplicaConnector", "path": path, "role": "mirror"}, {}, ReplicaVendor(path))


class TestReplicaRecord(ConnectorContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        path = str(tmp_path / "replica.db")
        return Harness({"type": "tests.support.replica:ReplicaConnector", "path": path, "role": "record"}, {}, ReplicaVendor(path))
