#!/usr/bin/env python3
"""Benchmark: ``pinwarden audit`` over tens of thousands of threads.

Starts ``--procs`` child processes holding ``--threads`` blocked threads in total, then times
the /proc scan (:func:`pinwarden.audit.scan`) and the pure check (:func:`pinwarden.audit.audit`)
with one CPU leased, ``--repeat`` times each, and prints one JSON object on stdout.
The children are killed (by pid) at the end, also on failure.

    .venv/bin/python bench/audit_scale.py --threads 20000      # make bench
    .venv/bin/python bench/audit_scale.py --quick              # make bench-quick

Needs ``--threads`` + 2000 below ``kernel.pid_max``; the children use 64 KiB thread stacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pinwarden import audit
from pinwarden.model import HolderRef, Lease

CHILD = r"""
import sys, threading
n = int(sys.argv[1])
threading.stack_size(64 * 1024)
stop = threading.Event()
for _ in range(n):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=20000, help="threads to add (total)")
    parser.add_argument("--procs", type=int, default=8, help="processes holding them")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="2000 threads, one repetition (for make bench-quick)")
    args = parser.parse_args()
    if args.quick:
        args.threads, args.repeat = 2000, 1

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if args.threads + 2000 > pid_max:
        parser.error(f"--threads {args.threads} too close to kernel.pid_max {pid_max}")
    per = max(1, args.threads // max(1, args.procs))
    children: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for _ in range(args.procs):
            children.append(subprocess.Popen([sys.executable, "-c", CHILD, str(per)],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline() != b"ready\n":
                raise SystemExit(f"child {child.pid} failed to start its threads")
        spawn_s = time.perf_counter() - started

        scans: list[float] = []
        checks: list[float] = []
        snapshot = audit.HostSnapshot()
        report = None
        leases = [Lease(cpu=max(os.sched_getaffinity(0)), role="vcpu0", created=0.0,
                        holder=HolderRef("qemu", "bench", "bench"))]
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            snapshot = audit.scan(Path("/"))
            t1 = time.perf_counter()
            report = audit.audit(snapshot, leases, [])
            t2 = time.perf_counter()
            scans.append(t1 - t0)
            checks.append(t2 - t1)
        assert report is not None
        threads = len(snapshot.threads)
        result = {
            "benchmark": "audit_scale",
            "threads_scanned": threads,
            "threads_added": per * args.procs,
            "cgroups_scanned": len(snapshot.cgroups),
            "irqs_scanned": len(snapshot.irqs),
            "intruders": len(report.intruders),
            "spawn_seconds": round(spawn_s, 3),
            "scan_seconds_best": round(min(scans), 4),
            "scan_seconds_all": [round(s, 4) for s in scans],
            "audit_seconds_best": round(min(checks), 4),
            "threads_per_second": round(threads / min(scans)),
        }
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
