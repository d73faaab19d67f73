"""``pinwarden metrics``: the pure snapshot → registry module, and the command on a fake host
root (tests/hostroot.py, tests/fakeproc.py) with a state directory holding known leases.
The output is read back with prometheus_client's own parsers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from fakeproc import fake_proc, reserve
from hostroot import HostSpec, build_host
from pinwarden import __version__, metrics
from pinwarden.cli import main
from pinwarden.ledger import DB_NAME

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample: (name, sorted labels) → value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, metric: str, /, **labels: str) -> float:
    return got[(metric, tuple(sorted(labels.items())))]


def named(got: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in got.items() if n == name}


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """8 CPUs on 2 NUMA nodes (0-3, 4-7), partition none (CPU 0 for the host), a shared VM
    'web' whose threads may run anywhere, and leases: vm-a 2-3, job1 5."""
    root = build_host(tmp_path / "root", HostSpec(cpus=8, nodes=2))
    fake_proc(root, intruder_on="0-7", all_cpus="0-7")
    state = tmp_path / "state"
    reserve(state, "vm-a", "2-3")
    reserve(state, "job1", "5", driver="run")
    config = tmp_path / "pw.toml"
    config.write_text("")
    return {"root": root, "state": state, "config": config, "dir": tmp_path}


def run_metrics(env: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    code = "from pinwarden.cli import entry; entry()"
    return subprocess.run([sys.executable, "-c", code, "metrics", "--root", str(env["root"]),
                           "--state-dir", str(env["state"]), "--config", str(env["config"]),
                           *extra], capture_output=True, text=True, timeout=120)


def test_metrics_of_a_fake_host(host: dict[str, Path]) -> None:
    before = time.time()
    proc = run_metrics(host)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = samples(proc.stdout)

    assert value(got, "pinwarden_info", version=__version__, partition_mode="none") == 1
    assert named(got, "pinwarden_vm_cpus") == {
        (("node", "0"), ("state", "leased")): 2.0, (("node", "0"), ("state", "free")): 1.0,
        (("node", "1"), ("state", "leased")): 1.0, (("node", "1"), ("state", "free")): 3.0}
    assert named(got, "pinwarden_housekeeping_cpus") == {(("node", "0"),): 1.0,
                                                         (("node", "1"),): 0.0}
    assert named(got, "pinwarden_holder_leased_cpus") == {
        (("driver", "qemu"), ("key", "vm-a"), ("name", "vm-a")): 2.0,
        (("driver", "run"), ("key", "job1"), ("name", "job1")): 1.0}
    created = value(got, "pinwarden_holder_created_timestamp_seconds", driver="qemu",
                    key="vm-a", name="vm-a")
    age = value(got, "pinwarden_holder_age_seconds", driver="qemu", key="vm-a", name="vm-a")
    assert before - 300 < created <= before  # reserved by the fixture, just before
    assert 0 <= age < 300

    # web's emulator and vCPU threads can run on the leased CPUs, so can its two populated
    # cgroups and the VM partition machine, init and IRQ 24
    intruders = {dict(k)["kind"]: v for k, v in named(got, "pinwarden_audit_intruders").items()}
    assert intruders == {"other-vm-thread": 2, "vm-cgroup": 3, "host-task": 1, "irq": 1,
                         "escaped-task": 0, "workqueue": 0, "invalid-partition": 0,
                         "not-exclusive": 0, "off-lease": 0, "missing-group": 0,
                         "strayed-thread": 0, "stale-holder-group": 0,
                         "vm-cgroup-pin": 0, "isolcpus-host-task": 0}
    audit = subprocess.run([sys.executable, "-c", "from pinwarden.cli import entry; entry()",
                            "audit", "--json", "--root", str(host["root"]), "--state-dir",
                            str(host["state"]), "--config", str(host["config"])],
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 1
    report = json.loads(audit.stdout)
    for kind, n in intruders.items():  # the same numbers as `pinwarden audit`
        assert n == sum(1 for i in report["intruders"] if i["kind"] == kind), kind
    assert value(got, "pinwarden_audit_checked", what="threads") == 3
    assert named(got, "pinwarden_read_error") == {
        (("source", s),): 0.0 for s in ("host", "ledger", "proc", "cgroups")}


def test_no_audit_and_openmetrics(host: dict[str, Path]) -> None:
    proc = run_metrics(host, "--no-audit", "--openmetrics")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(proc.stdout)}
    assert "pinwarden_audit_intruders" not in families
    assert families["pinwarden"].type == "info"
    leased = {s.labels["node"]: s.value for s in families["pinwarden_vm_cpus"].samples
              if s.labels["state"] == "leased"}
    assert leased == {"0": 2.0, "1": 1.0}


def test_what_cannot_be_read_is_a_metric_not_a_failure(host: dict[str, Path]) -> None:
    (host["state"] / DB_NAME).write_bytes(b"this is not SQLite at all, not even close......")
    proc = run_metrics(host)
    assert proc.returncode == 0
    assert proc.stderr.startswith("pinwarden: warning: could not read ledger: ")
    assert proc.stderr.count("\n") == 1
    got = samples(proc.stdout)
    assert value(got, "pinwarden_read_error", source="ledger") == 1
    assert value(got, "pinwarden_read_error", source="host") == 0
    assert not named(got, "pinwarden_audit_intruders")  # no leases known: no verdict
    assert not named(got, "pinwarden_holder_leased_cpus")
    # nor which CPUs are free: every VM CPU "free" was a guess a capacity alert believed
    # (hunt F); the host's own CPUs are known
    assert not named(got, "pinwarden_vm_cpus") and named(got, "pinwarden_housekeeping_cpus")

    proc = run_metrics({**host, "root": host["dir"] / "nowhere",
                        "state": host["dir"] / "fresh"})
    got = samples(proc.stdout)
    assert proc.returncode == 0
    assert value(got, "pinwarden_read_error", source="host") == 1
    assert value(got, "pinwarden_read_error", source="proc") == 1
    assert value(got, "pinwarden_info", version=__version__, partition_mode="") == 1
    assert not named(got, "pinwarden_vm_cpus")


def test_a_cgroup_namespaces_part_view_is_a_cgroup_read_error(host: dict[str, Path]) -> None:
    """Seen from a cgroup namespace (a thread's group reads "/.."), the holder groups are
    out of view: the cgroups count as unread, as with none at all."""
    (host["root"] / "proc/1/task/1/cgroup").write_text("5:cpuset:/..\n")
    (host["root"] / "sys/fs/cgroup/cpuset/tasks").write_text("")  # (above the view)
    proc = run_metrics(host)
    assert proc.returncode == 0
    assert "could not read cgroups: this cgroup namespace sees only part of the cpuset " \
        "hierarchy" in proc.stderr, proc.stderr
    assert value(samples(proc.stdout), "pinwarden_read_error", source="cgroups") == 1


def test_textfile_is_written_atomically(host: dict[str, Path]) -> None:
    out = host["dir"] / "textfile"
    out.mkdir()
    target = out / "pinwarden.prom"
    target.write_text("# the previous scrape\n")
    proc = run_metrics(host, "--textfile", str(target))
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    assert [p.name for p in out.iterdir()] == ["pinwarden.prom"]  # no temporary file left
    got = samples(target.read_text())
    assert value(got, "pinwarden_vm_cpus", node="1", state="free") == 3


def test_bad_textfile_and_options(host: dict[str, Path]) -> None:
    proc = run_metrics(host, "--textfile", str(host["dir"] / "pinwarden.txt"))
    assert proc.returncode == 1
    assert proc.stderr == (f"pinwarden: error: --textfile {host['dir'] / 'pinwarden.txt'}: "
                           "node_exporter's textfile collector reads only files named *.prom\n")
    proc = run_metrics(host, "--textfile", str(host["dir"] / "missing" / "pinwarden.prom"))
    assert proc.returncode == 1 and "cannot write" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_metrics(host, "--json")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: pinwarden metrics")
    assert "--json does not apply" in proc.stderr


def test_in_process_uses_a_fresh_registry(host: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["metrics", "--root", str(host["root"]), "--state-dir", str(host["state"]),
            "--config", str(host["config"])]
    assert main(argv) == 0 and main(argv) == 0  # twice: no "duplicated timeseries"
    assert capsys.readouterr().out.count("# TYPE pinwarden_vm_cpus gauge") == 2
    assert not any(name.startswith("pinwarden") for name in REGISTRY._names_to_collectors)


# -- the pure module ----------------------------------------------------------------------------


def test_empty_snapshot() -> None:
    got = samples(metrics.render(metrics.Snapshot(taken=0.0)).decode())
    assert value(got, "pinwarden_info", version=__version__, partition_mode="") == 1
    assert set(named(got, "pinwarden_read_error").values()) == {0.0}
    assert not named(got, "pinwarden_vm_cpus")


def test_registries_are_independent() -> None:
    a = metrics.registry(metrics.Snapshot(taken=0.0, errors={"ledger": "locked"}))
    b = metrics.registry(metrics.Snapshot(taken=0.0))
    assert a.get_sample_value("pinwarden_read_error", {"source": "ledger"}) == 1
    assert b.get_sample_value("pinwarden_read_error", {"source": "ledger"}) == 0
    assert a is not REGISTRY and b is not REGISTRY


def test_metrics_addresses() -> None:
    from pinwarden.metrics import parse_address

    assert parse_address("127.0.0.1:9848") == ("127.0.0.1", 9848)
    assert parse_address(":9848") == ("127.0.0.1", 9848)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("9848", "host:", "host:port", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_cpus_kept_after_a_forced_release_count_as_leased(
        host: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A holder freed by 'release --force' that runs on keeps its CPU (status and audit
    say so, and no plan takes it): metrics counted that CPU free and its group a stale
    one; 'host' drew it as shared (status hunt).  (The kept lease is made here: the
    manager reads it from a running holder group's processes, real-cgroup tests cover
    that.)"""
    from pinwarden.manager import Manager
    from pinwarden.model import KEPT_ROLE, Lease, job_holder

    kept = (Lease(7, job_holder("gone"), KEPT_ROLE, 0.0, 4242),)
    monkeypatch.setattr(Manager, "kept_leases", lambda _self: kept)
    common = ["--root", str(host["root"]), "--state-dir", str(host["state"]), "--config",
              str(host["config"])]
    assert main(["metrics", "--no-audit", *common]) == 0
    got = samples(capsys.readouterr().out)
    assert value(got, "pinwarden_vm_cpus", node="1", state="leased") == 2.0
    assert value(got, "pinwarden_vm_cpus", node="1", state="free") == 2.0
    assert main(["host", "--json", *common]) == 0
    leases = json.loads(capsys.readouterr().out)["leases"]
    assert {"cpu": 7, "holder": "job 'gone'", "role": KEPT_ROLE} in leases, leases
