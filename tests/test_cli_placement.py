"""``pinwarden plan | reserve | release | status`` end to end: real ledger, bundled host root."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import SEED_XML
from pinwarden.cli import main
from pinwarden.cpuset import CpuSet
from pinwarden.domain import PW_NS, parse_domain
from pinwarden.holdergroup import Invalid
from pinwarden.ledger import DB_NAME

EXAMPLE = Path(__file__).resolve().parent.parent / "src" / "pinwarden" / "data" / "example-host"

SEED = SEED_XML
SHARED = "<domain type='kvm'><name>web</name><vcpu>2</vcpu></domain>"
#: Whole cores by default: the seed's CPUs 4-6 hold their SMT siblings 12-14 on this host.
HOLDS = "12 sibling-hold, 13 sibling-hold, 14 sibling-hold"
UNPINNED = (f"<domain type='kvm'><name>db</name><uuid>{'ab' * 16}</uuid><vcpu>2</vcpu>"
            f"<metadata><pw:cpu xmlns:pw='{PW_NS}' exclusive='yes' threads='isolate'/>"
            "</metadata></domain>")
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
                  + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
                            for p, c in zip("abcdefgh", "bcdefghi", strict=True))
                  + ']><domain><name>&i;</name></domain>')
XXE = ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       "<domain><name>&x;</name></domain>")
EXTERNAL_DTD = ('<?xml version="1.0"?><!DOCTYPE domain SYSTEM "http://attacker.invalid/x.dtd">'
                "<domain><name>x</name></domain>")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    return {"state": tmp_path / "state", "dir": tmp_path}


def write(env: dict[str, Path], name: str, text: str) -> str:
    path = env["dir"] / name
    path.write_text(text)
    return str(path)


def run(env: dict[str, Path], capsys: pytest.CaptureFixture[str], *argv: str,
        json_out: bool = True) -> tuple[int, Any, str]:
    """Run the CLI in-process; returns (status, parsed stdout (JSON) or text, stderr)."""
    args = [*argv, "--root", str(EXAMPLE), "--state-dir", str(env["state"])]
    if json_out:
        args.append("--json")
    status = main(args)
    out, err = capsys.readouterr()
    return status, json.loads(out) if json_out else out, err


def test_plan_seed_json(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(env, capsys, "plan", write(env, "vm1.xml", SEED))
    assert status == 0, err
    assert {k: out[k] for k in ("domain", "exclusive", "vcpus", "emulator", "iothreads")} == {
        "domain": "vm1", "exclusive": True, "vcpus": {"0": "5", "1": "6"}, "emulator": "4",
        "iothreads": {}}
    # whole cores by default: the siblings of CPUs 4-6 (12-14 on this host) are held empty
    assert out["leases"] == {"4": "emulator", "5": "vcpu0", "6": "vcpu1", "12": "sibling-hold",
                             "13": "sibling-hold", "14": "sibling-hold"}
    assert out["recorded"] is False
    assert not (env["state"] / DB_NAME).exists()  # a dry run records nothing
    status, st, _ = run(env, capsys, "status")
    assert status == 0 and st["leases"] == []


def test_plan_human_output(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(env, capsys, "plan", write(env, "vm1.xml", SEED), json_out=False)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("domain vm1 (exclusive); partition isolcpus")
    assert [line.split() for line in lines[1:4]] == [["vcpu0", "5"], ["vcpu1", "6"],
                                                     ["emulator", "4"]]
    assert f"would lease 4-6,12-14 (4 emulator, 5 vcpu0, 6 vcpu1, {HOLDS})" in out


def test_plan_quotes_a_name_with_control_characters(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A domain name holding a carriage return (legal in XML, and libvirt keeps it) is
    shown quoted with its escapes, as ``status`` shows it, not written raw to the
    terminal; a plain name is shown as it is."""
    xml = SHARED.replace("<name>web</name>", "<name>a&#13;b&#x85;c</name>")
    status, out, _ = run(env, capsys, "plan", write(env, "cr.xml", xml), json_out=False)
    assert status == 0
    assert out.splitlines()[0].startswith("domain 'a\\rb\\x85c' (shared); partition ")
    assert "\r" not in out and "\x85" not in out
    status, out, _ = run(env, capsys, "plan", write(env, "web.xml", SHARED), json_out=False)
    assert out.startswith("domain web (shared); ")


