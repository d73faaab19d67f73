#!/usr/bin/env python3
"""What pinwarden adds to starting a VM: medians of repeated starts, as JSON.

Compared, on the real libvirtd + QEMU of this host (tiny diskless domains):

* ``virsh_start``              plain ``virsh start`` of an unpinned domain, no hook;
* ``pinwarden_start_shared``   ``pinwarden start`` of the same domain;
* ``pinwarden_start_exclusive`` ``pinwarden start`` of a domain exclusive on one CPU
                               (lease, cgroup layout, createXML, verification);
* ``virsh_start_hooked``       plain ``virsh start`` of the unpinned domain with the hook;
* ``virsh_start_hooked_exclusive`` the same for the exclusive domain (hook leases it);
* ``hook_prepare``             one ``pinwarden hook run … prepare`` by itself.

Each start is followed by a stop that is not timed; the cases of a phase alternate run by
run after one warm-up each.  Ratios are against ``virsh_start``.
Needs root; for the hooked runs libvirtd must be started by this script (it restarts it
to make libvirtd notice the hook, and again at the end to forget it).

    .venv/bin/python bench/start_overhead.py --runs 7
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

env: Any = importlib.import_module("libvirt_env")  # the tests' libvirtd + domain helpers

SHARED, EXCLUSIVE_VM = "pwtest-bench-s", "pwtest-bench-x"
TREE = "pwtest-bench.partition"


Case = tuple[str, Callable[[], None], Callable[[], None]]  # name, start (timed), stop


def timed(runs: int, cases: list[Case]) -> dict[str, list[float]]:
    """Round-robin over the cases (so a change of host load hits them alike), after one
    untimed warm-up start of each."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _, start, stop in cases:
        start()
        stop()
    for _ in range(runs):
        for name, start, stop in cases:
            t0 = time.perf_counter()
            start()
            out[name].append(time.perf_counter() - t0)
            stop()
    return out


def must(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, proc.args))} failed: "
                         f"{proc.stderr.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if env.libvirt is None:
        raise SystemExit("bench: libvirt-python is missing (pip install -e '.[libvirt]')")
    env.libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    (env.RUN / "libvirt").mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pinwarden-bench-"))
    daemons = env.Daemons(log_dir=base)
    for daemon in env.DAEMONS:
        if env.running_pid(daemon) is None:
            daemons.start(daemon)
    pw = env.Pinwarden.make(base, TREE)
    times: dict[str, list[float]] = {}
    conn = env.libvirt.open(env.URI)
    try:
        with env.machine_restored():
            conn.defineXML(env.tiny_domain_xml(SHARED))
            xml = base / "x.xml"
            xml.write_text(env.tiny_domain_xml(EXCLUSIVE_VM, exclusive=True,
                                               vcpupins={0: "1"}))
            must(pw.run("define", str(xml)))  # stores the partition for hooked starts

            def virsh_start(name: str) -> Callable[[], None]:
                return lambda: must(env.virsh("start", name))

            def virsh_destroy(name: str) -> Callable[[], None]:
                return lambda: must(env.virsh("destroy", name))

            def pw_start(name: str) -> Callable[[], None]:
                return lambda: must(pw.run("start", name))

            def pw_stop(name: str) -> Callable[[], None]:
                return lambda: must(pw.run("stop", name))

            times.update(timed(args.runs, [
                ("virsh_start", virsh_start(SHARED), virsh_destroy(SHARED)),
                ("pinwarden_start_shared", pw_start(SHARED), pw_stop(SHARED)),
                ("pinwarden_start_exclusive", pw_start(EXCLUSIVE_VM), pw_stop(EXCLUSIVE_VM)),
            ]))
            prepare = [sys.executable, "-m", "pinwarden.cli.vm", "hook", "run",
                       "--state-dir", str(pw.state), "--config", str(pw.config), "qemu",
                       SHARED, "prepare", "begin", "-"]
            domain_xml = env.tiny_domain_xml(SHARED)
            times.update(timed(args.runs, [(
                "hook_prepare",
                lambda: must(subprocess.run(prepare, input=domain_xml, text=True,
                                            capture_output=True)),
                lambda: None)]))
            if daemons.owns("libvirtd"):
                must(pw.run("hook", "install"))
                try:
                    daemons.restart_libvirtd()
                    times.update(timed(args.runs, [
                        ("virsh_start_hooked", virsh_start(SHARED), virsh_destroy(SHARED)),
                        ("virsh_start_hooked_exclusive", virsh_start(EXCLUSIVE_VM),
                         virsh_destroy(EXCLUSIVE_VM)),
                    ]))
                finally:
                    must(pw.run("hook", "uninstall"))
                    daemons.restart_libvirtd()
                    conn = env.libvirt.open(env.URI)
    finally:
        for name in (SHARED, EXCLUSIVE_VM):
            env.cleanup_domain(conn, name)
        with contextlib.suppress(Exception):
            conn.close()
        pw.cleanup()
        for daemon in reversed(env.DAEMONS):
            daemons.stop(daemon)
    medians = {k: round(statistics.median(v), 4) for k, v in times.items()}
    base_time = medians["virsh_start"]
    report = {
        "runs": args.runs,
        "median_s": medians,
        "ratio_vs_virsh_start": {k: round(v / base_time, 2) for k, v in medians.items()
                                 if k != "hook_prepare"},
        "hooked_runs": "virsh_start_hooked" in medians,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
