"""The shipped unit file: valid for systemd, hardened, and pointing at a command that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "syncbridge.service"
analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed on this machine")
def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze verify` is clean once the install path exists, and the exposure score stays low."""
    exe = Path(sys.executable).with_name("syncbridge")
    text = UNIT.read_text().replace("/opt/syncbridge/venv/bin/syncbridge", str(exe))
    unit = tmp_path / "syncbridge.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "syncbridge.service" in line]
    assert done.returncode == 0 and problems == [], done.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for syncbridge.service: ([\d.]+)", security.stdout).group(1))
    assert score <= 2.0, security.stdout[-2000:]


def test_unit_declares_what_the_readme_promises() -> None:
    """Type=notify, a dynamic user, a state directory, credentials and the main hardening options."""
    text = UNIT.read_text()
    for line in ("Type=notify", "DynamicUser=yes", "StateDirectory=syncbridge", "LoadCredential=", "ProtectSystem=strict",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "SystemCallFilter=@system-service", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "RestartPreventExitStatus=2"):
        assert line in text, line
    assert not re.search(r"^\w+=$", text.replace("CapabilityBoundingSet=\n", "").replace("AmbientCapabilities=\n", ""), re.M), "a directive set to nothing"


def test_example_config_and_unit_name_the_same_credentials() -> None:
    """Every {credential: NAME} config.example.yaml uses is loaded by the unit, so the two, copied as
    shipped, agree (and `check --no-connect`, which resolves every secret, passes)."""
    example = (UNIT.parents[1] / "config.example.yaml").read_text()
    loaded = set(re.findall(r"^LoadCredential=([\w.-]+):", UNIT.read_text(), re.M))
    for line in example.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for name in re.findall(r"\{credential: ([\w.-]+)\}", line.split(" #")[0]):
            assert name in loaded, f"config.example.yaml uses credential {name!r}, which the unit does not load"