def test_emit_xml_applies_plan_and_keeps_the_rest(env: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(env, capsys, "plan", write(env, "db.xml", UNPINNED), "--emit-xml",
                           json_out=False)
    assert status == 0
    spec = parse_domain(out)  # stdout is only the XML; the plan went to stderr
    assert spec.exclusive and spec.threads == "isolate" and len(spec.vcpupins) == 2
    assert spec.partition == "/pinwarden-vm-db"
    assert "vcpu0" in err
    status, out, _ = run(env, capsys, "plan", write(env, "vm1.xml", SEED), "--emit-xml",
                         json_out=False)
    lines = out.splitlines()
    assert "  <!-- the RFC's example -->" in lines
    assert "    <vcpupin vcpu='0' cpuset='5'/>" in lines


def test_reserve_status_conflict_release(env: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(env, capsys, "reserve", write(env, "vm1.xml", SEED))
    assert status == 0, err
    assert out["vcpus"] == {"0": "5", "1": "6"} and out["recorded"] is True

    status, st, _ = run(env, capsys, "status")
    assert status == 0
    (entry,) = st["leases"]
    assert (entry["domain"], entry["driver"], entry["cpus"]) == ("vm1", "qemu", "4-6,12-14")
    assert entry["roles"] == {"4": "emulator", "5": "vcpu0", "6": "vcpu1", "12": "sibling-hold",
                              "13": "sibling-hold", "14": "sibling-hold"}
    assert entry["uuid"] is None
    created = datetime.fromisoformat(entry["created"])  # ISO 8601 with its timezone
    assert created.utcoffset() == timedelta(0)
    assert abs(created.timestamp() - time.time()) < 600
    assert datetime.fromisoformat(st["time"]) >= created
    assert st["partition"]["mode"] == "isolcpus"
    assert CpuSet.parse(st["shared"]) == CpuSet.parse("2-3,7,10-11,15")

    # a second domain on the same CPUs is refused, naming CPU and holder; nothing changes
    twin = write(env, "vm2.xml", SEED.replace("<name>vm1</name>", "<name>vm2</name>"))
    status, out, err = run(env, capsys, "reserve", twin)
    assert status == 1
    assert out["error"]["code"] == "conflict"
    assert "CPU 5" in out["error"]["message"] and "'vm1'" in out["error"]["message"]
    assert err.startswith("pinwarden: error: ") and err.count("\n") == 1
    assert run(env, capsys, "status")[1]["leases"] == st["leases"]

    # a shared domain never gets the leased CPUs
    status, out, _ = run(env, capsys, "reserve", write(env, "web.xml", SHARED))
    assert status == 0 and out["exclusive"] is False and out["leases"] == {}
    assert CpuSet.parse(out["default_cpus"]) == CpuSet.parse("2-3,7,10-11,15")

    status, out, _ = run(env, capsys, "release", "vm1")
    assert status == 0 and out["released"]["cpus"] == "4-6,12-14"
    status, out, _ = run(env, capsys, "reserve", twin)
    assert status == 0 and out["domain"] == "vm2"


def test_reserve_by_uuid_and_release_by_uuid(env: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(env, capsys, "reserve", write(env, "db.xml", UNPINNED))
    assert status == 0 and len(out["leases"]) == 4  # 2 vCPUs + 2 held siblings
    uuid = "abababab-abab-abab-abab-abababababab"
    st = run(env, capsys, "status")[1]
    assert st["leases"][0]["uuid"] == uuid
    status, out, _ = run(env, capsys, "release", uuid)
    assert status == 0 and out["released"]["domain"] == "db"
    status, out, _ = run(env, capsys, "release", "db")
    assert status == 1 and out["error"]["code"] == "unknown-holder"


def test_a_holder_with_a_plan_edited_by_hand_is_freed_by_a_forced_release(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A plan damaged by hand made every command refuse, ``release --force`` of that
    holder included: the only way out was to move the whole database aside, forgetting
    every other lease (CLI hunt).  Each refusal now says how to free it, and the forced
    release frees that holder and nothing else."""
    import sqlite3

    assert run(env, capsys, "reserve", write(env, "vm1.xml", SEED))[0] == 0
    assert run(env, capsys, "reserve", write(env, "db.xml", UNPINNED))[0] == 0
    before = {e["domain"]: e["cpus"] for e in run(env, capsys, "status")[1]["leases"]}
    raw = sqlite3.connect(env["state"] / "leases.db")
    raw.execute("UPDATE holders SET plan = '{\"bad\": 1' WHERE name = 'vm1'")
    raw.commit()
    raw.close()
    for argv in (("status",), ("release", "vm1")):
        status, out, err = run(env, capsys, *argv)
        assert status == 1, (argv, out)
        assert "corrupt plan recorded for qemu domain 'vm1'" in out["error"]["message"]
        assert err.endswith("'pinwarden release vm1 --force' frees it (and nothing else)\n"), err
    status, out, err = run(env, capsys, "release", "vm1", "--force")
    assert status == 0, err
    assert (out["released"]["domain"], out["released"]["cpus"]) == ("vm1", before["vm1"])
    status, st, err = run(env, capsys, "status")
    assert status == 0, err
    assert {e["domain"]: e["cpus"] for e in st["leases"]} == {"db": before["db"]}


def test_a_big_domains_roles_are_counted_not_listed(env: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Up to 8 leases each CPU's role is named; beyond, they are counted by kind — a
    120-vCPU domain's line in 'status' ran to 1,449 characters (CLI hunt)."""
    big = write(env, "big.xml", UNPINNED.replace("<name>db</name>", "<name>big</name>")
                .replace("<vcpu>2</vcpu>", "<vcpu>9</vcpu>").replace(" threads='isolate'", ""))
    status, out, err = run(env, capsys, "reserve", big, json_out=False)
    assert status == 0, err
    leased = next(line for line in out.splitlines() if line.startswith("  leased "))
    assert re.fullmatch(r"  leased [0-9,-]+ \(9 vcpu [0-9,-]+(, emulator \d+)?"
                        r"(, \d+ sibling-hold [0-9,-]+|, sibling-hold \d+)?\)", leased), leased
    status, out, err = run(env, capsys, "status", json_out=False)
    assert status == 0 and "(9 vcpu " in out and "vcpu8" not in out, out
    roles = run(env, capsys, "status")[1]["leases"][0]["roles"]
    assert sorted(r for r in roles.values() if r.startswith("vcpu")) == \
        sorted(f"vcpu{n}" for n in range(9))  # (JSON names every one)


def test_status_human_has_cpu_map(env: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    run(env, capsys, "reserve", write(env, "vm1.xml", SEED))
    status, out, _ = run(env, capsys, "status", json_out=False)
    assert status == 0
    assert f"qemu domain 'vm1': 4-6,12-14 (4 emulator, 5 vcpu0, 6 vcpu1, {HOLDS})" in out
    assert "partition isolcpus" in out
    # with holders, whether a daemon runs (one frees the lease of a VM that dies unhooked)
    assert "\ndaemon: none runs for this state directory (the lease of a VM that ends " \
        "without the libvirt hook stays until 'pinwarden sync')\n" in out, out
    assert run(env, capsys, "status")[1]["daemon_pid"] is None



def test_status_with_no_lease_database_says_where_it_looked(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A state directory nothing ever leased through (a typo in --state-dir, say) reads as
    an empty ledger: status says which database it did not find, not just "no holders"."""
    status, out, _ = run(env, capsys, "status", json_out=False)
    assert status == 0
    assert "no holders: no lease database at " in out, out
    assert "daemon:" not in out  # (nothing to free)
    run(env, capsys, "reserve", write(env, "vm1.xml", SEED))
    run(env, capsys, "release", "vm1")
    status, out, _ = run(env, capsys, "status", json_out=False)
    assert status == 0 and "\nno holders\n" in out, out


def test_status_shows_the_pins_it_narrowed_and_what_waits_to_go_back(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Running shared domains an exclusive start re-pinned: while the lease holds, their
    pin and what they had; once it ends, the CPUs free again that no give-back has
    returned yet (libvirt refused it, or nothing ran one: no daemon, no hook)."""
    from pinwarden.ledger import Ledger
    from pinwarden.narrowed import narrowed_key

    run(env, capsys, "reserve", write(env, "vm1.xml", SEED))  # leases 4-6,12-14
    web = "cd" * 16
    with Ledger(env["state"]) as ledger:
        ledger.record_changes({
            narrowed_key(web, "vcpu0"): json.dumps({"domain": "web", "before": "3-5",
                                                    "after": "3"}),
            narrowed_key(web, "emulator"): "not json"})  # unreadable: left out
    status, out, _ = run(env, capsys, "status", json_out=False)
    assert status == 0
    assert "  web vcpu0: pinned to 3 (had 3-5)\n" in out, out
    doc = run(env, capsys, "status")[1]
    assert doc["narrowed"] == [{"domain": "web", "uuid": web, "thread": "vcpu0", "pin": "3",
                                "had": "3-5", "waiting": ""}]
    run(env, capsys, "release", "vm1")
    status, out, _ = run(env, capsys, "status", json_out=False)
    assert "  web vcpu0: pinned to 3 (had 3-5); CPUs 4-5 free again, not given back yet " \
           "(the daemon's next pass, 'pinwarden sync' or 'pinwarden stop' gives them back)" \
        in out, out
    assert run(env, capsys, "status")[1]["narrowed"][0]["waiting"] == "4-5"


def test_a_refused_first_reserve_or_release_leaves_no_ledger_behind(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A state directory nothing was ever leased through (a mistyped --state-dir): a
    refused reserve or a release of an unknown name made the directory and an empty lease
    database, which status then took for a real one, and the release's error named the
    database it had just made itself (input hunt).  Now they leave nothing behind."""
    huge = UNPINNED.replace("<vcpu>2</vcpu>", "<vcpu>300</vcpu>")
    assert huge != UNPINNED
    status, out, _ = run(env, capsys, "reserve", write(env, "huge.xml", huge))
    assert status == 1 and out["error"]["code"] == "insufficient-cpus", out
    status, out, _ = run(env, capsys, "release", "typo-name")
    assert status == 1 and out["error"]["code"] == "unknown-holder", out
    assert "no lease database at " in out["error"]["message"], out
    assert not env["state"].exists()
    status, text, _ = run(env, capsys, "status", json_out=False)
    assert status == 0 and "no holders: no lease database at " in text, text
    # the first reserve that is taken still makes them
    status, out, _ = run(env, capsys, "reserve", write(env, "vm1.xml", SEED))
    assert status == 0 and (env["state"] / DB_NAME).exists(), out
    status, out, _ = run(env, capsys, "release", "typo-name")
    assert status == 1 and "no lease database" not in out["error"]["message"], out


@pytest.mark.parametrize("text", [BILLION_LAUGHS, XXE, EXTERNAL_DTD])
def test_hostile_xml_refused_with_exit_1_and_nothing_recorded(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str], text: str) -> None:
    run(env, capsys, "reserve", write(env, "vm1.xml", SEED))
    before = run(env, capsys, "status")[1]["leases"]
    for command in ("plan", "reserve"):
        status, out, err = run(env, capsys, command, write(env, "evil.xml", text))
        assert status == 1
        assert out["error"]["code"] == "bad-input" and "refused" in out["error"]["message"]
        assert "Traceback" not in err and "root:" not in err
    assert run(env, capsys, "status")[1]["leases"] == before


def test_cli_process_stdin_hostile_and_usage(env: dict[str, Path]) -> None:
    """The installed entry point: stdin input, exit statuses, no traceback."""
    base = [sys.executable, "-c", "from pinwarden.cli import entry; entry()"]
    common = ["--root", str(EXAMPLE), "--state-dir", str(env["state"])]
    ok = subprocess.run([*base, "plan", "-", *common, "--json"], input=SEED, text=True,
                        capture_output=True, check=False, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["vcpus"] == {"0": "5", "1": "6"}
    bad = subprocess.run([*base, "reserve", "-", *common], input=BILLION_LAUGHS, text=True,
                         capture_output=True, check=False, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("pinwarden: error: domain XML refused")
    assert "Traceback" not in bad.stderr
    usage = subprocess.run([*base, "plan", *common], capture_output=True, text=True,
                           check=False, timeout=60)
    assert usage.returncode == 2 and "DOMAIN.xml" in usage.stderr


@pytest.mark.parametrize(("xml", "code", "needle"), [
    ("<domain><name>x</name><vcpu>two</vcpu></domain>", "bad-input", "<vcpu>='two'"),
    ("<domain><name>x</name><vcpu>0</vcpu></domain>", "no-vcpus", "no vCPUs"),
    ("<domain><name>x</name><vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='99'/>"
     "</cputune></domain>", "unknown-cpu", "CPU 99"),
    ("<domain><name>x</name><vcpu>1</vcpu><cputune exclusive='yes'>"
     "<vcpupin vcpu='0' cpuset='0'/></cputune></domain>", "host-cpu", "CPU 0"),
    ("<domain><name>x</name><vcpu>1</vcpu><cputune><vcpupin vcpu='3' cpuset='4'/>"
     "</cputune></domain>", "bad-pin", "vcpu='3'"),
])
def test_refusals_are_json_error_objects(env: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str], xml: str,
                                         code: str, needle: str) -> None:
    status, out, err = run(env, capsys, "reserve", write(env, "x.xml", xml))
    assert status == 1
    assert out["error"]["code"] == code and needle in out["error"]["message"]
    assert err.count("\n") == 1


def test_missing_file_and_oversized_input(env: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(env, capsys, "plan", str(env["dir"] / "nope.xml"))
    assert status == 1 and out["error"]["code"] == "bad-input"
    assert "nope.xml" in out["error"]["message"]
    big = write(env, "big.xml", "<domain><name>b</name><!--" + "x" * (2 << 20) + "--></domain>")
    status, out, _ = run(env, capsys, "plan", big)
    assert status == 1 and "more than the" in out["error"]["message"]


def test_config_none_mode(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config = write(env, "pinwarden.toml", '[partition]\nmode = "none"\nhost_reserve = "0,8"\n')
    status, out, err = run(env, capsys, "plan", write(env, "web.xml", SHARED),
                           "--config", config)
    assert status == 0, err
    assert CpuSet.parse(out["default_cpus"]) == CpuSet.parse("1-7,9-15")


def test_racing_reserves_of_one_cpu_have_exactly_one_winner(env: dict[str, Path]) -> None:
    """Sixteen `pinwarden reserve` processes want CPUs 4-6 at once: one gets them, fifteen
    are refused with a one-line error, and the ledger holds exactly the winner's leases."""
    base = [sys.executable, "-c", "from pinwarden.cli import entry; entry()"]
    common = ["--root", str(EXAMPLE), "--state-dir", str(env["state"]), "--json"]
    procs = []
    for i in range(16):
        xml = write(env, f"racer{i}.xml", SEED.replace("<name>vm1</name>",
                                                       f"<name>racer{i}</name>"))
        procs.append(subprocess.Popen([*base, "reserve", xml, *common], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, json.loads(out), err))
    winners = [out["domain"] for status, out, _ in results if status == 0]
    assert len(winners) == 1, results
    for status, out, err in results:
        if status != 0:
            assert status == 1 and out["error"]["code"] == "conflict", out
            assert err.count("\n") == 1 and "Traceback" not in err
    status = subprocess.run([*base, "status", *common], capture_output=True, text=True,
                            check=True, timeout=60)
    (entry,) = json.loads(status.stdout)["leases"]
    assert entry["domain"] == winners[0] and entry["cpus"] == "4-6,12-14"


@pytest.mark.kernel  # the reservation is enforced in this host's real cgroups
def test_plan_and_reserve_on_this_real_host(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--root / : the machine's own sysfs and cgroups decide the partition."""
    from pinwarden.config import Config
    from pinwarden.partition import load_host

    real = load_host(Path("/"), Config())
    state = ["--state-dir", str(tmp_path / "state"), "--json"]
    xml = tmp_path / "d.xml"
    xml.write_text("<domain><name>pwtest-placement</name><vcpu>1</vcpu></domain>")
    assert main(["plan", str(xml), *state]) == 0
    out = json.loads(capsys.readouterr().out)
    assert CpuSet.parse_kernel(out["default_cpus"]) == real.partition.vm_cpus
    xml.write_text("<domain><name>pwtest-placement</name><vcpu>1</vcpu><metadata>"
                   f"<pw:cpu xmlns:pw='{PW_NS}' exclusive='yes'/></metadata></domain>")
    assert main(["reserve", str(xml), *state]) == 0
    out = json.loads(capsys.readouterr().out)
    leased = CpuSet.of(int(c) for c in out["leases"])
    assert len(leased) == 1 and leased <= real.partition.vm_cpus
    assert leased.isdisjoint(real.partition.host_cpus)
    assert main(["release", "pwtest-placement", *state]) == 0
    capsys.readouterr()


def test_status_flags_a_leased_cpu_that_went_offline(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU hot-unplug of a leased CPU: the lease is kept, status flags it (JSON and text).
    A holder partition the kernel marks invalid meanwhile is valid again once the CPU is
    back (lab: cli.offline): status said 'pinwarden sync' would make it so (hunt)."""
    import shutil

    from pinwarden.cli import placement

    root = tmp_path / "host"
    shutil.copytree(EXAMPLE, root)
    state = str(tmp_path / "state")
    seed = tmp_path / "vm1.xml"
    seed.write_text(SEED)
    assert main(["reserve", str(seed), "--root", str(root), "--state-dir", state]) == 0
    cpu = root / "sys/devices/system/cpu"
    (cpu / "cpu5" / "online").write_text("0\n")
    (cpu / "online").write_text("0-4,6-15\n")
    capsys.readouterr()
    assert main(["status", "--json", "--root", str(root), "--state-dir", state]) == 0
    (holder,) = json.loads(capsys.readouterr().out)["leases"]
    assert holder["cpus"] == "4-6,12-14" and holder["offline"] == "5"
    assert main(["status", "--root", str(root), "--state-dir", state]) == 0
    text = capsys.readouterr().out
    assert f"vm1': 4-6,12-14 (4 emulator, 5 vcpu0, 6 vcpu1, {HOLDS}); since" in text
    assert "CPU 5 OFFLINE (lease kept" in text
    reason = "root invalid (Cpu list in cpuset.cpus not exclusive)"
    monkeypatch.setattr(placement, "invalid_partitions",
                        lambda _root, records, _online=None: {
                            (r.ref.driver, r.ref.key): Invalid(reason, None)
                            for r in records})
    assert main(["status", "--root", str(root), "--state-dir", state]) == 0
    text = capsys.readouterr().out
    assert f"; PARTITION INVALID (the kernel reads {reason!r}): its CPUs are not kept " \
        "exclusive; the kernel makes it valid again once CPU 5 is online\n" in text, text
    (cpu / "cpu5" / "online").write_text("1\n")
    (cpu / "online").write_text("0-15\n")
    assert main(["status", "--json", "--root", str(root), "--state-dir", state]) == 0
    assert json.loads(capsys.readouterr().out)["leases"][0]["offline"] == ""
    assert main(["status", "--root", str(root), "--state-dir", state]) == 0
    assert "exclusive; 'pinwarden sync' makes it valid again\n" in capsys.readouterr().out
    monkeypatch.undo()
    # several CPUs offline: each named, and a command for each
    for n in (5, 13):
        (cpu / f"cpu{n}" / "online").write_text("0\n")
    (cpu / "online").write_text("0-4,6-12,14-15\n")
    assert main(["status", "--root", str(root), "--state-dir", state]) == 0
    text = capsys.readouterr().out
    assert "; CPUs 5,13 OFFLINE (lease kept; bring them online with 'for c in 5 13; do echo 1 " \
        "> /sys/devices/system/cpu/cpu$c/online; done')\n" in text, text


def test_one_vm_cpu_and_one_housekeeping_cpu_are_named_as_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``host``, ``status`` and ``plan`` on a 2-CPU host: CPU 0 housekeeping, CPU 1 for VMs."""
    from hostroot import HostSpec, build_host

    root = build_host(tmp_path / "host", HostSpec(cpus=2))
    args = ["--root", str(root), "--state-dir", str(tmp_path / "state")]
    xml = tmp_path / "web.xml"
    xml.write_text(SHARED)
    for argv in (["host"], ["status"], ["plan", str(xml)]):
        assert main([*argv, *args]) == 0
        assert "partition none: VM CPU 1, housekeeping CPU 0" in capsys.readouterr().out


def test_a_lease_on_a_cpu_the_host_does_not_have_is_not_called_offline(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A lease database that names CPUs this host lacks (made on a bigger host, or a CPU
    removed): ``status`` said "CPU 10 OFFLINE … echo 1 > …/cpu10/online", a CPU there is
    none of, beside "leases name CPUs this host does not have: 10" (hunt).  Now it says the
    CPU is not on this host and how to free the lease, which works."""
    from hostroot import HostSpec, build_host

    state = str(tmp_path / "state")
    seed = tmp_path / "vm1.xml"
    seed.write_text(SEED)
    assert main(["reserve", str(seed), "--root", str(EXAMPLE), "--state-dir", state]) == 0
    small = build_host(tmp_path / "small", HostSpec(cpus=8))
    capsys.readouterr()
    args = ["--root", str(small), "--state-dir", state]
    assert main(["status", *args]) == 0
    text = capsys.readouterr().out
    assert "OFFLINE" not in text, text
    assert ("; CPUs 12-14 NOT ON THIS HOST (the lease database names CPUs this host does "
            "not have: another host's database, or a CPU removed); `pinwarden release vm1 "
            "--driver qemu` frees the lease") in text, text
    assert main(["status", "--json", *args]) == 0
    (holder,) = json.loads(capsys.readouterr().out)["leases"]
    assert (holder["offline"], holder["absent"]) == ("", "12-14"), holder
    assert main(["release", "vm1", "--driver", "qemu", *args]) == 0
    capsys.readouterr()
    assert main(["status", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["leases"] == []


def test_a_reserve_on_a_host_dump_needs_a_state_directory_of_its_own(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``reserve --root DUMP`` without ``--state-dir`` recorded the dump's CPUs into this
    host's lease database (the configured one): its VMs were then refused CPUs the dump
    leased, and ``host`` read the dump's host record as this host's (CLI hunt).  Refused
    now, with nothing recorded; a state directory named on the command line or in
    ``PINWARDEN_STATE_DIR`` is the dump's own."""
    live = env["dir"] / "live-state"
    config = write(env, "live.toml", f'[ledger]\nstate_dir = "{live}"\n')
    xml = write(env, "vm1.xml", SEED)
    monkeypatch.delenv("PINWARDEN_STATE_DIR", raising=False)
    status = main(["reserve", xml, "--root", str(EXAMPLE), "--config", config])
    _, err = capsys.readouterr()
    assert status == 1
    assert err == (f"pinwarden: error: reserve on the host dump {EXAMPLE} would record into "
                   f"this host's lease database ({live}); give the dump one of its own with "
                   f"--state-dir DIR\n")
    assert not live.exists()
    monkeypatch.setenv("PINWARDEN_STATE_DIR", str(env["state"]))
    assert main(["reserve", xml, "--root", str(EXAMPLE), "--config", config]) == 0
    assert (env["state"] / DB_NAME).exists() and not live.exists()


def test_define_reads_at_most_the_size_it_accepts(env: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``define /dev/zero`` read without a limit (out of memory: exit 70), where ``plan``
    and ``reserve`` read one byte over the limit and refuse (CLI hunt); ``define -`` reads
    the XML from stdin, as ``plan -`` does."""
    status = main(["define", "/dev/zero", "--state-dir", str(env["state"])])
    _, err = capsys.readouterr()
    assert status == 1 and err == ("pinwarden: error: domain XML is 1048577 bytes, more "
                                   "than the 1048576 accepted\n"), err
    done = subprocess.run(
        [sys.executable, "-c", "from pinwarden.cli import entry; entry()", "define", "-",
         "--state-dir", str(env["state"])], input="<domain><name>x</name></domian>",
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("pinwarden: error: ") and \
        "malformed" in done.stderr and "cannot read" not in done.stderr, done.stderr


@pytest.mark.parametrize(("lines", "v1", "partial"), [
    (["12:cpuset:/..", "0::/"], True, True),  # v1 cpuset above the namespace's root
    (["12:cpuset:/../x/y", "0::/"], True, True),
    (["12:cpuset:/", "3:memory:/..", "0::/.."], True, False),  # not the cpuset hierarchy
    (["0::/.."], False, True),  # v2
    (["0::/init.scope"], False, False),
    (["12:cpuset:/machine/..x", "0::/"], True, False),  # a name, not above the root
])
def test_a_cpuset_view_is_partial_when_some_group_reads_above_its_root(
        tmp_path: Path, lines: list[str], v1: bool, partial: bool) -> None:
    from pinwarden.cli.placement import cpuset_view_partial

    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/1/cgroup").write_text("\n".join(lines) + "\n")
    assert cpuset_view_partial(tmp_path, [7, 1], v1) is partial  # (7: none such, skipped)
