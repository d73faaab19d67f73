"""The topology snapshot cache (issue #12): a hit is exactly ``read_topology(root)``, and a
changed host (CPU hotplug, a replaced dump, another kernel or boot) is read again."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HWLOC_DUMPS
from hostroot import HostSpec, build_host, write
from pinwarden import topocache
from pinwarden.cpuset import CpuSet
from pinwarden.topology import (
    SNAPSHOT_VERSION,
    Topology,
    decode_topology,
    encode_topology,
    read_topology,
)

SPECS = [HostSpec(cpus=1), HostSpec(cpus=16, threads=2, nodes=2),
         HostSpec(cpus=24, threads=2, packages=2, nodes=4, isolated="2-5,14-17",
                  nohz_full="2-5"),
         HostSpec(cpus=64, threads=4, packages=2, nodes=2),
         HostSpec(cpus=12, threads=1, packages=3, nodes=3,
                  cmdline="ro isolcpus=domain,managed_irq,3-5 nohz_full=3-5")]


@pytest.fixture(autouse=True)
def fresh_memo() -> Iterator[None]:
    topocache._MEMO.clear()
    yield
    topocache._MEMO.clear()


def roundtrip(topology: Topology) -> Topology:
    return decode_topology(json.loads(json.dumps(encode_topology(topology))))


def same(a: Topology, b: Topology) -> None:
    assert a == b
    assert list(a.cpus) == list(b.cpus) and list(a.nodes) == list(b.nodes)  # order too


def cache_files(state: Path) -> list[str]:
    directory = state / topocache.STATE_SUBDIR
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("name", HWLOC_DUMPS)
def test_hwloc_dumps_encode_decode_and_cache(name: str, hwloc_roots: dict[str, Path],
                                             tmp_path: Path) -> None:
    root = hwloc_roots[name]
    expected = read_topology(root)
    same(roundtrip(expected), expected)
    state = tmp_path / "state"
    state.mkdir()
    same(topocache.cached_topology(root, state), expected)  # a miss, stored
    topocache._MEMO.clear()
    same(topocache.cached_topology(root, state), expected)  # from the file
    online_list = (root / "sys/devices/system/cpu/online").is_file()
    assert bool(cache_files(state)) == online_list  # no online list: never cached


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.cpus}cpu{s.threads}t{s.nodes}n")
def test_synthetic_hosts(spec: HostSpec, tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", spec)
    state = tmp_path / "state"
    state.mkdir()
    expected = read_topology(root)
    same(roundtrip(expected), expected)
    first = topocache.cached_topology(root, state)
    same(first, expected)
    assert topocache.cached_topology(root, state) is first  # this process: the same object
    topocache._MEMO.clear()
    again = topocache.cached_topology(root, state)
    same(again, expected)
    assert again is not first  # decoded from the file


def test_cpu_hotplug_invalidates(tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=16, threads=2, nodes=2))
    state = tmp_path / "state"
    state.mkdir()
    before = topocache.cached_topology(root, state)
    assert 5 in before.online
    write(root, "sys/devices/system/cpu/cpu5/online", "0\n")
    write(root, "sys/devices/system/cpu/online", "0-4,6-15\n")
    for memo in (True, False):
        if not memo:
            topocache._MEMO.clear()
        after = topocache.cached_topology(root, state)
        same(after, read_topology(root))
        assert 5 not in after.online and not after.cpus[5].online
    write(root, "sys/devices/system/cpu/online", "0-15\n")  # back online
    write(root, "sys/devices/system/cpu/cpu5/online", "1\n")
    same(topocache.cached_topology(root, state), before)


@pytest.mark.parametrize("rel", ["sys/devices/system/cpu/isolated", "proc/cmdline",
                                 "sys/devices/system/node/online"])
def test_every_fingerprint_file_counts(rel: str, tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=16, threads=2, nodes=2,
                                                  cmdline="ro"))
    state = tmp_path / "state"
    state.mkdir()
    topocache.cached_topology(root, state)
    if rel == "sys/devices/system/cpu/isolated":
        write(root, rel, "2-3\n")
    elif rel == "proc/cmdline":  # without the isolated file the command line says it
        (root / "sys/devices/system/cpu/isolated").unlink()
        topocache.cached_topology(root, state)
        write(root, rel, "ro isolcpus=4-5\n")
    else:  # node 1 goes offline: its CPUs fall back to node 0
        write(root, rel, "0\n")
    for memo in (True, False):
        if not memo:
            topocache._MEMO.clear()
        same(topocache.cached_topology(root, state), read_topology(root))


def test_a_replaced_dump_at_the_same_path_is_read_again(tmp_path: Path) -> None:
    """Same CPU lists, other cores: the files' identity tells them apart."""
    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=16, threads=2, nodes=2))
    state = tmp_path / "state"
    state.mkdir()
    smt = topocache.cached_topology(root, state)
    shutil.rmtree(root)
    build_host(root, HostSpec(cpus=16, threads=1, nodes=2))
    topocache._MEMO.clear()
    plain = topocache.cached_topology(root, state)
    same(plain, read_topology(root))
    assert smt.smt and not plain.smt


