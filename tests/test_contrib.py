"""contrib/: the systemd units pass ``systemd-analyze verify`` as installed the way README.md
says (pinwarden in /opt/pinwarden, the man page installed), and say what the README says."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
UNITS = ("pinwarden.service", "pinwarden-metrics.service", "pinwarden-metrics.timer")
EXE = "/opt/pinwarden/bin/pinwarden"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(CONTRIB / name)
    return parser


@pytest.fixture(scope="module")
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing (package systemd; make test installs it)")
    return found


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    """A root as README.md's installation leaves it: the units in /etc/systemd/system, the
    executable in /opt/pinwarden/bin, the distribution's units (sysinit.target …); and a
    MANPATH with the generated man page."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(CONTRIB / name, units / name)
    exe = root / EXE.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    proc = subprocess.run([str(REPO / "scripts/manpage"), str(man / "man1/pinwarden.1")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BIN": str(Path(sys.executable).parent)})
    assert proc.returncode == 0, proc.stderr
    return root, man


def verify(analyze: str, root: Path, man: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", f"--root={root}", *UNITS], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MANPATH": str(man),
                                                       "SYSTEMD_LOG_COLOR": "0"})


def test_units_verify_clean(analyze: str, installed: tuple[Path, Path]) -> None:
    """No error and no warning: systemd-analyze exits 0 on an unknown key, but says so."""
    root, man = installed
    proc = verify(analyze, root, man)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_verify_would_catch_mistakes(analyze: str, installed: tuple[Path, Path]) -> None:
    """The check above can fail: a missing executable, a missing man page, an unknown key."""
    root, man = installed
    (root / EXE.lstrip("/")).unlink()
    proc = verify(analyze, root, man)
    assert proc.returncode != 0 and f"Command {EXE} is not executable" in proc.stderr
    proc = verify(analyze, root, man / "nowhere")
    assert "man pinwarden(1)" in proc.stderr
    service = root / "etc/systemd/system/pinwarden.service"
    service.write_text(service.read_text().replace("[Service]\n", "[Service]\nFrobnicate=1\n"))
    assert "Unknown key" in verify(analyze, root, man).stderr


def test_daemon_unit_as_the_readme_installs_it() -> None:
    service = unit("pinwarden.service")
    assert service.get("Service", "ExecStart") == f"{EXE} daemon"
    assert service.get("Service", "StateDirectory") == "pinwarden"  # created before the start
    assert "/var/lib/pinwarden" not in service.get("Service", "ReadWritePaths", fallback="")
    assert service.get("Unit", "Documentation") == "man:pinwarden(1)"
    # after the libvirt daemons, pulling none in: 'Wants=libvirtd.service' started the
    # libvirtd an operator had disabled for virtqemud (trixie lab)
    assert set(service.get("Unit", "After").split()) == {
        "libvirtd.service", "virtqemud.service", "virtlxcd.service"}
    for key in ("Wants", "Requires", "BindsTo", "Requisite"):
        assert not service.has_option("Unit", key), key
    readme = (REPO / "README.md").read_text()
    assert f"python3 -m venv --system-site-packages {Path(EXE).parent.parent}" in readme
    assert "contrib/pinwarden.service" in readme and "make install-man" in readme


def test_metrics_timer_runs_the_metrics_service() -> None:
    service = unit("pinwarden-metrics.service")
    assert service.get("Service", "ExecStart").startswith(f"{EXE} metrics --textfile ")
    assert service.get("Service", "ExecStart").endswith(".prom")
    assert service.get("Service", "Type") == "oneshot"
    timer = unit("pinwarden-metrics.timer")
    assert timer.get("Install", "WantedBy") == "timers.target"
