"""``pinwarden config`` (values and their sources) and the commented sample configuration
contrib/pinwarden.toml (in sync with config.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hostroot import HostSpec, build_host
from pinwarden import provenance
from pinwarden.cli import main
from pinwarden.config import SETTINGS, Config, libvirt_uri, load_config, parse_config, state_dir
from pinwarden.errors import InputError

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "contrib" / "pinwarden.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in SETTINGS:
        if setting.env:
            monkeypatch.delenv(setting.env, raising=False)


def config_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["config", "--json", *argv]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == 1
    return {f"{s['section']}.{s['key']}": s for s in data["settings"]} | {
        "_file": data["config_file"]}


def test_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    got = config_json(capsys, "--config", str(empty))
    assert got["_file"] == {"path": str(empty), "source": "option --config", "exists": True}
    assert set(got) - {"_file"} == {f"{s.section}.{s.key}" for s in SETTINGS}
    assert all(got[f"{s.section}.{s.key}"]["source"] == "default" for s in SETTINGS)
    assert got["ledger.state_dir"]["value"] == "/var/lib/pinwarden"
    assert got["libvirt.uri"]["value"] == "qemu:///system"
    assert got["partition.host_reserve"]["value"] is None
    assert got["partition.host_reserve"]["default_text"] == "the first physical core"


def test_every_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n'
                      '[ledger]\nstate_dir = "/from/file"\n[libvirt]\nuri = "qemu+unix:///system?socket=/from/file"\n')
    got = config_json(capsys, "--config", str(config))
    assert (got["partition.mode"]["value"], got["partition.mode"]["source"],
            got["partition.mode"]["from"]) == ("none", "file", f"{config} [partition] mode")
    assert got["partition.host_reserve"]["value"] == "0"  # a CPU list string
    assert got["partition.cgroup"]["source"] == "default"
    assert (got["ledger.state_dir"]["value"], got["ledger.state_dir"]["source"]) == \
        ("/from/file", "file")

    monkeypatch.setenv("PINWARDEN_STATE_DIR", "/from/env")
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+unix:///system?socket=/from/env")
    got = config_json(capsys, "--config", str(config))
    assert (got["ledger.state_dir"]["value"], got["ledger.state_dir"]["source"],
            got["ledger.state_dir"]["from"]) == ("/from/env", "env", "PINWARDEN_STATE_DIR")
    assert (got["libvirt.uri"]["value"], got["libvirt.uri"]["from"]) == \
        ("qemu+unix:///system?socket=/from/env", "LIBVIRT_DEFAULT_URI")

    # options, given before or after the command
    assert main(["--state-dir", "/from/option", "--json", "config", "--config", str(config),
                 "-c", "lxc:///"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_key = {s["key"]: s for s in data["settings"]}
    assert (by_key["state_dir"]["value"], by_key["state_dir"]["from"]) == \
        ("/from/option", "--state-dir")
    assert (by_key["uri"]["value"], by_key["uri"]["from"]) == ("lxc:///", "--connect")


def test_human_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nexclusive = "pw.partition"\n')
    monkeypatch.setenv("PINWARDEN_STATE_DIR", "/srv/pw")
    assert main(["config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config file {config} (given with --config)\n")
    assert re.search(rf"\[partition\] exclusive +pw\.partition +config file {config} "
                     rf"\[partition\] exclusive\n", out)
    assert re.search(r"\[ledger\] state_dir +/srv/pw +environment variable PINWARDEN_STATE_DIR",
                     out)
    assert re.search(r"\[partition\] host_reserve +\(the first physical core\) +default", out)
    assert "precedence: command-line option > environment variable > config file > default" \
        in out


def test_bad_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "fast"\n')
    assert main(["config", "--config", str(config), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "bad-input"
    assert err.startswith("pinwarden: error: ") and "partition.mode must be" in err
    assert main(["config", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_an_endless_or_huge_config_file_is_refused_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config /dev/zero`` read without end (gigabytes in seconds, hunt); a file over
    1 MiB is refused in one line, and a big valid one below that is read."""
    import time

    started = time.monotonic()
    assert main(["config", "--config", "/dev/zero"]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("pinwarden: error: config file /dev/zero is larger than the "
                          "1048576 characters accepted") and err.count("\n") == 1, err
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 100_000 + '[partition]\nmode = "none"\n')
    assert main(["config", "--config", str(big), "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert [x["value"] for x in settings if x["key"] == "mode"] == ["none"]


def test_a_named_pipe_nobody_writes_is_read_as_empty_not_waited_for(tmp_path: Path) -> None:
    """Opening a named pipe waits for a writer: a FIFO in place of the configuration file
    held every command — and every hook call, every 'virsh start' — forever (CLI hunt).
    One nobody writes to reads as empty (the defaults); one somebody writes to is read."""
    import os
    import threading

    fifo = tmp_path / "pinwarden.toml"
    os.mkfifo(fifo)
    done: list[Config] = []
    reader = threading.Thread(target=lambda: done.append(load_config(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    assert done == [Config()]

    read, write = os.pipe()  # what 'pinwarden --config <(…)' reads: /dev/fd/N, a pipe
    try:
        os.write(write, b'[partition]\nmode = "none"\n')
        os.close(write)
        assert load_config(Path(f"/proc/self/fd/{read}")).mode == "none"
    finally:
        os.close(read)


def test_a_config_read_from_a_pipe_shows_where_its_values_came_from(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``pinwarden config --config <(…)``: a pipe reads once.  The file was read twice
    (once for the values, once for which keys it sets), and every value it set was shown
    as the default (CLI hunt)."""
    import os

    read, write = os.pipe()
    try:
        os.write(write, b'[partition]\nmode = "none"\n[ledger]\nstate_dir = "/from/pipe"\n')
        os.close(write)
        path = f"/proc/self/fd/{read}"
        got = config_json(capsys, "--config", path)
    finally:
        os.close(read)
    assert got["_file"] == {"path": path, "source": "option --config", "exists": True}
    assert (got["partition.mode"]["value"], got["partition.mode"]["source"],
            got["partition.mode"]["from"]) == ("none", "file", f"{path} [partition] mode")
    assert (got["ledger.state_dir"]["value"], got["ledger.state_dir"]["source"]) == \
        ("/from/pipe", "file")
    assert got["partition.cgroup"]["source"] == "default"


def test_a_boolean_is_shown_as_the_file_spells_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``[isolation] noise`` showed as Python's ``True``/``False``, which the file refuses
    when copied into it (CLI hunt): TOML's ``true``/``false``, in text and JSON alike."""
    config = tmp_path / "pw.toml"
    config.write_text("[isolation]\nnoise = false\n")
    got = config_json(capsys, "--config", str(config))
    assert (got["isolation.noise"]["value"], got["isolation.noise"]["default"]) == \
        ("false", "true")
    assert main(["config", "--config", str(config)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "noise" in ln)
    assert line.split()[2] == "false", line
    assert parse_config(f"[isolation]\nnoise = {line.split()[2]}\n").isolate_noise is False


def test_a_host_reserve_this_host_lacks_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Every command would refuse it (partition mode none): so does config, after showing
    the settings; the same host_reserve on a host that has the CPU is fine."""
    small, big = build_host(tmp_path / "small", HostSpec(cpus=4)), \
        build_host(tmp_path / "big", HostSpec(cpus=16))
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "none"\nhost_reserve = "0,9"\n')
    argv = ["config", "--config", str(config), "--json"]
    assert main([*argv, "--root", str(small)]) == 1
    out, err = capsys.readouterr()
    problem = "host_reserve 0,9 names CPU 9 which this host does not have (present: 0-3)"
    assert json.loads(out)["problems"] == [f"{problem}; fix [partition] host_reserve in the "
                                           "configuration"]
    assert err.startswith(f"pinwarden: error: {problem}") and err.count("\n") == 1
    domain = tmp_path / "d.xml"
    domain.write_text("<domain type='kvm'><name>d</name><memory>1024</memory><vcpu>1</vcpu>"
                      "<os><type>hvm</type></os></domain>")
    assert main(["plan", "--config", str(config), "--root", str(small), "--state-dir",
                 str(tmp_path / "state"), str(domain)]) == 1
    assert problem in capsys.readouterr().err  # what the commands say, word for word
    assert main([*argv, "--root", str(big)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []



def test_a_host_reserve_of_every_cpu_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A host_reserve that keeps every online CPU for the host leaves no VM CPU: it was
    taken, and status then said "every VM CPU () is leased exclusively" with nothing
    leased (real-libvirt hunt).  Config and every command refuse it, in one line."""
    small = build_host(tmp_path / "small", HostSpec(cpus=4))
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "none"\nhost_reserve = "0-3"\n')
    problem = "host_reserve 0-3 keeps every online CPU (0-3) for the host, which leaves none " \
        "for VMs; fix [partition] host_reserve in the configuration"
    assert main(["config", "--config", str(config), "--json", "--root", str(small)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == [problem]
    assert main(["status", "--config", str(config), "--root", str(small), "--state-dir",
                 str(tmp_path / "state")]) == 1
    out, err = capsys.readouterr()
    assert err == f"pinwarden: error: {problem}\n" and out == ""


def test_provenance_agrees_with_what_the_commands_use(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The table-driven resolution gives the values state_dir() and libvirt_uri() give.  A
    relative --state-dir or PINWARDEN_STATE_DIR is below the current directory, made
    absolute: the hook script and the daemon use it from elsewhere (it was kept relative,
    while a relative state_dir in the file is refused — input hunt)."""
    config = tmp_path / "pw.toml"
    config.write_text('[ledger]\nstate_dir = "/f"\n[libvirt]\nuri = "qemu+ssh://f/system"\n')
    loaded = load_config(config)
    monkeypatch.chdir(tmp_path)
    env_rel = {"PINWARDEN_STATE_DIR": "e"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PINWARDEN_STATE_DIR", "e")
        assert state_dir(Path("o"), loaded) == tmp_path / "o"
        assert state_dir(None, loaded) == tmp_path / "e"
    for env in ({}, {"PINWARDEN_STATE_DIR": "/e", "LIBVIRT_DEFAULT_URI": "qemu:///session"},
                env_rel):
        for state_opt, uri_opt in ((None, None), ("/o", "test:///default"), ("o", None)):
            result = provenance.resolve(config, {"--state-dir": state_opt,
                                                 "--connect": uri_opt}, env)
            with pytest.MonkeyPatch.context() as mp:
                for name, value in env.items():
                    mp.setenv(name, value)
                expected_state = state_dir(Path(state_opt) if state_opt else None, loaded)
                expected_uri = libvirt_uri(uri_opt, loaded)
            assert result.get("state_dir") == expected_state
            assert result.get("libvirt_uri") == expected_uri


# -- the sample configuration -----------------------------------------------------------------


def test_sample_config_is_all_defaults() -> None:
    """contrib/pinwarden.toml as shipped changes nothing."""
    assert parse_config(SAMPLE.read_text(), SAMPLE) == Config()


def test_sample_config_documents_every_setting() -> None:
    """Every key of config.SETTINGS appears in its section, set or (when its default is decided
    at run time) as a commented example, with a comment above it."""
    lines = SAMPLE.read_text().splitlines()
    section = None
    where: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header.group(1)
            continue
        key = re.fullmatch(r"(?:# )?(\w+) = .+", line)
        if key and section is not None:
            where.setdefault((section, key.group(1)), number)
    for setting in SETTINGS:
        number = where.get((setting.section, setting.key))
        assert number is not None, f"[{setting.section}] {setting.key} missing from {SAMPLE}"
        commented = lines[number].startswith("#")
        assert commented == (setting.default_text is not None), lines[number]
        assert lines[number - 1].startswith("#"), f"{setting.key}: no comment above it"
        if setting.default_text:
            assert setting.default_text in SAMPLE.read_text()
    assert len(where) == len(SETTINGS)  # and nothing config.py does not know


def test_every_config_field_is_a_setting() -> None:
    """A key added to Config without its row in config.SETTINGS would be invisible to
    `pinwarden config`, the sample and the docs."""
    from pinwarden.record import fields

    assert [s.field for s in SETTINGS] == list(fields(Config))
    assert len({(s.section, s.key) for s in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize(("text", "needle"), [
    ('[partition]\nhost_reserve = "x"\n', "[partition] host_reserve: invalid CPU list 'x'"),
    ('[ledger]\nstate_dir = ""\n', "state_dir is empty"),
    ('[ledger]\nstate_dir = "  "\n', "state_dir is empty"),
    ('[ledger]\nstate_dir = "var/pw"\n', "state_dir must be an absolute path, not 'var/pw'"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ('[partition]\ncgroup_v2 = "machine\\nx.slice"\n',
     "[partition] invalid cgroup path 'machine\\nx.slice': it holds a control"),
    ('[partition]\ncgroup = "a\\tb"\n', "invalid cgroup path 'a\\tb'"),
    # a setting above every header: it was "unknown section [mode]" (input hunt)
    ('mode = "none"\n[partition]\n', "setting mode is outside any section: put it under "
                                     "[partition]"),
    ('colour = 1\n', "setting colour is outside any section and no section has it"),
    ('[colour]\nx = 1\n', "unknown section [colour]"),
])
def test_bad_config_values_name_the_file_and_setting(tmp_path: Path, text: str,
                                                     needle: str) -> None:
    """Every configuration error says which file and what is wrong, on one line (an empty
    state_dir once put the ledger in the current directory; a deeply nested value
    crashed tomllib)."""
    config = tmp_path / "pw.toml"
    config.write_text(text)
    with pytest.raises(InputError) as info:
        load_config(config)
    assert info.value.message.startswith(f"{config}: ")
    assert needle in info.value.message and "\n" not in info.value.message


@pytest.mark.parametrize("option", ["--state-dir", "--config", "--root"])
def test_an_empty_path_option_is_a_usage_error(option: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--state-dir "$UNSET"` must not fall back to the host's own ledger (or config, or
    root): it is refused before anything is read."""
    with pytest.raises(SystemExit) as info:
        main([option, "", "status"])
    assert info.value.code == 2
    assert f"argument {option}: empty path" in capsys.readouterr().err


@pytest.mark.parametrize("table,key", [("ledger", "state_dir"), ("partition", "cgroup"),
                                       ("libvirt", "uri")])
def test_a_nul_in_a_setting_is_refused_in_one_line(table: str, key: str) -> None:
    """TOML lets a string hold \\u0000; no path, cgroup or URI may (the state directory's
    was an internal error, exit 70, in every ledger command and the hook)."""
    with pytest.raises(InputError) as err:
        parse_config(f'[{table}]\n{key} = "/tmp/x\\u0000y"\n', Path("/etc/pw.toml"))
    assert str(err.value) == f"/etc/pw.toml: {key} holds a NUL character (\\u0000); remove it"


def test_a_byte_order_mark_is_read_past_and_a_parse_error_shows_its_line() -> None:
    """A file an editor saved with a UTF-8 byte order mark was "Invalid statement (at line
    1, column 1)", and a setting given twice only "Cannot overwrite a value" (hunt): the
    mark is read past, and a parse error names the line it is about."""
    from pinwarden.errors import InputError

    path = Path("/etc/pinwarden/pinwarden.toml")
    assert parse_config('\ufeff[partition]\nmode = "none"\n', path).mode == "none"
    from pinwarden.provenance import _keys_in  # (and `pinwarden config` says it is set)

    assert _keys_in('\ufeff[partition]\nmode = "none"\n') == {("partition", "mode")}
    with pytest.raises(InputError) as twice:
        parse_config('[partition]\nmode = "none"\nmode = "cgroup"\n', path)
    assert str(twice.value) == (f"{path}: Cannot overwrite a value (at line 3, column 16) (a "
                                "setting given twice?): 'mode = \"cgroup\"'")
    with pytest.raises(InputError, match=r"\(at line 2, column 8\): 'mode = none'$"):
        parse_config("[partition]\nmode = none\n", path)
