#!/usr/bin/env python3
"""Command-line speed (issue #12): wall time of whole ``pinwarden`` processes against a bare
Python, side by side in one run, and ``policy.decide`` in process; JSON with pass/fail.

Measured, each a fresh process started the same way (``subprocess.run``, output to
/dev/null), the commands interleaved round by round so that load changes hit them alike:

* ``bare``            ``python -c 'import json, sqlite3'`` — the same interpreter pinwarden
                      runs on (the venv's: no shell shim in front of either);
* ``plan``            ``pinwarden plan`` of an exclusive 8-vCPU domain (emulator isolated) on
                      the synthetic 1,024-CPU, 8-node host with 608 CPUs leased, the
                      topology snapshot cache in place (as after any earlier command);
* ``plan_uncached``   the same with the cache removed before each run (information only:
                      the first command after a boot or a CPU hotplug);
* ``status``          ``pinwarden status`` on the bundled 16-CPU example host with three
                      holders;
* ``help``            ``pinwarden --help``;
* ``stdlib_floor``    ``python -c 'import json, sqlite3, argparse, pathlib, typing'``
                      (information only): what every command imports from
                      the standard library before any pinwarden code runs.

Goals (ratios of medians to ``bare``): ``plan`` ≤ 3, ``status`` ≤ 2.5; and
``policy.decide`` p99 < 1 ms on the 1,024-CPU host (``pwbench.decide``: 300 states of
the replayed ``mixed+emu`` workload, layout cached, fastest of 3 per state).

The hosts and ledgers are built in a temporary directory; bytecode is compiled first (an
installed package has it; ``PYTHONDONTWRITEBYTECODE`` would otherwise make every run
compile the sources).

    .venv/bin/python bench/cli_speed.py --runs 21 --out bench/results/cli.json
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pwbench.decide import measure  # noqa: E402
from pwbench.hosts import synthetic_host, write_root  # noqa: E402
from pwbench.workload import generate  # noqa: E402

import pinwarden  # noqa: E402
from pinwarden.cli import main  # noqa: E402

BIG = "syn-4s2n64c2t"  # 4 sockets × 2 nodes × 64 cores × 2 threads: 1,024 CPUs, 8 nodes
EXAMPLE = Path(pinwarden.__file__).resolve().parent / "data" / "example-host"
GOALS = {"plan": 3.0, "status": 2.5}
DECIDE_GOAL_US = 1000.0
#: The standard library every command loads (information only): the floor under its ratio.
FLOOR = "json, sqlite3, argparse, pathlib, typing"
#: 19 domains of 32 vCPUs (whole cores): 608 CPUs leased on the big host.
LEASED_DOMAINS, LEASED_VCPUS = 19, 32


def domain_xml(name: str, vcpus: int, extra: str = "") -> str:
    return (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<vcpu placement='static'>{vcpus}</vcpu><metadata>"
            f"<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'{extra}/>"
            "</metadata><os><type arch='x86_64'>hvm</type></os></domain>\n")


def quiet_main(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(list(argv))
    if status != 0:
        raise SystemExit(f"setup failed: pinwarden {' '.join(argv)} exited {status}")


@contextlib.contextmanager
def hosts() -> Iterator[dict[str, list[str]]]:
    """The command lines to time, with their hosts and ledgers set up."""
    with tempfile.TemporaryDirectory(prefix="pinwarden-cli-bench-") as tmp:
        work = Path(tmp)
        big = write_root(synthetic_host(BIG).topology, work / "big")
        big_state = work / "big-state"
        for i in range(LEASED_DOMAINS):
            xml = work / f"lease{i}.xml"
            xml.write_text(domain_xml(f"bench{i}", LEASED_VCPUS))
            quiet_main("reserve", "--root", str(big), "--state-dir", str(big_state), str(xml))
        plan = work / "plan.xml"
        plan.write_text(domain_xml("planned", 8, " emulator='isolate'"))
        small_state = work / "small-state"
        for i in range(3):
            xml = work / f"small{i}.xml"
            xml.write_text(domain_xml(f"small{i}", 2))
            quiet_main("reserve", "--root", str(EXAMPLE), "--state-dir", str(small_state),
                       str(xml))
        script = Path(sys.executable).parent / "pinwarden"  # the installed command
        pw = [str(script)] if script.is_file() else \
            [sys.executable, "-c", "from pinwarden.cli import entry; entry()"]
        plan_cmd = [*pw, "plan", "--root", str(big), "--state-dir", str(big_state), str(plan)]
        yield {
            "bare": [sys.executable, "-c", "import json, sqlite3"],
            "stdlib_floor": [sys.executable, "-c", f"import {FLOOR}"],
            "plan": plan_cmd,
            "plan_uncached": plan_cmd,
            "status": [*pw, "status", "--root", str(EXAMPLE), "--state-dir", str(small_state)],
            "help": [*pw, "--help"],
            "_cache": [str(big_state / "cache")],
        }


def time_commands(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall seconds of every command, ``runs`` rounds, one warm-up round first."""
    cache = Path(commands["_cache"][0])
    names = [n for n in commands if not n.startswith("_")]
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(runs + 1):
        for name in names:
            if name == "plan_uncached":
                shutil.rmtree(cache, ignore_errors=True)
            start = time.perf_counter()
            done = subprocess.run(commands[name], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, check=False)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.decode()}")
            if name == "plan_uncached":  # the next plan finds the cache again
                subprocess.run(commands["plan"], stdout=subprocess.DEVNULL, check=True)
            if round_no:  # round 0 warms caches (page cache, topology snapshot)
                times[name].append(elapsed)
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "min_ms": round(ordered[0] * 1000, 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
            "n": len(ordered)}


