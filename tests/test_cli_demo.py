"""``pinwarden demo``: the README's first command.

Off libvirt it plans on the bundled example host and leaves nothing behind; on this root
host with a real libvirtd it starts an exclusive and a shared tiny VM through pinwarden,
shows status and a clean audit, and removes them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libvirt_env import PREFIX, QEMU_LOGS, Pinwarden, cleanup_domain, machine_restored
from pinwarden.cli.demo import DEMO_EXCLUSIVE, DEMO_SHARED

PINWARDEN = str(Path(sys.executable).with_name("pinwarden"))
pytest_plugins = ["libvirt_env"]


def test_offline_demo_plans_on_the_example_host(tmp_path: Path) -> None:
    state = tmp_path / "untouched"
    proc = subprocess.run([PINWARDEN, "demo", "--offline"], capture_output=True, text=True,
                          timeout=120, env={"PINWARDEN_STATE_DIR": str(state), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the steps a user would type, in order
    steps = [line for line in out.splitlines() if line.startswith("$ pinwarden ")]
    assert [s.split()[2] for s in steps] == ["host", "reserve", "plan", "status"]
    assert "partition isolcpus: VM CPUs 2-7,10-15, housekeeping CPUs 0-1,8-9" in out
    # the exclusive VM (4 vCPUs, threads=isolate) fits one NUMA node: cores 4-7 of node 1,
    # siblings 12-15 held empty; the shared VM gets what is left of the VM CPUs
    assert "leased 4-7,12-15" in out
    assert "A leased to qemu domain 'pwdemo-exclusive' (4-7)" in out
    assert "a held empty for qemu domain 'pwdemo-exclusive': sibling threads of its cores " \
           "(12-15)" in out
    shared = out[out.index("pwdemo-shared (shared)"):]
    assert "vcpu0      2-3,10-11" in shared
    assert not state.exists(), "the offline demo must use a throw-away ledger"


@pytest.mark.libvirt
def test_live_demo_starts_exclusive_and_shared_vms(virt: Any, tmp_path: Path) -> None:
    pw = Pinwarden.make(tmp_path, f"{PREFIX}demo.partition")
    with machine_restored():
        _live_demo(pw, virt)


def _live_demo(pw: Pinwarden, conn: Any) -> None:
    try:
        # --dry-run says what it would do and changes nothing: no domain, no state
        dry = subprocess.run(
            [PINWARDEN, "demo", "--dry-run", "--state-dir", str(pw.state), "--config",
             str(pw.config)], capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, f"{dry.stdout}\n{dry.stderr}"
        assert dry.stdout.startswith("pinwarden demo: libvirt answers at ")
        assert "would change this host" in dry.stdout and "nothing was changed" in dry.stdout
        assert [line.split()[2] for line in dry.stdout.splitlines()
                if line.startswith("$ pinwarden ")] == ["host", "plan", "plan"]
        assert not {d.name() for d in conn.listAllDomains()} & {DEMO_EXCLUSIVE, DEMO_SHARED}
        assert not pw.state.exists()
        proc = subprocess.run(
            [PINWARDEN, "demo", "--state-dir", str(pw.state), "--config", str(pw.config)],
            capture_output=True, text=True, timeout=300)
        out = proc.stdout
        assert proc.returncode == 0, f"{out}\n{proc.stderr}"
        # it says what it will change before changing anything
        assert out.startswith("pinwarden demo: libvirt answers at ") and \
            out.index("changes this host") < out.index("$ pinwarden define")
        steps = [line.split()[2] for line in out.splitlines() if line.startswith("$ pinwarden ")]
        assert steps == ["host", "define", "define", "start", "start", "status", "audit",
                         "stop", "stop"]
        assert f"started {DEMO_EXCLUSIVE} (exclusive on CPU 1)" in out
        assert f"started {DEMO_SHARED} (shared on CPU 0)" in out
        assert f"A leased to qemu domain '{DEMO_EXCLUSIVE}'" in out
        # and the demo cleaned up: no domain, no lease
        names = {d.name() for d in conn.listAllDomains()}
        assert not names & {DEMO_EXCLUSIVE, DEMO_SHARED}
        status = subprocess.run(pw.cmd("status", "--json"), capture_output=True, text=True,
                                timeout=60)
        assert json.loads(status.stdout)["leases"] == []
    finally:
        for name in (DEMO_SHARED, DEMO_EXCLUSIVE):  # with the logs libvirt keeps
            cleanup_domain(conn, name)
        pw.cleanup()
    assert not [n for n in (DEMO_SHARED, DEMO_EXCLUSIVE) if (QEMU_LOGS / f"{n}.log").exists()]
