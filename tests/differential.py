"""Replay random cpuset operations on two backends and compare every outcome and state.

Used by tests/test_enforce_differential.py on the real cgroup v1 cpuset hierarchy of this
host and inside a virtme-ng guest (a fresh kernel with more CPUs).  Runnable as a script:
``python tests/differential.py CPUSET_MOUNT SEED STEPS`` prints one JSON report.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script inside a guest: make src importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import CgroupOpError, join
from pinwarden.enforce.fake import FakeCpusetV1, _Node
from pinwarden.enforce.v1 import CpusetV1

NAMES = ("a", "b", "c")


@dataclass(frozen=True)
class Step:
    action: str  # mkdir rmdir cpus mems cpu_exclusive sched_load_balance attach
    path: str  # relative to the test base
    value: Any = None

    def text(self) -> str:
        return f"{self.action} {self.path or '.'} {self.value if self.value is not None else ''}"


def random_steps(rng: random.Random, count: int, cpus: int, tasks: int) -> list[Step]:
    paths = ["", *NAMES, *(f"{a}/{b}" for a in NAMES[:2] for b in NAMES[:2]), "a/a/b"]
    steps: list[Step] = []
    for _ in range(count):
        action = rng.choices(
            ["mkdir", "rmdir", "cpus", "mems", "cpu_exclusive", "sched_load_balance",
             "attach"], weights=[6, 2, 8, 2, 4, 1, 3])[0]
        path = rng.choice(paths if action not in ("mkdir", "rmdir") else paths[1:])
        value: Any = None
        if action == "cpus":
            pool = range(cpus + 1)  # one CPU past the last: ERANGE
            value = sorted(rng.sample(list(pool), rng.randint(0, min(3, len(pool)))))
        elif action == "mems":
            value = rng.choice([[], [0], [0], [1]])
        elif action in ("cpu_exclusive", "sched_load_balance"):
            value = rng.random() < 0.6 if action == "cpu_exclusive" else rng.random() < 0.7
        elif action == "attach":
            value = rng.randrange(tasks)
        steps.append(Step(action, path, value))
    return steps


Outcome = str


def perform(backend: CpusetV1 | FakeCpusetV1, base: str, step: Step,
            pid_of: Callable[[int], int]) -> Outcome:
    path = join(base, step.path) if step.path else base
    try:
        if step.action == "mkdir":
            backend.mkdir(path)
        elif step.action == "rmdir":
            backend.rmdir(path)
        elif step.action == "cpus":
            backend.set_cpus(path, CpuSet.of(step.value))
        elif step.action == "mems":
            backend.set_mems(path, CpuSet.of(step.value))
        elif step.action in ("cpu_exclusive", "sched_load_balance"):
            backend.set_flag(path, step.action, bool(step.value))
        elif step.action == "attach":
            backend.attach_process(path, pid_of(step.value))
    except CgroupOpError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def describe_tree(backend: CpusetV1 | FakeCpusetV1, base: str,
                  pid_index: dict[int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in backend.read_state([base]).subtree(base):
        g = backend.read_group(path)
        flags = backend_flags(backend, path)
        out[path] = {"cpus": g.cpus.to_list(), "mems": g.mems.to_list(),
                     "effective": g.effective_cpus.to_list(), **flags,
                     "tasks": sorted(pid_index[t] for t in backend.tasks(path)
                                     if t in pid_index)}
    return out


def backend_flags(backend: CpusetV1 | FakeCpusetV1, path: str) -> dict[str, bool]:
    if isinstance(backend, FakeCpusetV1):
        flags = backend.flags(path)
        return {"cpu_exclusive": flags["cpu_exclusive"],
                "sched_load_balance": flags["sched_load_balance"]}
    return {"cpu_exclusive": backend._flag(path, "cpu_exclusive"),
            "sched_load_balance": backend._flag(path, "sched_load_balance")}


def mirror_real_into_fake(real: CpusetV1, fake: FakeCpusetV1, base: str) -> None:
    """Copy the real siblings of ``base`` (and its ancestors) into the fake, so sibling
    rules see the same neighbours."""
    snap = real.read_state([base])
    for path in snap.subtree(""):
        if path == "" or path == base or path.startswith(base + "/"):
            continue
        state = snap[path]
        node = fake._node(path.rsplit("/", 1)[0]) if "/" in path else fake.root
        node.children[path.rsplit("/", 1)[-1]] = _Node(
            cpus=state.cpus, mems=state.mems, cpu_exclusive=state.exclusive,
            sched_load_balance=state.partition != "isolated",
            tasks={-1} if state.populated else set())


@contextmanager
def sleepers(count: int) -> Iterator[list[int]]:
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(count)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def cleanup(real: CpusetV1, base: str, root_for_tasks: str = "") -> None:
    snap = real.read_state([base])
    for path in sorted(snap.subtree(base), key=lambda p: -p.count("/")):
        for tid in real.tasks(path):
            with suppress(CgroupOpError):
                real.attach_thread(root_for_tasks, tid)
        with suppress(CgroupOpError):
            real.rmdir(path)


def run(mount: Path, seed: int, count: int, base: str, *, exclusive_base: bool,
        ) -> dict[str, Any]:
    """Play ``count`` random steps below ``base`` on the real tree and on a fake."""
    real = CpusetV1(mount)
    online = real.read_group("").cpus
    possible_text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    possible = max(CpuSet.parse_kernel(possible_text).cpus) + 1
    fake = FakeCpusetV1(online, real.read_group("").mems, possible=possible)
    rng = random.Random(seed)
    report: dict[str, Any] = {"seed": seed, "steps": 0, "outcomes": {}, "mismatch": None}
    with sleepers(2) as pids:
        index = {pid: i for i, pid in enumerate(pids)}
        # the test base: all online CPUs, exclusive when the neighbours allow it
        real.mkdir(base)
        try:
            mirror_real_into_fake(real, fake, base)
            fake.mkdir(base)
            for b in (real, fake):
                b.set_mems(base, real.read_group("").mems)
                b.set_cpus(base, online)
            if exclusive_base:
                got = [perform(b, base, Step("cpu_exclusive", "", True), pids.__getitem__)
                       for b in (real, fake)]
                report["exclusive_base"] = got
            steps = random_steps(rng, count, len(online), len(pids))
            for n, step in enumerate(steps):
                r = perform(real, base, step, pids.__getitem__)
                f = perform(fake, base, step, pids.__getitem__)
                report["outcomes"][r] = report["outcomes"].get(r, 0) + 1
                report["steps"] = n + 1
                if r != f:
                    report["mismatch"] = {"step": n, "op": step.text(), "real": r, "fake": f}
                    break
                rs, fs = describe_tree(real, base, index), describe_tree(fake, base, index)
                if rs != fs:
                    report["mismatch"] = {"step": n, "op": step.text(), "real": rs,
                                          "fake": fs}
                    break
        finally:
            cleanup(real, base)
    return report


if __name__ == "__main__":
    mount, seed, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    results = [run(mount, seed + i, steps, f"pwtest-diff-{os.getpid()}-{i}",
                   exclusive_base=True) for i in range(int(sys.argv[4]) if len(sys.argv) > 4
                                                       else 1)]
    print("DIFFERENTIAL " + json.dumps(results))