def decide_times() -> dict[str, Any]:
    host = synthetic_host(BIG)
    events = generate(seed=1, pool=len(host.pool), threads_per_core=host.threads_per_core,
                      mix="mixed+emu", load=1.0, lifetimes=6.0, min_arrivals=150)
    return measure(host, events)


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=21, help="timed rounds (default 21)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "cli.json")
    args = parser.parse_args(argv)
    compileall.compile_dir(str(Path(pinwarden.__file__).parent), quiet=1)
    load_before = os.getloadavg()
    started = time.monotonic()
    with hosts() as commands:
        times = time_commands(commands, args.runs)
    decisions = decide_times()
    load_after = os.getloadavg()
    rows = {name: summary(values) for name, values in times.items()}
    bare, bare_min = rows["bare"]["median_ms"], rows["bare"]["min_ms"]
    for row in rows.values():  # the goals are on the medians; the minima for comparison
        row["ratio"] = round(row["median_ms"] / bare, 2)
        row["ratio_min"] = round(row["min_ms"] / bare_min, 2)
    goals = [{"goal": f"{name} ≤ {limit:g}× bare", "measured": rows[name]["ratio"],
              "pass": rows[name]["ratio"] <= limit} for name, limit in GOALS.items()]
    p99 = decisions["decide"]["p99_us"]
    goals.append({"goal": f"policy.decide p99 < {DECIDE_GOAL_US:g} µs (1,024 CPUs, warm)",
                  "measured": p99, "pass": p99 < DECIDE_GOAL_US})
    result = {
        "meta": {"python": platform.python_version(), "interpreter": sys.executable,
                 "machine": platform.machine(), "cpus": os.cpu_count(),
                 "runs": args.runs, "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in load_after],
                 "seconds": round(time.monotonic() - started, 1),
                 "big_host": f"{BIG} (1,024 CPUs, 8 nodes), "
                             f"{LEASED_DOMAINS * LEASED_VCPUS} CPUs leased",
                 "small_host": "bundled example host (16 CPUs, 2 nodes), 3 holders"},
        "commands": rows,
        "decide_1024": decisions,
        "goals": goals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    width = max(map(len, rows))
    for name, row in rows.items():
        print(f"{name:<{width}}  median {row['median_ms']:7.1f} ms  min {row['min_ms']:7.1f}  "
              f"p90 {row['p90_ms']:7.1f}  ×{row['ratio']:.2f} (minima ×{row['ratio_min']:.2f})")
    print(f"decide p50 {decisions['decide']['p50_us']} µs, p99 {p99} µs "
          f"(fresh topology: p99 {decisions['decide_fresh']['p99_us']} µs)")
    for goal in goals:
        print(f"{'PASS' if goal['pass'] else 'FAIL'}  {goal['goal']}: {goal['measured']}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_bench())
