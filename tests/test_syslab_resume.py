"""The systemd lab survives one emulator race and nothing else: a guest whose kernel
stopped on ``Oops: int3`` (TCG cross-modifying code; the console captured from a trixie run
in tests/data/syslab), or that stalled (no check finished for a long time), is booted again
for the checks without a result, and the results of both boots are merged; the suites boot
in background threads.  No guest is booted here (the stall watchdog waits for a ``sleep``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from syslab.vm import SETUP_CHECKS, LabRun, merged, resumable

DATA = Path(__file__).resolve().parent / "data" / "syslab"


def _run(console: str, checks: dict[str, object], done: bool, outdir: str) -> LabRun:
    return LabRun("trixie", {"checks": checks, "done": done, "notes": []}, console, 600.0,
                  Path(outdir))


def test_a_guest_that_stopped_on_the_int3_race_runs_the_remaining_checks_again() -> None:
    console = (DATA / "trixie-int3-oops.console").read_text()
    assert "Kernel panic" in console  # what the captured guest really did
    ok = {"ok": True, "data": {}}
    first = _run(console, {"boot": ok, "env": ok, "install": ok, "story": ok}, False, "/a")
    assert resumable(first) == ["story"]  # set-up checks run again, story does not
    second = _run("… done", {"boot": ok, "env": ok, "install": ok,
                             "story_isolcpus": ok, "story_lxc": ok}, True, "/a/resumed")
    both = merged(first, second)
    assert set(both.results["checks"]) == {"boot", "env", "install", "story",
                                           "story_isolcpus", "story_lxc"}
    assert both.results["done"] and both.results["notes"] == []
    assert both.results["resumed"]["kept"] == ["story"]
    assert both.results["resumed"]["first_console"] == "/a/console.log"
    assert both.seconds == 1200.0
    assert set(SETUP_CHECKS) == {"boot", "env", "install"}


def test_any_other_stop_is_not_resumed() -> None:
    ok = {"ok": True, "data": {}}
    panic = "[  827.1] Kernel panic - not syncing: Fatal exception\n"
    assert resumable(_run(panic, {"boot": ok}, False, "/b")) is None  # another crash
    oops = (DATA / "trixie-int3-oops.console").read_text()
    assert resumable(_run(oops, {"boot": ok}, True, "/c")) is None  # it finished anyway


def test_a_stalled_guest_is_stopped_and_resumed_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A guest whose results file stops changing is stopped (its whole process group) and,
    having results, resumed with the same skips as after the race; the merged results say
    why."""
    import subprocess
    import time

    from syslab import vm

    monkeypatch.setattr(vm, "STALL", 1.0)
    result = tmp_path / "results.json"
    result.write_text("{}")
    proc = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
    began = time.monotonic()
    rc, stopped = vm._wait(proc, result, began + 120, poll=0.1)
    assert (rc, stopped) == (None, "stall") and time.monotonic() - began < 30
    assert proc.poll() is not None  # killed, with its child (the process group):
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the guest's 'sleep 600' outlived the stall"
        time.sleep(0.1)
    ok = {"ok": True, "data": {}}
    first = _run("[  99.0] systemd[1]: Started …\n", {"boot": ok, "env": ok, "install": ok,
                                                      "hooks": ok}, False, "/s")
    first.results["stalled"] = True
    assert resumable(first) == ["hooks"]
    second = _run("… done", {"boot": ok, "env": ok, "install": ok, "story": ok}, True,
                  "/s/resumed")
    assert "stalled" in merged(first, second).results["resumed"]["why"]
    # a guest that keeps finishing checks is left alone until it ends
    proc = subprocess.Popen(["sh", "-c", f"for i in 1 2 3 4 5 6; do sleep 0.4; "
                                         f"touch -d @$i {result}; done"],
                            start_new_session=True)
    assert vm._wait(proc, result, time.monotonic() + 120, poll=0.1) == (0, None)


def test_background_boots_run_once_and_hand_their_result_or_failure_to_the_tests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``vm.start`` boots each suite once in a thread (the session calls it after
    collection); ``lab_run`` waits for it and returns the run, or raises a LabError — also
    for a host-side bug, which must not die silently with its thread."""
    from syslab import vm

    monkeypatch.setattr(vm, "_BOOTS", {})
    monkeypatch.setattr(vm, "_RUNS", {})
    calls: list[str] = []
    release = threading.Event()

    def fake(suite: str) -> LabRun:
        calls.append(suite)
        release.wait(10)
        if suite == "trixie":
            raise RuntimeError("a bug on the host side")
        return _run("done", {}, True, f"/{suite}")

    monkeypatch.setattr(vm, "_run_suite", fake)
    vm.start(["bookworm", "trixie"])
    vm.start(["bookworm"])  # already booting: not again
    assert all(vm._BOOTS[s].is_alive() for s in ("bookworm", "trixie"))  # in the background
    release.set()
    assert vm.lab_run("bookworm").outdir == Path("/bookworm")
    assert vm.lab_run("bookworm") is vm.lab_run("bookworm")
    with pytest.raises(vm.LabError, match="trixie lab run failed on the host: RuntimeError"):
        vm.lab_run("trixie")
    assert sorted(calls) == ["bookworm", "trixie"]