def test_a_snapshot_another_reader_took_is_not_used(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pinwarden upgraded (or edited) may read a host otherwise: the live host's snapshot
    lives until reboot, and one an older reader took stayed in use (a package seen twice
    with one offline CPU: topology hunt).  The reader's identity is in the fingerprint."""
    root = build_host(tmp_path / "root", HostSpec(cpus=16, threads=2, nodes=2))
    state = tmp_path / "state"
    state.mkdir()
    topocache.cached_topology(root, state)
    (name,) = cache_files(state)
    path = state / topocache.STATE_SUBDIR / name
    data = json.loads(path.read_text())
    assert data["fingerprint"]["reader"]
    # the snapshot as an older reader would have left it: CPU 3 alone on its core
    data["topology"]["cpus"][3][7] = data["topology"]["nodes"][0][1]
    data["fingerprint"]["reader"] = "0:0:0:0"
    path.write_text(json.dumps(data))
    topocache._MEMO.clear()
    same(topocache.cached_topology(root, state), read_topology(root))
    # (and the same file with this reader's identity is used as it is: the check bites)
    data["fingerprint"]["reader"] = topocache.fingerprint(root)["reader"]
    path.write_text(json.dumps(data))
    topocache._MEMO.clear()
    assert topocache.cached_topology(root, state).cpus[3].siblings != \
        read_topology(root).cpus[3].siblings


def test_a_snapshot_of_another_root_is_not_used(tmp_path: Path) -> None:
    a = build_host(tmp_path / "a", HostSpec(cpus=16, threads=2, nodes=2))
    b = build_host(tmp_path / "b", HostSpec(cpus=16, threads=1, nodes=2))
    state = tmp_path / "state"
    state.mkdir()
    topocache.cached_topology(a, state)
    (name_a,) = cache_files(state)
    path_b = topocache.cache_path(os.path.realpath(b), state)
    assert path_b is not None and path_b.name != name_a
    shutil.copy(state / topocache.STATE_SUBDIR / name_a, path_b)  # a's snapshot under b's name
    same(topocache.cached_topology(b, state), read_topology(b))


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"root": 1}',
                                     b"\xff\xfe", "version", b"[" * 200_000, "online"])
def test_a_bad_cache_file_is_ignored_and_replaced(garbage: bytes | str,
                                                  tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, threads=2))
    state = tmp_path / "state"
    state.mkdir()
    topocache.cached_topology(root, state)
    (name,) = cache_files(state)
    path = state / topocache.STATE_SUBDIR / name
    if garbage == "version":  # a well-formed snapshot of another layout version
        data = json.loads(path.read_text())
        data["topology"]["version"] = SNAPSHOT_VERSION + 1
        path.write_text(json.dumps(data))
    elif garbage == "online":  # well formed, but online names a CPU it has no row for
        data = json.loads(path.read_text())
        data["topology"]["sets"].append([99])
        data["topology"]["online"] = len(data["topology"]["sets"]) - 1
        path.write_text(json.dumps(data))
    else:
        assert isinstance(garbage, bytes)
        path.write_bytes(garbage)
    topocache._MEMO.clear()
    same(topocache.cached_topology(root, state), read_topology(root))
    data = json.loads(path.read_text())  # rewritten, usable again
    same(decode_topology(data["topology"]), read_topology(root))


@pytest.mark.parametrize("row", [
    ["x", 0, True, 0, 0, None, 0, 0, 0, None, 0],  # a key that is not a CPU number
    [0, 0, 1, 0, 0, None, 0, 0, 0, None, 0],  # online must be true or false
    [0, 0, True, 0, 0, None, 0, 9, 0, None, 0],  # no such CPU set
    [0, 0, True, 0, 0, None, 0, 0, 0, 5, 0],  # kind must be a string
    [0, 0, True, 0, 0, None, 0, 0, 0, None],  # a field missing
])
def test_decode_refuses_bad_rows(row: list[object]) -> None:
    data = {"version": SNAPSHOT_VERSION, "present": 0, "online": 0, "isolated": 1,
            "nohz_full": 1, "nodes": [[0, 0]], "cpus": [row], "sets": [[0], []]}
    with pytest.raises(ValueError):
        decode_topology(data)


