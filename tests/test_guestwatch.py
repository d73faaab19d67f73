"""A lab guest whose kernel hangs in its own boot is stopped early and booted once more.

Debian's 7.3 once hung while bringing up its secondary CPUs in the kernel lab (a CI run):
the guest spun a host CPU until the lab's 20-minute timeout and every test of that kernel
failed.  No guest is booted here: each "guest" is a shell in a session of its own, as vng
is, that either never begins its script or does."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import guest
import guestwatch
from lab import vm as lab_vm
from syslab import vm as syslab_vm


def _gone(pgid: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_guest_whose_script_never_begins_is_stopped_at_the_boot_limit(
        tmp_path: Path) -> None:
    marker = tmp_path / "results.json"
    proc = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
    began = time.monotonic()
    waited = guestwatch.wait(proc, guestwatch.mtime(marker), began=began, timeout=120,
                             boot_limit=1.0)
    assert waited == guestwatch.Waited(None, "boot")
    assert time.monotonic() - began < 30
    assert _gone(proc.pid), "the guest's 'sleep 600' outlived its stop"


def test_a_guest_that_began_runs_past_the_boot_limit_until_it_ends(tmp_path: Path) -> None:
    marker = tmp_path / "results.json"
    proc = subprocess.Popen(["sh", "-c", f"touch {marker}; sleep 2"], start_new_session=True)
    waited = guestwatch.wait(proc, guestwatch.mtime(marker), began=time.monotonic(),
                             timeout=120, boot_limit=0.5)
    assert waited == guestwatch.Waited(0, None)


def test_the_overall_deadline_still_stops_a_guest_that_began(tmp_path: Path) -> None:
    marker = tmp_path / "results.json"
    proc = subprocess.Popen(["sh", "-c", f"touch {marker}; sleep 600"],
                            start_new_session=True)
    waited = guestwatch.wait(proc, guestwatch.mtime(marker), began=time.monotonic(),
                             timeout=1.5, boot_limit=60)
    assert waited == guestwatch.Waited(None, "timeout")
    assert _gone(proc.pid)


@pytest.fixture(autouse=True)
def _look_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestwatch, "POLL", 0.1)


def _fake_vng(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hangs: int) -> Path:
    """``lab.vm`` boots a shell instead of vng: the first ``hangs`` boots print a kernel
    line and hang, later ones write the results file and end."""
    boots = tmp_path / "boots"

    def command(kernel: Path, outdir: Path) -> list[str]:
        results = json.dumps({"checks": {"env": {"ok": True, "data": {}}}, "done": True})
        script = (f"echo x >> {boots}; echo '[    0.6] smp: Bringing up secondary CPUs'; "
                  f"if [ $(wc -l < {boots}) -le {hangs} ]; then exec sleep 600; fi; "
                  f"printf '%s' '{results}' > {outdir}/results.json")
        return ["sh", "-c", script]

    monkeypatch.setattr(lab_vm, "vng_command", command)
    monkeypatch.setattr(lab_vm, "BOOT_LIMIT", 1.0)
    return boots


def test_the_kernel_lab_boots_a_hung_guest_once_more_and_says_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    boots = _fake_vng(monkeypatch, tmp_path, hangs=1)
    outdir = tmp_path / "out"
    outdir.mkdir()
    run = lab_vm.boot(Path("/boot/vmlinuz-7.3"), outdir, timeout=120)
    assert boots.read_text().count("x") == 2
    assert run.check("env") == {}
    assert "had not begun its checks after 1 s" in run.results["rebooted"]["why"]
    kept = Path(run.results["rebooted"]["first_console"])
    assert kept == outdir / "console-hung.log" and "secondary CPUs" in kept.read_text()
    assert any(n.startswith("booted again") for n in run.results["notes"])


def test_the_kernel_lab_fails_when_the_second_boot_hangs_too(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    boots = _fake_vng(monkeypatch, tmp_path, hangs=2)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(lab_vm.LabError, match="had not begun its checks") as failed:
        lab_vm.boot(Path("/boot/vmlinuz-7.3"), outdir, timeout=120)
    assert "secondary CPUs" in str(failed.value)  # with the console tail
    assert boots.read_text().count("x") == 2


def test_the_systemd_lab_boots_a_hung_guest_once_more_from_the_start(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dirs: list[Path] = []

    def once(suite: str, root: object, outdir: Path, timeout: float,
             skip: object) -> syslab_vm.LabRun:
        dirs.append(outdir)
        if len(dirs) <= hangs:
            raise syslab_vm.BootHang(f"the {suite} lab guest had not begun its checks "
                                     f"after 720 s\nconsole tail: …")
        return syslab_vm.LabRun(suite, {"checks": {}, "done": True, "notes": []}, "", 9.0,
                                outdir)

    monkeypatch.setattr(syslab_vm, "_boot_once", once)
    hangs = 1
    run = syslab_vm.boot("trixie", object(), tmp_path, 100)  # type: ignore[arg-type]
    assert dirs == [tmp_path, tmp_path / "rebooted"]
    assert run.results["rebooted"] == {
        "why": "the trixie lab guest had not begun its checks after 720 s",
        "first_console": str(tmp_path / "console.log")}
    assert run.results["notes"] == [f"booted again: {run.results['rebooted']['why']}"]
    hangs, dirs[:] = 2, []
    (tmp_path / "b").mkdir()
    with pytest.raises(syslab_vm.BootHang):
        syslab_vm.boot("bookworm", object(), tmp_path / "b", 100)  # type: ignore[arg-type]
    assert len(dirs) == 2


def test_the_fresh_kernel_guest_sees_its_script_begin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "BOOT_LIMIT", 1.0)
    output, waited = guest._boot(["sh", "-c", "sleep 600"])
    assert waited == guestwatch.Waited(None, "boot") and output == ""
    output, waited = guest._boot(["sh", "-c", f"echo {guest.BEGAN}; sleep 2; echo done; "
                                              f"echo oops >&2"])
    assert waited == guestwatch.Waited(0, None)
    assert output == f"{guest.BEGAN}\ndone\noops\n"
