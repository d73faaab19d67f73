"""``pinwarden start/stop/define`` against the real libvirtd, QEMU and cgroup v1 (no hook).

* an exclusive start re-pins a running unpinned domain live, off the leased CPU;
* a running domain pinned by its own XML onto that CPU makes the start refuse, naming it,
  with every record and cgroup left as it was;
* a start that libvirt fails after the lease and cgroups were set up is rolled back;
* ``define`` stores pinwarden's metadata and partition, and refuses bad XML or pins.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pinwarden.cpuset import CpuSet
from pinwarden.domain import parse_domain
from pinwarden.errors import LibvirtError, Refusal
from pinwarden.libvirt import start

pytest.register_assert_rewrite("libvirt_env")

import libvirt_env as env  # noqa: E402

pytest_plugins = ["libvirt_env"]
pytestmark = pytest.mark.libvirt

EXCLUSIVE = "pwtest-start.partition"


@pytest.fixture
def pw(libvirt_daemons: env.Daemons, tmp_path: Path) -> Iterator[env.Pinwarden]:
    with env.pinwarden_without_hook(tmp_path, EXCLUSIVE) as tool:
        yield tool



def tree_state(pw: env.Pinwarden) -> dict[str, str]:
    """cpus and exclusive flag of every holder group of ``pw`` and of machine."""
    out: dict[str, str] = {}
    tops = sorted(p.name for p in env.CPUSET.glob(f"{pw.stem}-*.partition"))
    for top in (*tops, "machine"):
        base = env.CPUSET / top
        if not base.is_dir():
            continue
        for d in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            if "libvirt-qemu" in d.name or d.parent.name.endswith(".libvirt-qemu"):
                continue
            rel = str(d.relative_to(env.CPUSET))
            out[rel] = (f"{(d / 'cpuset.cpus').read_text().strip()} "
                        f"x{(d / 'cpuset.cpu_exclusive').read_text().strip()}")
    return out


@pytest.mark.parametrize("machine", ["0-1", "1"], ids=["machine-whole", "machine-pool"])
def test_exclusive_start_repins_a_running_shared_domain(pw: env.Pinwarden,
                                                        domains: env.Domains,
                                                        machine: str) -> None:
    """``machine`` as libvirt made it (all CPUs), or as pinwarden keeps it with nothing
    leased (the VM CPUs, {1} here): either way the shared domain moves to CPU 0."""
    a, s = "pwtest-start-a", "pwtest-start-s"
    if not (env.CPUSET / "machine").is_dir():  # let libvirt create it, in every hierarchy
        domains.create("pwtest-start-warm").destroy()
    (env.CPUSET / "machine" / "cpuset.cpus").write_text(machine)
    shared = domains.create(s)  # unpinned, started before any lease: runs on CPU 1 too
    assert 1 in env.vm_affinity(s)
    as_found = env.vm_affinity(s)
    domains.define(a, exclusive=True, vcpupins={0: "1"})

    # --dry-run: the same decisions, in order, and nothing changes
    before = tree_state(pw)
    dry = pw.run("start", a, "--dry-run", check=True).stdout
    group = pw.holder_group(a)
    assert dry.startswith(f"dry run: {a} would lease CPU 1 exclusively"), dry
    assert f"would create {group}" in dry and f"would make {group} exclusive" in dry, dry
    assert f"would re-pin running domain {s} vcpu0" in dry, dry
    assert f"in partition /{group.removesuffix('.partition')}" in dry, dry
    assert dry.rstrip().endswith("nothing was changed")
    assert tree_state(pw) == before and env.holder_names(pw) == ()
    assert not domains.conn.lookupByName(a).isActive() and 1 in env.vm_affinity(s)

    out = pw.run("start", a, check=True).stdout
    assert f"re-pinned {s}" in out
    assert env.vm_affinity(a) == {1}
    assert env.vm_affinity(s) == {0}
    live = pw.run("start", a)  # already running: refused, nothing changes
    assert live.returncode == 1 and "already running" in live.stderr
    assert env.vm_affinity(a) == {1}
    bits = shared.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
    assert [i for i, on in enumerate(bits) if on] == [0]  # libvirt's own view agrees
    assert env.cpu_exclusive(group) and env.read_cpus(group, "effective_cpus") == {1}
    assert env.holder_names(pw) == (a,)

    stopped = pw.run("stop", a, check=True).stdout
    assert "freed CPU 1" in stopped
    assert env.holder_names(pw) == ()
    assert not (env.CPUSET / group).exists()
    assert not domains.conn.lookupByName(a).isActive()
    # the shared domain gets back the CPU the lease took from it (before, it stayed on CPU
    # 0 until it was restarted), in the kernel and in libvirt's own view
    assert f"gave back {s} vcpu0: 0 -> {CpuSet.of(as_found)}" in stopped, stopped
    assert env.vm_affinity(s) == as_found
    bits = shared.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
    assert {i for i, on in enumerate(bits) if on} == as_found
    again = pw.run("stop", a, check=True).stdout  # nothing left to give back
    assert "gave back" not in again, again


@pytest.mark.parametrize("beside", [True, False], ids=["shared-running", "alone"])
def test_an_exclusive_start_from_a_pid_namespace_of_its_own_is_refused_and_undone(
        pw: env.Pinwarden, domains: env.Domains, beside: bool) -> None:
    """From a PID namespace of its own (a container's /proc), libvirt's processes are out
    of view: a running shared domain's threads read as none, so no re-pin was planned and
    the layout narrowed its vCPU group to nothing (ENOSPC); alone, the started domain's
    QEMU could not own the lease, which the start command kept, and a sync freed it while
    the domain ran (namespace hunt).  Refused, saying where to run it; nothing is left."""
    a, s = "pwtest-start-ns", "pwtest-start-ns-s"
    if not (env.CPUSET / "machine").is_dir():
        domains.create("pwtest-start-warm").destroy()
    (env.CPUSET / "machine" / "cpuset.cpus").write_text("0-1")
    if beside:
        domains.create(s)
        as_found = env.vm_affinity(s)
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    before = tree_state(pw)
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc",
                           *pw.cmd("start", a, "--no-daemon")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    assert "out of this PID namespace's view" in done.stderr, done.stderr
    assert "run 'pinwarden start' where libvirtd runs" in done.stderr, done.stderr
    assert ("nothing was changed" if beside else "stopped it and freed the lease") \
        in done.stderr, done.stderr
    assert not domains.conn.lookupByName(a).isActive()
    assert env.holder_names(pw) == () and tree_state(pw) == before
    if beside:
        assert env.vm_affinity(s) == as_found
    pw.run("start", a, check=True)  # from the host's namespace: as ever
    assert env.vm_affinity(a) == {1} and env.holder_names(pw) == (a,)
    pw.run("stop", a, check=True)


def test_a_shared_start_beside_a_lease_gets_the_cpu_when_it_ends(pw: env.Pinwarden,
                                                                 domains: env.Domains) -> None:
    """``pinwarden start`` of a shared domain while the only VM CPU is leased places it on
    the housekeeping CPU (the fallback); once the lease ends it gets the VM CPU, as a
    domain started by plain ``virsh start`` does through its cgroup alone.  Before, it
    stayed on the housekeeping CPU until it was restarted."""
    a, s = "pwtest-start-a4", "pwtest-start-s4"
    if not (env.CPUSET / "machine").is_dir():
        domains.create("pwtest-start-warm").destroy()
    (env.CPUSET / "machine" / "cpuset.cpus").write_text("1")  # VM CPU 1
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    pw.run("start", a, check=True)
    out = pw.run("start", s, check=True).stdout
    assert f"started {s} (shared on CPU 0)" in out, out
    assert env.vm_affinity(s) == {0}
    stopped = pw.run("stop", a, check=True).stdout
    assert f"gave back {s} vcpu0: 0 -> 1" in stopped, stopped
    assert f"gave back {s} emulator: 0 -> 1" in stopped, stopped
    assert env.vm_affinity(s) == {1}


def test_start_refused_by_a_domain_pinned_onto_the_cpu(pw: env.Pinwarden,
                                                       domains: env.Domains) -> None:
    a, p = "pwtest-start-a2", "pwtest-start-p"
    domains.create(p, vcpupins={0: "1"}, emulatorpin="1")
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    before = tree_state(pw)

    refused = pw.run("start", a)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pinwarden: error: "), refused.stderr
    assert f"'{p}'" in lines[0] and "CPU 1" in lines[0]
    assert env.holder_names(pw) == ()
    assert tree_state(pw) == before
    assert not domains.conn.lookupByName(a).isActive()
    assert env.vm_affinity(p) == {1}


def test_failed_start_is_rolled_back(pw: env.Pinwarden, domains: env.Domains,
                                     tmp_path: Path) -> None:
    a = "pwtest-start-a3"
    xml = env.tiny_domain_xml(a, exclusive=True, vcpupins={0: "1"})
    missing = tmp_path / "no-such-disk.img"
    xml = xml.replace("</emulator>", f"</emulator><disk type='file' device='disk'>"
                                     f"<source file='{missing}'/><target dev='vda' "
                                     f"bus='virtio'/></disk>")
    domains.track(a)
    domains.conn.defineXML(xml)
    before = tree_state(pw)

    failed = pw.run("start", a)
    assert failed.returncode == 1
    assert "libvirt could not start domain" in failed.stderr
    assert str(missing) in failed.stderr
    assert env.holder_names(pw) == ()
    assert tree_state(pw) == before  # every cgroup back as it was (the tree removed)


def test_a_failed_start_gives_the_repinned_domain_its_cpu_back(
        pw: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """The exclusive start re-pins running shared S off CPU 1 (recording it), then libvirt
    fails to start A: S gets CPU 1 back, in the kernel and in libvirt's own view, and no
    record of the re-pin is left to give back later."""
    from pinwarden.ledger import Ledger

    a, s = "pwtest-start-a5", "pwtest-start-s5"
    if not (env.CPUSET / "machine").is_dir():
        domains.create("pwtest-start-warm").destroy()
    (env.CPUSET / "machine" / "cpuset.cpus").write_text("1")  # VM CPU 1
    shared = domains.create(s)
    assert env.vm_affinity(s) == {1}
    missing = tmp_path / "no-such-disk.img"
    xml = env.tiny_domain_xml(a, exclusive=True, vcpupins={0: "1"}).replace(
        "</emulator>", f"</emulator><disk type='file' device='disk'><source "
                       f"file='{missing}'/><target dev='vda' bus='virtio'/></disk>")
    domains.track(a)
    domains.conn.defineXML(xml)

    failed = pw.run("start", a)
    assert failed.returncode == 1 and "libvirt could not start domain" in failed.stderr
    assert env.holder_names(pw) == ()
    assert env.vm_affinity(s) == {1}
    bits = shared.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
    assert {i for i, on in enumerate(bits) if on} == {1}
    with Ledger(pw.state) as ledger:
        assert ledger.changes() == {} and ledger.host_record() is None
    stopped = pw.run("stop", a, check=True).stdout  # nothing to give back
    assert "gave back" not in stopped, stopped


def test_a_name_libvirt_escapes_in_its_pid_file(pw: env.Pinwarden,
                                                domains: env.Domains) -> None:
    """libvirt names the pid file after the XML-escaped domain name (``o&apos;q&amp;x.pid``):
    ``pinwarden start`` finds QEMU there, hands it the lease and verifies it, and a sync
    keeps the lease of the running domain."""
    from pinwarden.ledger import Ledger

    a = "pwtest-start-o'q&x"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    started = pw.run("start", a, check=True).stdout
    assert f"pid {env.qemu_pid(a)}, cgroup /" in started, started
    with Ledger(pw.state) as ledger:
        (record,) = ledger.holders()
    assert record.ref.name == a and record.owner_pid == env.qemu_pid(a)
    assert env.vm_affinity(a) == {1}
    pw.run("sync", check=True)
    assert env.holder_names(pw) == (a,)
    pw.run("stop", a, check=True)
    assert env.holder_names(pw) == ()


def test_a_vcpu_hot_plugged_while_leased_runs_off_the_lease_and_gets_its_cpus_back(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """A shared domain with an offline vCPU (<vcpu current='1'>2</vcpu>): libvirt keeps a
    live pin for it, which a hot-plug ('virsh setvcpus --live') gives the new thread and
    its cgroup.  The exclusive start re-pins it off the lease with the others: before, the
    hot-plug failed while the CPU was leased (cgroup v1 refused the vCPU's cgroup CPU 1,
    exclusive to the lease: 'Permission denied'); the lease's end gives it back."""
    a, s = "pwtest-start-ha", "pwtest-start-hs"
    domains.track(s)
    domains.conn.defineXML(env.tiny_domain_xml(s, vcpus=2).replace(
        "<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>"))
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    pw.run("start", s, check=True)
    assert env.vm_affinity(s) == {1}
    out = pw.run("start", a, check=True).stdout
    assert f"re-pinned {s} vcpu1: 1 -> 0" in out, out
    plugged = env.virsh("setvcpus", s, "2", "--live")
    assert plugged.returncode == 0, plugged.stderr
    assert env.thread_affinities(s)["CPU 1/KVM"] == {0}
    stopped = pw.run("stop", a, check=True).stdout
    assert f"gave back {s} vcpu1: 0 -> 1" in stopped, stopped
    assert set(env.thread_affinities(s).values()) == {frozenset({1})}, \
        env.thread_affinities(s)


def test_vcpus_online_out_of_order_are_known_by_number(pw: env.Pinwarden,
                                                       domains: env.Domains) -> None:
    """vCPUs 0 and 2 online, 1 offline (<vcpus><vcpu id='1' enabled='no'/>): libvirt
    lists the online ones' affinity in order, each with its number.  Read by position,
    vCPU 2's CPU was checked against vCPU 1's pin and 'pinwarden start' stopped the domain
    ("the kernel does not confine it to its plan"); and the snapshot gave vCPU 2's CPUs
    to vCPU 1."""
    from pinwarden.libvirt import connect as lv

    s = "pwtest-start-order"
    domains.track(s)
    xml = env.tiny_domain_xml(s, vcpus=3, vcpupins={0: "1", 1: "1", 2: "0"}).replace(
        "<vcpu>3</vcpu>", "<vcpu placement='static' current='2'>3</vcpu><vcpus>"
        "<vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>"
        "<vcpu id='1' enabled='no' hotpluggable='yes'/>"
        "<vcpu id='2' enabled='yes' hotpluggable='yes' order='2'/></vcpus>")
    domains.conn.defineXML(xml)
    pw.run("start", s, check=True)
    threads = env.thread_affinities(s)
    assert threads["CPU 0/KVM"] == {1} and threads["CPU 2/KVM"] == {0}, threads
    info = lv.domain_info(domains.conn.lookupByName(s), "qemu")
    assert info.affinity is not None and info.affinity.offline == {1}
    assert info.affinity.vcpus == {0: CpuSet.parse("1"), 1: CpuSet.parse("1"),
                                   2: CpuSet.parse("0")}
    pw.run("stop", s, check=True)


@pytest.mark.parametrize(("exclusive", "pinned"), [(False, False), (True, False),
                                                   (False, True)],
                         ids=["shared", "exclusive", "shared-pinned"])
def test_a_domain_asking_numad_starts_placed_by_pinwarden_without_numad(
        pw: env.Pinwarden, domains: env.Domains, exclusive: bool, pinned: bool) -> None:
    """<vcpu placement='auto'>: libvirt adds <numatune><memory placement='auto'> and asks
    numad at the start.  pinwarden places the domain instead, its memory on the node of
    its CPUs: it starts with or without numad — on a host without it (this one) it failed
    with "Failed to query numad for the advisory nodeset", though 'define' said pinwarden
    places it.  So did a shared domain whose every thread is pinned (XML hunt)."""
    a = "pwtest-start-numad"
    domains.track(a)
    pins: dict[str, object] = {"vcpupins": {0: "1"}, "emulatorpin": "1"} if pinned else {}
    domains.conn.defineXML(env.tiny_domain_xml(
        a, exclusive=exclusive, **pins).replace(  # type: ignore[arg-type]
        "<vcpu>1</vcpu>", "<vcpu placement='auto'>1</vcpu>"))
    assert "placement='auto'" in domains.conn.lookupByName(a).XMLDesc(
        env.libvirt.VIR_DOMAIN_XML_INACTIVE)
    out = pw.run("start", a, check=True).stdout
    assert "memory on NUMA node 0" in out, out
    live = parse_domain(domains.conn.lookupByName(a).XMLDesc(0))
    assert live.placement == "static" and live.cpuset == (None if pinned else
                                                          CpuSet.parse("1"))
    assert live.numa_nodeset == CpuSet.parse("0") and env.vm_affinity(a) == {1}
    pw.run("stop", a, check=True)


def test_define_stores_metadata_and_refuses_bad_input(pw: env.Pinwarden,
                                                      domains: env.Domains,
                                                      tmp_path: Path) -> None:
    name = "pwtest-start-def"
    source = tmp_path / "def.xml"
    nova = "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>" \
        "<nova:name>def</nova:name></nova:instance>"
    source.write_text(env.tiny_domain_xml(name, vcpupins={0: "1"}).replace(
        "<cputune>", "<cputune exclusive='yes'>").replace(
        "</name>", f"</name><metadata>{nova}</metadata>", 1))
    domains.track(name)
    out = pw.run("define", str(source), check=True).stdout
    assert "exclusive" in out and "would lease CPU 1" in out
    xml = domains.conn.lookupByName(name).XMLDesc(0)
    # another tool's metadata keeps its prefix (it was stored as ns0:instance)
    assert 'xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"' in xml and \
        "<nova:instance>" in xml and "ns0" not in xml, xml
    stored = parse_domain(xml)
    assert stored.exclusive
    assert stored.partition == f"/{EXCLUSIVE.removesuffix('.partition')}-vm-{name}"

    for text, why in (("<domain><name>x</name", "malformed"),
                      (env.tiny_domain_xml("pwtest-start-bad", vcpupins={0: "7"}), "7")):
        bad = tmp_path / "bad.xml"
        bad.write_text(text)
        refused = pw.run("define", str(bad))
        assert refused.returncode == 1, refused.stdout
        assert why in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        with contextlib.suppress(env.libvirt.libvirtError):
            domains.conn.lookupByName("pwtest-start-bad")
            pytest.fail("a refused definition was stored")



def test_define_while_the_cpus_are_leased_defines_and_says_it_cannot_start_now(
        pw: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A definition is not a start: an exclusive domain this host can run is defined while
    another holds every VM CPU, saying why it cannot start now (before, it was refused
    with advice to release the other domain's CPUs, found on a real systemd host).  XML
    this host could not run even with nothing leased (two exclusive vCPUs, one VM CPU) is
    still refused, and nothing is defined."""
    a, later, never = "pwtest-start-dfa", "pwtest-start-dfl", "pwtest-start-dfn"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    pw.run("start", a, check=True)
    source = tmp_path / "later.xml"
    source.write_text(env.tiny_domain_xml(later, exclusive=True))
    domains.track(later)
    out = pw.run("define", str(source), check=True).stdout
    assert out.startswith(f"defined {later} (exclusive; would lease CPU 1 with nothing "
                          f"leased; it cannot start now: "), out
    assert f"qemu domain '{a}'" in out, out
    assert parse_domain(domains.conn.lookupByName(later).XMLDesc(0)).exclusive
    refused = pw.run("start", later)
    assert refused.returncode == 1 and a in refused.stderr, refused.stderr
    source.write_text(env.tiny_domain_xml(never, exclusive=True, vcpus=2))
    domains.track(never)
    impossible = pw.run("define", str(source))
    assert impossible.returncode == 1, impossible.stdout
    assert "2" in impossible.stderr and len(impossible.stderr.strip().splitlines()) == 1
    with pytest.raises(env.libvirt.libvirtError):
        domains.conn.lookupByName(never)
    assert env.holder_names(pw) == (a,)
    pw.run("stop", a, check=True)



def test_an_exclusive_domain_asking_for_a_shared_emulator_starts_with_it_floating(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """emulator='shared' planned the emulator on the shared CPUs, which its cgroup — a
    child of the holder partition — can never have: beside a shared VM the start was
    refused ("no CPU would be left for vcpu0 of running domain …"), alone libvirt failed
    ("Permission denied" on the emulator's cpuset.cpus) (real-libvirt hunt).  It is
    planned floating on the domain's CPU now, says so, and starts either way."""
    e, s = "pwtest-start-shem", "pwtest-start-shs"
    domains.track(e)
    domains.conn.defineXML(env.tiny_domain_xml(e, exclusive=True).replace(
        "exclusive='yes'/>", "exclusive='yes' emulator='shared'/>"))
    for beside in (False, True):
        if beside:
            domains.define(s)
            pw.run("start", s, check=True)
        out = pw.run("start", e, check=True).stdout
        assert "emulator='shared' of exclusive domain" in out and "cannot be honoured" in out, out
        assert set(env.thread_affinities(e).values()) == {frozenset({1})}, \
            env.thread_affinities(e)
        if beside:
            assert f"re-pinned {s} vcpu0: 1 -> 0" in out, out
        pw.run("stop", e, check=True)
    pw.run("stop", s, check=True)


def test_racing_starts_leave_one_running_domain_with_its_lease(pw: env.Pinwarden,
                                                              domains: env.Domains) -> None:
    a = "pwtest-start-race"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    procs = [subprocess.Popen(pw.cmd("start", a), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "already running" in loser, loser
    assert env.holder_names(pw) == (a,)
    assert env.vm_affinity(a) == {1}
    group = pw.holder_group(a)
    assert env.cpu_exclusive(group) and env.read_cpus(group, "effective_cpus") == {1}


def test_the_narrowings_a_start_makes_are_recorded_before_they_are_made(
        pw: env.Pinwarden, domains: env.Domains, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exclusive start re-pins a running shared domain off its CPU, and a shared start
    beside the lease places the domain narrower: each is recorded, to be given back when
    the lease ends.  The records were written after the re-pin and after the domain
    started, and a kill in between (SIGKILL, OOM, power) left the domain on the
    housekeeping CPU for good: nothing knew to give it back (crash hunt).  Now each record
    is there before libvirt is asked; a record of a move not made is forgotten."""
    from pinwarden.config import load_config
    from pinwarden.libvirt import connect as lv
    from pinwarden.manager import Manager
    from pinwarden.narrowed import NARROWED_PREFIX, narrowed_key

    a, s, t = "pwtest-start-wa", "pwtest-start-ws", "pwtest-start-wt"
    if not (env.CPUSET / "machine").is_dir():
        domains.create("pwtest-start-warm").destroy()
    domains.create(s)
    as_found = env.vm_affinity(s)  # (started before any lease: CPU 1 too)
    assert 1 in as_found
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(t)
    seen: list[tuple[str, bool]] = []

    def recorded(uuid: str, label: str) -> bool:
        return narrowed_key(uuid, label) in manager.change_records(NARROWED_PREFIX)

    real_repin, real_create = lv.apply_repin, start._create

    def apply_repin(conn: Any, move: Any) -> bool:
        seen.append((f"re-pin {move.domain} {move.label}", recorded(move.uuid, move.label)))
        return real_repin(conn, move)

    def create(conn: Any, holder: Any, xml: str) -> Any:
        seen.append((f"create {holder.name}", holder.name != t or
                     recorded(holder.uuid or "", "vcpu0")))
        return real_create(conn, holder, xml)

    monkeypatch.setattr(lv, "apply_repin", apply_repin)
    monkeypatch.setattr(start, "_create", create)
    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        start.start(manager, env.URI, a)
        start.start(manager, env.URI, t)
    assert (f"re-pin {s} vcpu0", True) in seen and (f"create {t}", True) in seen, seen
    assert all(ok for _, ok in seen), seen
    assert env.vm_affinity(s) == {0} and env.vm_affinity(t) == {0}
    pw.run("stop", a, check=True)
    assert env.vm_affinity(s) == as_found and env.vm_affinity(t) == {1}


def test_a_repin_of_a_domain_that_stopped_meanwhile_is_nothing_to_do(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """An exclusive start (or a daemon pass) re-pins the running shared domains it listed;
    one that stops before its turn failed the whole start: "cannot re-pin vcpu0 of domain
    's1' to CPU 0: … domain is not running" (hunt).  Now its re-pin is nothing to do."""
    from pinwarden.libvirt import connect as lv
    from pinwarden.libvirt.state import Repin

    persistent, transient = "pwtest-start-gone1", "pwtest-start-gone2"
    domains.define(persistent)
    dom = domains.conn.lookupByName(persistent)
    dom.create()
    domains.create(transient)
    moves = {name: Repin(name, domains.uuid(name), "vcpu", 0, CpuSet.parse("0-1"),
                         CpuSet.parse("0")) for name in (persistent, transient)}
    assert lv.apply_repin(domains.conn, moves[persistent]) is True  # running: done
    bits = dom.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
    assert {i for i, on in enumerate(bits) if on} == {0}
    for name in (persistent, transient):
        domains.conn.lookupByName(name).destroy()  # (the transient one is gone for good)
        assert lv.apply_repin(domains.conn, moves[name]) is False
    bad = Repin(persistent, domains.uuid(persistent), "vcpu", 7, CpuSet.parse("0-1"),
                CpuSet.parse("0"))
    dom.create()  # a running domain's refusal still is one (it has no vCPU 7)
    with pytest.raises(LibvirtError, match=f"cannot re-pin vcpu7 of domain '{persistent}'"):
        lv.apply_repin(domains.conn, bad)


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_a_domain_with_a_managed_save_image_is_not_cold_booted(
        pw: env.Pinwarden, domains: env.Domains, exclusive: bool) -> None:
    """``pinwarden start`` boots from the definition: a domain with a managed save image
    was cold-booted, its saved state thrown away and the image kept (a later 'virsh start'
    would restore it over disks changed meanwhile) (hunt).  Now it is refused before
    anything is reserved, saying how to restore or discard the image; 'virsh start'
    restores it."""
    a = f"pwtest-start-saved-{'x' if exclusive else 's'}"
    kw: dict[str, Any] = {"exclusive": True, "vcpupins": {0: "1"}} if exclusive else {}
    dom = domains.define(a, **kw)
    pw.run("start", a, "--no-daemon", check=True)
    qemu = env.qemu_pid(a)
    assert dom.managedSave(0) == 0 and dom.hasManagedSaveImage(0)
    pw.run("sync", check=True)  # (its QEMU gone: an exclusive lease is freed)
    assert env.holder_names(pw) == ()
    for extra in ((), ("--dry-run",), ("--json",)):
        refused = pw.run("start", a, "--no-daemon", *extra)
        assert refused.returncode == 1, refused
        assert f"domain '{a}' has a managed save image" in refused.stderr and \
            f"virsh start {a} restores it" in refused.stderr and \
            f"virsh managedsave-remove {a}" in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert ("with pinwarden's hook installed" in refused.stderr) == exclusive
    assert env.holder_names(pw) == () and dom.hasManagedSaveImage(0) and not dom.isActive()
    if exclusive:  # (restored without the hook, its holder group is gone: test_libvirt_e2e)
        dom.managedSaveRemove(0)
        pw.run("start", a, "--no-daemon", check=True)  # as the message says
        assert env.vm_affinity(a) == {1}
        pw.run("stop", a, check=True)
        return
    dom.create()  # what the message says: libvirt restores the saved state
    assert dom.isActive() and not dom.hasManagedSaveImage(0)
    assert env.qemu_pid(a) != qemu
    dom.destroy()


#: ``pinwarden ARGV`` (after the first two words) whose call to libvirt is raced by an
#: exclusive start (``sys.argv[2]``, run as its own command) just before (``before``) or just
#: after (``after``) libvirt creates the domain.
_RACED_BY_AN_EXCLUSIVE_START = """
import subprocess, sys
from pinwarden.libvirt import start

real, when, other = start._create, sys.argv[1], sys.argv[2].split()
calls = []

def create(conn, holder, xml):
    calls.append(xml)
    if when in ("before", "ended") and len(calls) == 1:
        subprocess.run(other, check=True, stdout=subprocess.DEVNULL)
    dom = real(conn, holder, xml)
    if when == "after" and len(calls) == 1:
        subprocess.run(other, check=True, stdout=subprocess.DEVNULL)
    return dom

start._create = create
from pinwarden.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["before", "after", "ended"])
def test_a_shared_start_raced_by_an_exclusive_one_starts_on_what_is_left(
        pw: env.Pinwarden, domains: env.Domains, when: str) -> None:
    """A shared 'pinwarden start' plans CPU 1 (nothing leased); an exclusive start takes
    CPU 1 before libvirt writes that plan into the new domain's cgroups (the kernel refuses:
    'Unable to write … cpuset.cpus: Permission denied') or right after the domain started
    (it runs confined to CPU 0, outside its plan).  The shared start failed, or pinwarden
    stopped the domain it had started (hunt).  Now it is planned again and starts on CPU 0,
    libvirt's pins saying so, and gets CPU 1 back when the lease ends.

    ``ended``: the lease ends between the plan (CPU 0) and the start; the give-back of its
    end has run, and nothing recorded the domain as placed narrower, so it stayed on CPU 0
    for good (hunt).  Now it gets CPU 1 at once."""
    import sys

    x, s = f"pwtest-start-rx-{when}", f"pwtest-start-rs-{when}"
    if not (env.CPUSET / "machine").is_dir():
        domains.create("pwtest-start-warm").destroy()
    # nothing leased: VM CPU 1 (as pinwarden keeps machine), or every CPU (as libvirt
    # makes it: the plan's CPU 0 stays allowed after the lease ended)
    machine = "0-1" if when == "ended" else "1"
    (env.CPUSET / "machine" / "cpuset.cpus").write_text(machine)
    domains.define(x, exclusive=True, vcpupins={0: "1"})
    dom = domains.define(s)
    other = " ".join(pw.cmd("start", x, "--no-daemon"))
    if when == "ended":
        subprocess.run(other.split(), check=True, stdout=subprocess.DEVNULL)
        other = " ".join(pw.cmd("stop", x))
    done = subprocess.run([sys.executable, "-c", _RACED_BY_AN_EXCLUSIVE_START, when, other,
                           *pw.cmd("start", s, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.startswith(f"started {s} (shared on CPU 0)"), done.stdout
    if when == "ended":
        assert env.holder_names(pw) == ()
        assert env.vm_affinity(s) == {1}  # given back at once
        bits = dom.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
        assert {i for i, on in enumerate(bits) if on} == {1}
        status = pw.run("status", "--json", check=True).stdout
        assert '"narrowed": []' in status, status
        pw.run("stop", s, check=True)
        return
    assert env.vm_affinity(x) == {1} and env.vm_affinity(s) == {0}
    bits = dom.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
    assert {i for i, on in enumerate(bits) if on} == {0}
    assert env.holder_names(pw) == (x,)
    stopped = pw.run("stop", x, check=True).stdout
    assert f"gave back {s}" in stopped, stopped
    assert env.vm_affinity(s) == {1}
    pw.run("stop", s, check=True)


#: ``pinwarden ARGV`` whose call to libvirt starts the domain and then fails as libvirt
#: reports it when another call won the race (``virsh start`` of the same domain) or when
#: libvirtd restarted during the call and completed the start after it.
_START_THEN_FAIL = """
import sys
from pinwarden.libvirt import start
from pinwarden.errors import LibvirtError

real = start._create

def create(conn, holder, xml):
    if sys.argv[1] == "raced":  # another call starts it first: libvirt's own refusal
        conn.createXML(xml, 0)
        return real(conn, holder, xml)
    real(conn, holder, xml)
    raise LibvirtError(f"libvirt could not start domain {holder.name!r}: End of file while "
                       f"reading data: Input/output error")

start._create = create
from pinwarden.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["raced", "lost"])
def test_a_start_that_fails_while_the_domain_runs_keeps_its_lease(
        pw: env.Pinwarden, domains: env.Domains, how: str) -> None:
    """libvirt reports the start failed although the domain runs: another call started it
    first ("already active"), or libvirtd restarted during the call and completed it ("End
    of file while reading data").  The rollback dropped the lease of the running domain —
    status and audit said its CPU free, the next exclusive start blamed pinwarden's own
    group as "not managed by pinwarden" (hunt).  Now the lease stays, handed on to QEMU,
    and the error says the domain runs."""
    import json
    import sys

    from pinwarden.ledger import Ledger

    a = f"pwtest-start-{how}"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    done = subprocess.run([sys.executable, "-c", _START_THEN_FAIL, how,
                           *pw.cmd("start", a, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.stdout, done.stderr)
    qemu = env.qemu_pid(a)
    said = "already active" if how == "raced" else "End of file while reading data"
    assert said in done.stderr and f"but domain '{a}' was running when it did (process " \
        f"{qemu}" in done.stderr and "keeps its lease while it runs ('virsh domstate " \
        f"{a}' shows whether it still does" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    with Ledger(pw.state) as ledger:
        assert [(h.ref.name, h.owner_pid) for h in ledger.holders()] == [(a, qemu)]
    status = json.loads(pw.run("status", "--json", check=True).stdout)
    assert status["leased"] == "1", status
    assert env.cpu_exclusive(pw.holder_group(a)) and env.vm_affinity(a) == {1}
    pw.run("stop", a, check=True)
    assert env.holder_names(pw) == ()


def test_a_shared_start_that_fails_while_the_domain_runs_says_it_runs(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """The same race for a domain that asks for nothing exclusive: libvirtd restarted
    during 'pinwarden start' and completed the start, and pinwarden said only "libvirt
    could not start domain" — a user or a script retried ("already running") or took the
    VM for down (concurrency hunt).  It has no lease to keep; the error says it runs."""
    import sys

    s = "pwtest-start-shared-lost"
    domains.define(s)
    done = subprocess.run([sys.executable, "-c", _START_THEN_FAIL, "lost",
                           *pw.cmd("start", s, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.stdout, done.stderr)
    qemu = env.qemu_pid(s)
    assert "End of file while reading data" in done.stderr \
        and f"but domain '{s}' was running when it did (process {qemu}: " in done.stderr \
        and "lease" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    pw.run("stop", s, check=True)


#: ``pinwarden ARGV`` that sends itself signal ``argv[2]`` while it leases (``lease``: under
#: the lock, in the planner), once it has leased and re-pinned (``create``: just before
#: libvirt starts the domain), or as libvirt's create returns (``started``).
_SIGNALLED_START = """
import os, signal, sys
from pinwarden.libvirt import repin, start

# as in a terminal: a test run started in the background inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
where, sig = sys.argv[1], getattr(signal, sys.argv[2])
if where == "lease":
    decide = repin.ExclusivePlanner.__call__

    def planned(self, host, leases):
        os.kill(os.getpid(), sig)
        return decide(self, host, leases)

    repin.ExclusivePlanner.__call__ = planned
elif where == "create":
    create = start._create

    def created(conn, holder, xml):
        os.kill(os.getpid(), sig)
        return create(conn, holder, xml)

    start._create = created
else:  # "started": as libvirt's create returns (the signal came while it started QEMU)
    create = start._create

    def created(conn, holder, xml):
        dom = create(conn, holder, xml)
        os.kill(os.getpid(), sig)
        return dom

    start._create = created
from pinwarden.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(("where", "sig"), [("lease", "SIGINT"), ("lease", "SIGTERM"),
                                            ("create", "SIGTERM"), ("create", "SIGHUP")])
def test_a_signalled_start_leaves_the_host_as_it_was(
        pw: env.Pinwarden, domains: env.Domains, where: str, sig: str) -> None:
    """Ctrl-C or SIGTERM of ``pinwarden start`` while it leased: the lease and the layout
    were made, and stayed — ``machine`` narrowed, the holder group made, the running shared
    domain on the housekeeping CPU — until some later command reaped the dead reservation
    (real-libvirt hunt); a SIGTERM or SIGHUP later in the start ended the process at once,
    with the same result.  Now each undoes the start (the re-pins too), and then Ctrl-C
    says so and SIGTERM and SIGHUP end the process as they would have."""
    import signal
    import sys

    a, s = f"pwtest-start-sig{where}", "pwtest-start-sigs"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    pw.run("start", s, check=True)
    before = (tree_state(pw), env.vm_affinity(s))
    assert before[1] == {1}
    done = subprocess.run([sys.executable, "-c", _SIGNALLED_START, where, sig,
                           *pw.cmd("start", a, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=120)
    if sig == "SIGINT":
        assert done.returncode == 130, (done.stdout, done.stderr)
        assert done.stderr == f"pinwarden: interrupted before domain '{a}' started (its " \
            "CPUs are free again)\n", done.stderr
    else:
        assert done.returncode == -getattr(signal, sig), (done.stdout, done.stderr)
        assert done.stderr == "", done.stderr
    assert not domains.conn.lookupByName(a).isActive()
    assert env.holder_names(pw) == ()
    assert (tree_state(pw), env.vm_affinity(s)) == before
    assert not (env.CPUSET / pw.holder_group(a)).exists()
    pw.run("stop", s, check=True)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_start_signalled_while_libvirt_started_the_domain_says_it_runs(
        pw: env.Pinwarden, domains: env.Domains, sig: str) -> None:
    """Ctrl-C or SIGTERM while libvirt started the domain: it runs, with its lease, and
    the command said only "interrupted" (SIGTERM: nothing at all; durability hunt).  Now it
    says that the domain runs and keeps its lease, and how to end it."""
    import signal
    import sys

    a = "pwtest-start-sigstarted"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    done = subprocess.run([sys.executable, "-c", _SIGNALLED_START, "started", sig,
                           *pw.cmd("start", a, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=120)
    assert domains.conn.lookupByName(a).isActive()
    qemu = env.qemu_pid(a)
    said = (f"after domain '{a}' started: it runs (process {qemu}) and keeps its lease while "
            f"it runs ('virsh domstate {a}' shows whether it still does; 'pinwarden stop' "
            f"ends it)\n")
    if sig == "SIGINT":
        assert (done.returncode, done.stderr) == (130, f"pinwarden: interrupted {said}"), \
            done.stderr
    else:
        assert (done.returncode, done.stderr) == (-signal.SIGTERM, f"pinwarden: ended {said}"), \
            done.stderr
    assert env.holder_names(pw) == (a,)
    pw.run("stop", a, check=True)
    assert env.holder_names(pw) == ()


@pytest.mark.parametrize("broken", ["read-only", "full"])
def test_a_shared_start_goes_on_while_the_lease_database_cannot_be_used(
        pw: env.Pinwarden, domains: env.Domains, broken: str) -> None:
    """The state directory read-only, or its file system full: 'pinwarden start' of a
    shared domain failed ("cannot create a lock …", "the file system is full …"), though
    it asks for nothing exclusive — the hook lets such a domain through then (durability
    hunt).  It starts, unchecked, where libvirt places it (off the lease: the kernel keeps
    the narrowed VM partition), saying so; an exclusive start is refused as before."""
    import dataclasses

    a, s, b = "pwtest-start-ro-a", "pwtest-start-ro-s", "pwtest-start-ro-b"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(b, exclusive=True)
    domains.define(s)
    mounted: list[str] = []
    try:
        if broken == "full":  # the state directory on a small file system of its own
            disk = pw.state.with_name("disk")
            disk.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           check=True)
            mounted.append(str(disk))
            pw = dataclasses.replace(pw, state=disk / "state")
        pw.run("start", a, "--no-daemon", check=True)
        if broken == "read-only":
            subprocess.run(["mount", "--bind", str(pw.state), str(pw.state)], check=True)
            mounted.append(str(pw.state))
            subprocess.run(["mount", "-o", "remount,ro,bind", str(pw.state)], check=True)
        else:
            with contextlib.suppress(OSError), open(pw.state.parent / "fill", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        refused = pw.run("start", b, "--no-daemon")
        assert refused.returncode == 1 and not domains.conn.lookupByName(b).isActive(), \
            refused.stderr
        started = pw.run("start", s, "--no-daemon")
        assert started.returncode == 0, started.stderr
        assert "pinwarden cannot use its lease database (" in started.stdout and \
            f"started shared domain '{s}' unchecked" in started.stdout, started.stdout
        assert env.vm_affinity(s) == {0}
    finally:
        with contextlib.suppress(env.libvirt.libvirtError):
            domains.conn.lookupByName(s).destroy()
        if broken == "full":
            (pw.state.parent / "fill").unlink(missing_ok=True)
        elif mounted:
            subprocess.run(["umount", mounted.pop()], check=True)
        with contextlib.suppress(env.libvirt.libvirtError):
            if domains.conn.lookupByName(a).isActive():
                pw.run("stop", a, check=True)
        left = env.holder_names(pw)  # (before the state directory's disk goes)
        for path in reversed(mounted):
            subprocess.run(["umount", path], check=True)
    assert left == ()


#: ``pinwarden ARGV`` while libvirtd goes away: ``start`` — libvirt fails the start, and
#: every call after it fails as a restarting libvirtd's do; ``stop`` — the destroy is done,
#: then the connection breaks.
_LIBVIRTD_GONE = """
import sys
import libvirt
from pinwarden.libvirt import start
from pinwarden.errors import LibvirtError

def gone(*args, **kwargs):
    raise libvirt.libvirtError("internal error: client socket is closed")

if sys.argv[1] == "start":
    def create(conn, holder, xml):
        libvirt.virConnect.getCPUMap = gone
        libvirt.virConnect.lookupByUUIDString = gone
        raise LibvirtError(f"libvirt could not start domain {holder.name!r}: End of file "
                           f"while reading data: Input/output error")

    start._create = create
else:
    destroy = libvirt.virDomain.destroy

    def destroyed(self):
        destroy(self)
        libvirt.virDomain.isActive = gone
        raise libvirt.libvirtError("End of file while reading data: Input/output error")

    libvirt.virDomain.destroy = destroyed
from pinwarden.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_start_and_a_stop_while_libvirtd_goes_away_say_what_happened(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """libvirtd restarting during ``pinwarden start``: the start failed, and its rollback's
    first call to libvirt (undoing a re-pin) raised libvirt's raw error — the rest of the
    rollback was skipped and the command ended in "libvirt failed: … client socket is
    closed (… try again once it is)" (real-libvirt hunt).  Now the start's own error is
    said, the lease is freed, and a re-pin libvirt could not undo keeps its record, for the
    next give-back.  The same during ``pinwarden stop``: the domain was stopped and the
    command said it failed; now it is stopped, and said so."""
    import sys

    a, s = "pwtest-start-gone-a", "pwtest-start-gone-s"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    pw.run("start", s, check=True)
    done = subprocess.run([sys.executable, "-c", _LIBVIRTD_GONE, "start",
                           *pw.cmd("start", a, "--no-daemon")[1:]],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (1, (
        f"pinwarden: error: libvirt could not start domain '{a}': End of file while reading "
        f"data: Input/output error\n")), done.stderr
    assert env.holder_names(pw) == () and not domains.conn.lookupByName(a).isActive()
    live = env.libvirt.VIR_DOMAIN_AFFECT_LIVE
    bits = domains.conn.lookupByName(s).vcpuPinInfo(live)[0]
    assert {i for i, on in enumerate(bits) if on} == {0}  # the re-pin libvirt kept ...
    status = pw.run("status", check=True).stdout
    assert f"{s} vcpu0: pinned to 0 (had 1); CPU 1 free again, not given back yet" in \
        status, status  # ... is recorded, and given back by the next sync
    assert "gave back" in pw.run("sync", check=True).stdout
    assert env.vm_affinity(s) == {1}
    pw.run("start", a, check=True)
    stopped = subprocess.run([sys.executable, "-c", _LIBVIRTD_GONE, "stop",
                              *pw.cmd("stop", a)[1:]], capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0 and stopped.stderr == "", stopped.stderr
    assert stopped.stdout.startswith(f"{a} stopped; freed CPU 1"), stopped.stdout
    assert env.holder_names(pw) == () and not domains.conn.lookupByName(a).isActive()
    pw.run("stop", s, check=True)


def test_graceful_stop_that_times_out_keeps_domain_and_lease(pw: env.Pinwarden,
                                                             domains: env.Domains) -> None:
    """The firmware-only guest ignores ACPI shutdown: --graceful gives up after --timeout,
    one line, with the domain still running and its CPUs still leased."""
    a = "pwtest-start-grace"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    pw.run("start", a, check=True)
    slow = pw.run("stop", a, "--graceful", "--timeout", "2")
    assert slow.returncode == 1
    assert "did not shut down within 2 s" in slow.stderr
    assert len(slow.stderr.strip().splitlines()) == 1
    assert domains.conn.lookupByName(a).isActive()
    assert env.holder_names(pw) == (a,)
    assert env.vm_affinity(a) == {1}
    pw.run("stop", a, check=True)
    assert env.holder_names(pw) == ()


# -- messages (fakes: no libvirtd needed, though the module's mark still applies) -----------


class _RunningDomain:
    """A running libvirt domain as far as the refusals before any lease look at it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def isActive(self) -> bool:
        return True

    def name(self) -> str:
        return self._name


class _Connection:
    def lookupByName(self, name: str) -> _RunningDomain:
        return _RunningDomain(name)


@pytest.mark.parametrize(("name", "command"), [("my vm", "pinwarden stop 'my vm'"),
                                               ("web", "pinwarden stop web"),
                                               ("-x", "pinwarden stop -- -x")])
def test_suggested_stop_commands_work_as_typed(name: str, command: str) -> None:
    """The domain's name quoted for the shell (after '--' when it looks like an option)."""
    manager: Any = None  # refused before the manager is used
    with pytest.raises(Refusal) as info:
        start.start(manager, "qemu:///system", name, conn=_Connection())
    assert info.value.message == f"domain {name!r} is already running; stop it first " \
        f"({command})"
    with pytest.raises(LibvirtError) as failed:
        start._wait_inactive(_RunningDomain(name), name, 0)
    assert failed.value.message == f"domain {name!r} did not shut down within 0 s; destroy " \
        f"it with {command} (without --graceful)"



def test_a_running_domain_whose_first_owner_died_keeps_its_lease(pw: env.Pinwarden,
                                                                 domains: env.Domains) -> None:
    """The lease's owner until QEMU takes it over (libvirtd at the hook's ``prepare``, a
    ``pinwarden start``) ends before it does — libvirtd restarted while the ``started`` hook
    was killed, a ``pinwarden start --no-daemon`` killed after libvirt's call: the domain
    runs on, in its holder group.  ``status`` and ``audit`` called its CPU free, and the
    next change freed the lease while the kernel kept CPU 1 exclusive for the domain; a
    shared domain pinned there then failed in libvirt (hunt).  Now the reads count it as
    running and the next change hands the lease on to QEMU."""
    import json
    import signal

    from pinwarden.ledger import Ledger

    a = "pwtest-start-heir"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    pw.run("start", a, "--no-daemon", check=True)
    qemu = env.qemu_pid(a)
    stand_in = subprocess.Popen(["sleep", "600"])
    try:
        with Ledger(pw.state) as ledger:
            (record,) = ledger.holders()
            assert record.owner_pid == qemu
            ledger.set_owner(record.ref, stand_in.pid)
    finally:
        stand_in.send_signal(signal.SIGKILL)
        stand_in.wait()
    status = json.loads(pw.run("status", "--json", check=True).stdout)
    (lease,) = status["leases"]
    assert lease["owner_gone"] is False and qemu in lease["left_running"], lease
    assert status["leased"] == "1"
    text = pw.run("status", check=True).stdout
    assert "OWNER GONE" not in text and "but the domain still runs in its group (pid " \
        f"{qemu})" in text, text
    audit = pw.run("audit", "--json")
    assert [le["cpu"] for le in json.loads(audit.stdout)["leases"]] == [1], audit.stdout
    pw.run("sync", check=True)  # the next change: the lease is QEMU's again
    with Ledger(pw.state) as ledger:
        assert [(h.ref.name, h.owner_pid) for h in ledger.holders()] == [(a, qemu)]
    assert env.cpu_exclusive(pw.holder_group(a))
    refused = pw.run("release", a)
    assert refused.returncode == 1 and f"still runs (pid {qemu})" in refused.stderr, \
        refused.stderr


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_a_started_domain_keeps_its_console_password(
        pw: env.Pinwarden, domains: env.Domains, exclusive: bool) -> None:
    """``pinwarden start`` boots the domain from its definition, read without libvirt's
    secure flag: the VNC password was left out and QEMU ran the console with no
    authentication (``-vnc 127.0.0.1:0`` without ``password=on``) while a plain 'virsh
    start' kept it (hunt).  Now the live domain has the password, and so has QEMU."""
    import libvirt

    a = f"pwtest-start-vnc-{'x' if exclusive else 's'}"
    kw: dict[str, Any] = {"exclusive": True, "vcpupins": {0: "1"}} if exclusive else {}
    xml = env.tiny_domain_xml(a, **kw).replace(
        "</devices>", "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' "
                      "passwd='pwS3cret'/></devices>")
    domains.track(a)
    dom = domains.conn.defineXML(xml)
    stored = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    assert "passwd='pwS3cret'" in stored
    pw.run("start", a, "--no-daemon", check=True)
    live = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    assert "passwd='pwS3cret'" in live, live
    qemu = env.qemu_pid(a)
    cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    vnc = cmdline[cmdline.index(b"-vnc") + 1].decode()
    assert "password=on" in vnc, vnc
    if exclusive:
        assert env.vm_affinity(a) == {1}
    pw.run("stop", a, check=True)


def test_a_shared_start_frees_a_dead_jobs_cpu_before_taking_it(
        pw: env.Pinwarden, domains: env.Domains) -> None:
    """A job killed with SIGKILL never released its lease: the ledger calls its CPU free,
    but its group keeps the CPU exclusive (and ``machine`` narrowed) until a sync.  A
    shared start decided on it as free, planned the domain there and libvirt failed
    ``Permission denied`` writing its cpuset (hunt).  Now the start frees the dead job
    first: the domain runs on the CPU, the job's group is gone."""
    a = "pwtest-start-after-dead"
    domains.define(a)
    machine = (env.CPUSET / "machine" / "cpuset.cpus").read_text().strip()
    group = env.dead_job(pw, "pwtest-dead")
    assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
    assert (env.CPUSET / "machine" / "cpuset.cpus").read_text().strip() == "0"
    started = pw.run("start", a, "--no-daemon")
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(a) == {1}, env.vm_affinity(a)
    assert not group.exists() and env.holder_names(pw) == ()
    assert (env.CPUSET / "machine" / "cpuset.cpus").read_text().strip() == machine
    pw.run("stop", a, check=True)


def test_a_stop_whose_lease_cannot_be_freed_says_the_domain_is_stopped(
        pw: env.Pinwarden, domains: env.Domains, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease database cannot be written (a full file system): 'pinwarden stop'
    destroyed the domain, then said the ledger's "…; nothing was changed: free some space
    and retry" (systemd-lab hunt).  Now it says the domain is stopped, why its lease is not
    freed yet, and that 'pinwarden sync' frees it."""
    from pinwarden.config import load_config
    from pinwarden.errors import LedgerError
    from pinwarden.manager import Manager

    a = "pwtest-start-full"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    pw.run("start", a, "--no-daemon", check=True)

    def full(self: Manager, holder: object) -> None:
        raise LedgerError("lease database /x/leases.db: the file system is full; nothing "
                          "was changed: free some space and retry")

    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        monkeypatch.setattr(Manager, "drop", full)
        with pytest.raises(LedgerError) as info:
            start.stop(manager, env.URI, a)
        monkeypatch.undo()
    assert info.value.message == (
        f"domain '{a}' is stopped, but its lease could not be freed: lease database "
        "/x/leases.db: the file system is full; 'pinwarden sync' frees it once the lease "
        "database can be written"), info.value.message
    assert not domains.conn.lookupByName(a).isActive()
    synced = pw.run("sync", check=True)
    assert f"freed qemu domain '{a}'" in synced.stdout, synced.stdout
