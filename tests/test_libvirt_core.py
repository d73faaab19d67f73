"""Pure parts of the libvirt adapters: re-pin planning, daemon reconcile, hook install and
dispatch, the stored metadata of ``pinwarden define``.  (The real thing: test_libvirt_e2e.)"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.domain import parse_domain
from pinwarden.errors import PinwardenError, Refusal
from pinwarden.ledger import HolderRecord, Ledger
from pinwarden.libvirt import hook
from pinwarden.libvirt.context import Context
from pinwarden.libvirt.reconcile import Adopt, Drift, Free, Report, reconcile
from pinwarden.libvirt.repin import repins
from pinwarden.libvirt.start import libvirt_failure, with_pinwarden_metadata
from pinwarden.libvirt.state import Affinity, DomainInfo
from pinwarden.model import HolderRef, Plan

A = HolderRef("qemu", "aaaaaaaa-0000-0000-0000-000000000001", "a")


def cs(text: str) -> CpuSet:
    return CpuSet.parse(text)


def xml(name: str, body: str = "") -> str:
    return (f"<domain type='kvm'><name>{name}</name><memory>32768</memory>"
            f"<vcpu>2</vcpu>{body}<os><type>hvm</type></os></domain>")


def running(name: str, body: str = "", *, vcpus: str = "0-3", emulator: str = "0-3",
            uuid: str | None = None) -> DomainInfo:
    spec = parse_domain(xml(name, body))
    return DomainInfo("qemu", name, uuid or f"uuid-{name}", True, live=spec, persistent=spec,
                      affinity=Affinity({0: cs(vcpus), 1: cs(vcpus)}, cs(emulator)), pid=1)


# -- repin --------------------------------------------------------------------------------

def test_floating_threads_move_to_the_pool_and_pinned_ones_keep_the_rest() -> None:
    floating = running("float", vcpus="2", emulator="0-3")
    pinned = running("pinned", "<cputune><vcpupin vcpu='0' cpuset='1-2'/>"
                               "<vcpupin vcpu='1' cpuset='1-2'/></cputune>", vcpus="1-2")
    moves = repins([floating, pinned], A, cs("2"), pool=cs("0-1"))
    got = {(m.domain, m.label): m.after for m in moves}
    assert got == {("float", "vcpu0"): cs("0-1"), ("float", "vcpu1"): cs("0-1"),
                   ("float", "emulator"): cs("0-1,3"),
                   ("pinned", "vcpu0"): cs("1"), ("pinned", "vcpu1"): cs("1"),
                   ("pinned", "emulator"): cs("0-1,3")}
    assert all(m.before != m.after for m in moves)


def test_a_domain_pinned_only_onto_the_lease_is_refused_by_name() -> None:
    pinned = running("pinned", "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>",
                     vcpus="2")
    with pytest.raises(Refusal) as err:
        repins([pinned], A, cs("2"), pool=cs("0-1"))
    assert "'pinned'" in err.value.message and "CPU 2" in err.value.message
    assert err.value.code == "pinned-elsewhere"


def test_holders_and_the_domain_itself_are_left_alone() -> None:
    me = running("a", vcpus="2", uuid=A.key)
    other = running("x", vcpus="2")
    held = HolderRef("qemu", other.uuid, "x")
    assert repins([me, other], A, cs("2"), pool=cs("0"), holders=[held]) == ()


# -- reconcile ----------------------------------------------------------------------------

def record(ref: HolderRef, vcpus: dict[int, str], leases: dict[int, str], *,
           created: float = 0.0, owner: int | None = None) -> HolderRecord:
    plan = Plan(ref.name, ref.key, True, {v: cs(c) for v, c in vcpus.items()}, cs("3"),
                leases=leases)
    return HolderRecord(ref, created, owner, None, plan)


def test_reconcile_frees_adopts_and_reports_drift() -> None:
    exclusive = "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>" \
                "</metadata>"
    gone = HolderRef("qemu", "uuid-gone", "gone")
    job = HolderRef("run", "job", "job")
    held = running("held", vcpus="2", emulator="3")
    held_ref = HolderRef("qemu", held.uuid, "held")
    drifted = DomainInfo("qemu", "held", held.uuid, True, held.live, held.persistent,
                         Affinity({0: cs("2"), 1: cs("1-2")}, cs("3")), 1)
    stray = running("stray", exclusive + "<resource><partition>/pw/vm-stray</partition>"
                    "</resource>", vcpus="1")
    outside = running("outside", exclusive, vcpus="0")
    intruder = running("intruder", vcpus="0-2", emulator="0")
    actions = reconcile([drifted, stray, outside, intruder],
                        [record(gone, {0: "1"}, {1: "vcpu0"}),
                         record(job, {}, {0: "task"}),
                         record(held_ref, {0: "2", 1: "2"}, {2: "vcpu0", 3: "emulator"})],
                        lambda h: f"/pw/vm-{h.name}", now=1000.0)
    frees = [a.holder for a in actions if isinstance(a, Free)]
    adopts = [a.domain.name for a in actions if isinstance(a, Adopt)]
    drifts = {(a.repin.domain, a.repin.label): a.repin.after for a in actions
              if isinstance(a, Drift)}
    assert frees == [gone]  # the run job is not libvirt's to free
    assert adopts == ["stray"]
    reports = [a.message for a in actions if isinstance(a, Report)]
    assert len(reports) == 1 and "outside runs in partition /machine" in reports[0]
    assert drifts == {("held", "vcpu1"): cs("2"), ("intruder", "vcpu0"): cs("0-1"),
                      ("intruder", "vcpu1"): cs("0-1")}


# -- hook ---------------------------------------------------------------------------------

def test_hook_namespace_is_the_domain_metadata_namespace() -> None:
    from pinwarden.domain import PW_NS

    assert hook.PW_NAMESPACE == PW_NS


def test_hook_acts_only_at_prepare_started_and_release() -> None:
    assert [hook.action_for(op) for op in ("prepare", "start", "started", "stopped",
                                           "release", "migrate", "restore", "reconnect")] \
        == ["admit", "ignore", "own", "ignore", "free", "ignore", "ignore", "ignore"]


def test_hook_install_writes_executable_scripts_and_keeps_foreign_hooks(tmp_path: Path) -> None:
    foreign = tmp_path / "lxc"
    foreign.write_text("#!/bin/sh\necho mine\n")
    with pytest.raises(Refusal):
        hook.install(tmp_path, exe="/opt/pw bin/pinwarden", state_dir=Path("/s d"),
                     config=None)
    assert not (tmp_path / "qemu").exists() or hook.MARKER in (tmp_path / "qemu").read_text()
    done = hook.install(tmp_path, exe="/bin/echo", state_dir=Path("/s d"), config=None,
                        force=True)
    assert [p.name for p in done.paths] == ["qemu", "lxc"]
    for path in done.paths:
        assert path.stat().st_mode & stat.S_IXUSR
    # the script passes libvirt's arguments through, after our options
    out = subprocess.run([str(tmp_path / "qemu"), "vm1", "prepare", "begin", "-"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["hook", "run", "--state-dir", "/s", "d", "qemu", "vm1",
                           "prepare", "begin", "-"]
    # later steps: only for domains with pinwarden's metadata, XML passed through
    meta = "<domain><metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1'/></metadata></domain>"
    hook.install(tmp_path, exe=str(tmp_path / "cat-args"), state_dir=None, config=None)
    (tmp_path / "cat-args").write_text("#!/bin/sh\necho \"$@\"; cat\n")
    (tmp_path / "cat-args").chmod(0o755)
    for op in ("started", "release"):
        seen = subprocess.run([str(tmp_path / "qemu"), "vm1", op, "-", "-"], input=meta,
                              capture_output=True, text=True, check=True).stdout
        assert seen == f"hook run qemu vm1 {op} - -\n{meta}\n"
        plain = subprocess.run([str(tmp_path / "qemu"), "vm1", op, "-", "-"],
                               input="<domain/>", capture_output=True, text=True, check=True)
        assert plain.stdout == ""
    # after prepare, even a pinwarden that cannot run does not fail the step
    for op in ("started", "release"):
        hook.install(tmp_path, exe="/bin/false", state_dir=None, config=None)
        subprocess.run([str(tmp_path / "qemu"), "vm1", op, "-", "-"], input=meta,
                       text=True, check=True)
    failed = subprocess.run([str(tmp_path / "qemu"), "vm1", "prepare", "begin", "-"],
                            input="<domain/>", text=True)
    assert failed.returncode == 1
    # steps pinwarden ignores never reach it (no Python start-up inside libvirtd's start)
    skipped = subprocess.run([str(tmp_path / "qemu"), "vm1", "start", "begin", "-"],
                             input="<domain/>", capture_output=True, text=True, check=True)
    assert skipped.stdout == ""
    assert hook.uninstall(tmp_path) == done.paths


def test_hook_refusal_is_shown_as_the_hooks_own_line() -> None:
    class Err(Exception):
        def get_error_message(self) -> str:
            return ("Hook script execution failed: internal error: Child process (LC_ALL=C "
                    "/etc/libvirt/hooks/qemu d prepare begin -) unexpected exit status 1: "
                    "pinwarden: error: CPU 1 is leased to qemu domain 'a'")

    err = libvirt_failure("libvirt could not start domain 'd'", Err())
    assert err.message == ("libvirt could not start domain 'd': the libvirt hook refused: "
                           "CPU 1 is leased to qemu domain 'a'")
    assert err.code == "hook-refused"


# -- define -------------------------------------------------------------------------------

def test_define_stores_metadata_and_the_partition() -> None:
    source = xml("v", "<cputune exclusive='yes'><vcpupin vcpu='0' cpuset='1'/></cputune>")
    spec = parse_domain(source)
    stored = with_pinwarden_metadata(source, spec, "11111111-2222-3333-4444-555555555555",
                                     "/pinwarden/vm-v")
    again = parse_domain(stored)
    assert again.exclusive and again.uuid == "11111111-2222-3333-4444-555555555555"
    assert again.partition == "/pinwarden/vm-v"
    assert again.vcpupins == spec.vcpupins
    assert "exclusive='yes'><vcpupin" not in stored  # libvirt would drop it anyway


def test_a_start_in_progress_is_not_freed() -> None:
    starting = HolderRef("qemu", "uuid-new", "new")
    ran = HolderRef("qemu", "uuid-ran", "ran")
    holders = [record(starting, {0: "1"}, {1: "vcpu0"}, created=990.0),
               record(ran, {0: "2"}, {2: "vcpu0"}, created=990.0, owner=4242)]
    actions = reconcile([], holders, lambda h: "/pw", now=1000.0, grace=60.0)
    assert actions == [Free(ran, f"{ran} is not running")]
    later = reconcile([], holders, lambda h: "/pw", now=1100.0, grace=60.0)
    assert [a.holder for a in later if isinstance(a, Free)] == [starting, ran]


class _BrokenContext(Context):
    def ledger(self) -> Ledger:
        raise RuntimeError("boom")


def test_a_hook_bug_never_kills_a_running_domain(tmp_path: Path) -> None:
    ctx = _BrokenContext(Config(), Path("/"), tmp_path, "qemu:///system")
    exclusive = xml("v", "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' "
                         "exclusive='yes'/></metadata>")
    # started / release: reported (stderr and state_dir/hook.log), exit 0
    assert hook.main_run(ctx, "qemu", ["v", "started", "begin", "-"], exclusive) == 0
    assert hook.main_run(ctx, "qemu", ["v", "release", "end", "-"], exclusive) == 0
    logged = (tmp_path / hook.HOOK_LOG).read_text().splitlines()
    assert len(logged) == 2 and all("RuntimeError: boom" in line for line in logged)
    # prepare: refused in one line, saying how to bypass the hook
    with pytest.raises(PinwardenError) as err:
        hook.main_run(ctx, "qemu", ["v", "prepare", "begin", "-"], exclusive)
    assert err.value.code == "hook-bug" and "hook uninstall" in err.value.message
    # steps the hook ignores do nothing at all
    assert hook.main_run(ctx, "qemu", ["v", "reconnect", "begin", "-"], "not xml") == 0