def test_decode_refuses_lists_naming_cpus_without_a_row() -> None:
    """What the rest looks up by CPU number must have a row: an online CPU (a cache that
    said so was a KeyError, exit 70, in every command), a present one, a sibling."""
    base = {"version": SNAPSHOT_VERSION, "present": 0, "online": 0, "isolated": 2,
            "nohz_full": 2, "nodes": [[0, 0]], "sets": [[0], [0, 1], []],
            "cpus": [[0, 0, True, 0, 0, None, 0, 0, 0, None, 0]]}
    assert decode_topology(base).online == CpuSet.of([0])
    for change in ({"online": 1}, {"present": 1},
                   {"cpus": [[0, 0, True, 0, 0, None, 0, 1, 0, None, 0]]},
                   {"cpus": [[0, 1, True, 0, 0, None, 0, 0, 0, None, 0]]}):
        with pytest.raises(ValueError):
            decode_topology({**base, **change})


@pytest.mark.parametrize("sets", [[[-1]], [["0"]], [[8192]], [5]])
def test_decode_refuses_bad_sets(sets: list[object]) -> None:
    data = {"version": SNAPSHOT_VERSION, "present": 0, "online": 0, "isolated": 0,
            "nohz_full": 0, "nodes": [], "cpus": [], "sets": sets}
    with pytest.raises(ValueError):
        decode_topology(data)


def test_unwritable_cache_is_skipped_silently(tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, threads=2))
    state = tmp_path / "state"
    state.mkdir()
    (state / topocache.STATE_SUBDIR).write_text("not a directory")  # mkdir/open fail
    same(topocache.cached_topology(root, state), read_topology(root))
    assert sorted(p.name for p in state.iterdir()) == [topocache.STATE_SUBDIR]


def test_no_state_directory_no_cache_and_none_created(tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, threads=2))
    state = tmp_path / "state"
    same(topocache.cached_topology(root, state), read_topology(root))
    same(topocache.cached_topology(root, None), read_topology(root))
    assert not state.exists()


def test_no_online_list_is_never_cached(tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, threads=2))
    (root / "sys/devices/system/cpu/online").unlink()
    state = tmp_path / "state"
    state.mkdir()
    same(topocache.cached_topology(root, state), read_topology(root))
    write(root, "sys/devices/system/cpu/cpu3/online", "0\n")  # only the CPU's own file says
    same(topocache.cached_topology(root, state), read_topology(root))
    assert cache_files(state) == []


def test_live_host_goes_to_the_live_directory(tmp_path: Path) -> None:
    """The live root's snapshot lives in /run/pinwarden (here a stand-in directory), keyed
    by the boot id and kernel release besides the CPU lists."""
    live = tmp_path / "run-pinwarden"
    assert topocache.cache_path("/", tmp_path, live_dir=live) == live / topocache.LIVE_NAME
    expected = read_topology(Path("/"))
    same(topocache.cached_topology(Path("/"), None, live_dir=live), expected)
    prints = topocache.fingerprint(Path("/"), live=True)
    assert prints["proc/sys/kernel/random/boot_id"] and prints["proc/sys/kernel/osrelease"]
    assert not any(key.startswith("stat:") for key in prints)
    data = json.loads((live / topocache.LIVE_NAME).read_text())
    assert data["root"] == "/" and data["fingerprint"] == prints
    topocache._MEMO.clear()
    same(topocache.cached_topology(Path("/"), None, live_dir=live), expected)


def test_manager_reads_through_the_cache(tmp_path: Path) -> None:
    from pinwarden.config import Config
    from pinwarden.manager import Manager

    root = build_host(tmp_path / "root", HostSpec(cpus=16, threads=2, nodes=2))
    state = tmp_path / "state"
    state.mkdir()
    with Manager(Config(), root, state) as manager:
        host = manager.host()
        assert manager.live_host().topology is host.topology
    same(host.topology, read_topology(root))
    assert len(cache_files(state)) == 1
    assert host.partition.vm_cpus == CpuSet.parse("1-7,9-15")
