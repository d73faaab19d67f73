#!/usr/bin/env python3
"""What pinwarden adds to starting a VM: medians of repeated starts, as JSON.

Compared on the real libvirtd + QEMU of this host (tiny diskless domains), every case
interleaved with every other, round by round, in one run (so load changes hit them alike):

* ``virsh_start``                   plain ``virsh start`` of an unpinned domain, no hook;
* ``virsh_start_hooked``            the same through pinwarden's hook, the daemon running
                                    (the hook client hands each call to it: the deployment
                                    the README describes);
* ``virsh_start_hooked_no_daemon``  the same without the daemon (the client runs the full
                                    hook command);
* ``virsh_start_hooked_exclusive``  plain ``virsh start`` of a domain exclusive on one CPU,
                                    hook and daemon (the hook leases its CPU);
* ``pinwarden_start_shared``        ``pinwarden start`` of the unpinned domain (hook and
                                    daemon installed, as deployed: the daemon does the
                                    start, see libvirt/startserver.py);
* ``pinwarden_start_shared_no_daemon``  the same with ``--no-daemon`` (the command starts
                                    the domain itself; the hook still goes to the daemon);
* ``pinwarden_start_exclusive``     ``pinwarden start`` of the exclusive domain;
* ``hook_prepare``                  one full ``pinwarden hook run … prepare`` by itself,
  ``hook_prepare_client``           and the same call through the client and the daemon.

Each start is followed by a stop that is not timed.  The hook is switched off for the
plain case by moving the drop-in out of ``qemu.d`` (libvirt lists that directory at every
call), the daemon by renaming its socket.  Ratios are against ``virsh_start``: the ratio of
the medians (what the goals judge), and the median of each round's own ratio (a round runs
every case back to back, so this one cancels load that drifts between rounds).  Needs root
and a libvirtd this script starts itself (it restarts it to make libvirtd notice the hook,
and again at the end to forget it).

    .venv/bin/python bench/start_overhead.py --runs 7
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
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


#: name, set-up (untimed), start (timed), stop (untimed)
Case = tuple[str, Callable[[], None], Callable[[], None], Callable[[], None]]


def timed(runs: int, cases: list[Case]) -> dict[str, list[float]]:
    """Round-robin over the cases (so a change of host load hits them alike), after one
    untimed warm-up start of each."""
    out: dict[str, list[float]] = {name: [] for name, _, _, _ in cases}
    for _, setup, start, stop in cases:
        setup()
        start()
        stop()
    for _ in range(runs):
        for name, setup, start, stop in cases:
            setup()
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if env.libvirt is None:
        raise SystemExit("bench: the libvirt Python binding is missing (make test installs it)")
    env.libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    (env.RUN / "libvirt").mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pinwarden-bench-"))
    daemons = env.Daemons(log_dir=base)
    for daemon in env.DAEMONS:
        if env.running_pid(daemon) is None:
            daemons.start(daemon)
    if not daemons.owns("libvirtd"):
        raise SystemExit("bench: a libvirtd is already running; stop it first (this bench "
                         "restarts libvirtd to install and remove its hook)")
    pw = env.Pinwarden.make(base, TREE)
    drop_in = env.HOOKS_DIR / "qemu.d" / "pinwarden"
    parked = env.HOOKS_DIR / "pinwarden.qemu.off"
    sock, sock_off = pw.state / "hook.sock", pw.state / "hook.sock.off"
    times: dict[str, list[float]] = {}
    conn = env.libvirt.open(env.URI)
    pinwarden_daemon = None
    measured = False
    try:
        with env.machine_restored():
            conn.defineXML(env.tiny_domain_xml(SHARED))
            xml = base / "x.xml"
            xml.write_text(env.tiny_domain_xml(EXCLUSIVE_VM, exclusive=True,
                                               vcpupins={0: "1"}))
            must(pw.run("define", str(xml)))  # stores the partition for hooked starts
            # the full hook, by itself and through the client (measured before libvirt
            # sees the hook)
            prepare = [sys.executable, "-m", "pinwarden.cli.vm", "hook", "run",
                       "--state-dir", str(pw.state), "--config", str(pw.config), "qemu",
                       SHARED, "prepare", "begin", "-"]
            domain_xml = env.tiny_domain_xml(SHARED)
            must(pw.run("hook", "install"))
            daemons.restart_libvirtd()
            conn = env.libvirt.open(env.URI)
            pinwarden_daemon = env.Daemon(pw, base / "pinwarden-daemon.log")
            deadline = time.monotonic() + 60
            while "answering libvirt hook calls" not in pinwarden_daemon.text():
                if time.monotonic() > deadline or pinwarden_daemon.proc.poll() is not None:
                    raise SystemExit(f"bench: the daemon did not come up: "
                                     f"{pinwarden_daemon.text()}")
                time.sleep(0.1)

            def hook(on: bool, daemon: bool) -> Callable[[], None]:
                def switch() -> None:
                    if on and parked.exists():
                        parked.rename(drop_in)
                    elif not on and drop_in.exists():
                        drop_in.rename(parked)
                    if daemon and sock_off.exists():
                        sock_off.rename(sock)
                    elif not daemon and sock.exists():
                        sock.rename(sock_off)
                return switch

            def virsh_start(name: str) -> Callable[[], None]:
                return lambda: must(env.virsh("start", name))

            def virsh_destroy(name: str) -> Callable[[], None]:
                return lambda: must(env.virsh("destroy", name))

            def pw_start(name: str, *extra: str) -> Callable[[], None]:
                return lambda: must(pw.run("start", name, *extra))

            def pw_stop(name: str) -> Callable[[], None]:
                return lambda: must(pw.run("stop", name))

            client = [*hook_client(), str(sock), str(pw.config), "qemu",
                      str(len(prepare) - 4), *prepare[:-4], *prepare[-4:]]

            def run_hook(cmd: list[str]) -> Callable[[], None]:
                return lambda: must(subprocess.run(cmd, input=domain_xml, text=True,
                                                   capture_output=True))

            deployed = hook(True, True)
            times.update(timed(args.runs, [
                ("virsh_start", hook(False, True), virsh_start(SHARED),
                 virsh_destroy(SHARED)),
                ("virsh_start_hooked", deployed, virsh_start(SHARED), virsh_destroy(SHARED)),
                ("virsh_start_hooked_no_daemon", hook(True, False), virsh_start(SHARED),
                 virsh_destroy(SHARED)),
                ("virsh_start_hooked_exclusive", deployed, virsh_start(EXCLUSIVE_VM),
                 virsh_destroy(EXCLUSIVE_VM)),
                ("pinwarden_start_shared", deployed, pw_start(SHARED), pw_stop(SHARED)),
                ("pinwarden_start_shared_no_daemon", deployed,
                 pw_start(SHARED, "--no-daemon"), pw_stop(SHARED)),
                ("pinwarden_start_exclusive", deployed, pw_start(EXCLUSIVE_VM),
                 pw_stop(EXCLUSIVE_VM)),
                ("hook_prepare", deployed, run_hook(prepare), lambda: None),
                ("hook_prepare_client", deployed, run_hook(client), lambda: None),
            ]))
        measured = True
    finally:
        if parked.exists():
            parked.rename(drop_in)
        if sock_off.exists():
            sock_off.rename(sock)
        if pinwarden_daemon is not None:
            pinwarden_daemon.stop()
        for name in (SHARED, EXCLUSIVE_VM):
            env.cleanup_domain(conn, name)
        with contextlib.suppress(Exception):
            conn.close()
        must(pw.run("hook", "uninstall"))
        pw.cleanup()
        for daemon in reversed(env.DAEMONS):
            daemons.stop(daemon)
        if measured:  # the daemons' logs and the state are kept only to see what failed
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"bench: logs and state kept in {base}", file=sys.stderr)
    medians = {k: round(statistics.median(v), 4) for k, v in times.items()}
    base_time = medians["virsh_start"]
    starts = [k for k in medians if not k.startswith("hook_")]
    report = {
        "runs": args.runs,
        "median_s": medians,
        "quartiles_s": {k: [round(q, 4) for q in statistics.quantiles(v, n=4)[::2]]
                        for k, v in times.items()},
        "ratio_vs_virsh_start": {k: round(medians[k] / base_time, 2) for k in starts},
        # each round runs every case back to back: the median of the rounds' own ratios
        # cancels what drifts between rounds (the goals stay on the ratio of medians)
        "paired_ratio_vs_virsh_start": {
            k: round(statistics.median(t / b for t, b in zip(times[k], times["virsh_start"],
                                                              strict=True)), 2)
            for k in starts},
        "goals": {"virsh_start_hooked <= 1.10": medians["virsh_start_hooked"]
                  <= 1.10 * base_time,
                  "pinwarden_start_shared <= 1.15": medians["pinwarden_start_shared"]
                  <= 1.15 * base_time,
                  "pinwarden_start_exclusive <= 1.15": medians["pinwarden_start_exclusive"]
                  <= 1.15 * base_time},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def hook_client() -> list[str]:
    from pinwarden.libvirt.hook import default_client

    return list(default_client())


if __name__ == "__main__":
    sys.exit(main())
