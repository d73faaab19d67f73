"""What each command loads (issue #12): a command imports what its handler needs, never the
whole program.  Checked by module names in a fresh interpreter, not by timing (speed is
measured by ``make bench-cli``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "src" / "pinwarden" / "data" / "example-host"
EXCLUSIVE = ("<domain type='kvm'><name>db</name><vcpu>2</vcpu><metadata>"
             "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/></metadata></domain>")

#: Never needed by the read-only placement commands on a host dump.
HEAVY = ("prometheus_client", "pinwarden.metrics", "pinwarden.audit", "pinwarden.isolation",
         "pinwarden.noise", "pinwarden.runner", "pinwarden.provenance", "pinwarden.enforce",
         "pinwarden.libvirt", "libvirt", "jeepney", "dbus_fast", "tomllib", "shtab", "tempfile",
         "uuid", "pinwarden.jsonout", "shutil", "pinwarden.procs",
         # pinwarden.record stands in for dataclasses, which costs a millisecond a class
         # and loads inspect (with ast, dis and tokenize)
         "dataclasses", "inspect")

PROBE = ("import json, sys\n"
         "from pinwarden.cli import main\n"
         "try:\n"
         "    status = main(sys.argv[1:])\n"
         "finally:\n"
         "    sys.stdout.flush()\n"
         "    print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
         "sys.exit(status)\n")


def loaded(*argv: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY or m.startswith(
        tuple(f"{h}." for h in HEAVY)))


@pytest.mark.parametrize("command", ["plan", "status", "help"])
def test_placement_commands_load_only_what_they_use(tmp_path: Path, command: str) -> None:
    xml = tmp_path / "db.xml"
    xml.write_text(EXCLUSIVE)
    where = ["--root", str(EXAMPLE), "--state-dir", str(tmp_path / "state")]
    argv = {"plan": ["plan", *where, str(xml)], "status": ["status", *where],
            "help": ["host", "--help"]}[command]
    modules = loaded(*argv)
    assert heavy(modules) == []
    if command == "help":  # --help exits in the parser: nothing a handler uses is loaded
        assert not {"pinwarden.manager", "pinwarden.ledger", "sqlite3"} & modules
    if command == "plan":
        assert "pinwarden.view" not in modules  # the CPU map is for status and host
    if command == "status":
        assert "pinwarden.domain" not in modules  # no XML parser to show leases


def test_run_default_threads_is_the_domain_default() -> None:
    from pinwarden.cli import run
    from pinwarden.domain import DEFAULT_THREADS

    assert run.DEFAULT_THREADS == DEFAULT_THREADS


# -- the parser of the named command only ---------------------------------------------------

SAMPLES = [
    ["host"], ["--json", "host", "--root", "/r"], ["plan", "d.xml", "--emit-xml"],
    ["--root", "/r", "reserve", "-"], ["release", "vm", "--driver", "qemu"],
    ["--state-dir", "status", "status"], ["--state", "plan", "status"],  # abbreviation
    ["--root=/r", "sync"], ["run", "--exclusive", "2", "--", "sleep", "1"],
    ["start", "-c", "test:///default", "vm"], ["stop", "vm", "--graceful"],
    ["define", "f.xml"], ["hook", "run", "qemu", "vm", "prepare", "begin", "-"],
    ["hook", "install", "--dry-run"], ["daemon", "--once"], ["audit", "--strict"],
    ["config", "--connect", "x"], ["metrics", "--no-audit"], ["completion", "bash"],
    ["demo", "--offline"],
]


def _parsed(parser: object, argv: list[str]) -> dict[str, object]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    data = vars(parser.parse_args(argv))
    handler = data.pop("handler")
    data["handler"] = getattr(handler, "__qualname__", handler)
    return data


@pytest.mark.parametrize("argv", SAMPLES, ids=" ".join)
def test_one_command_parser_parses_like_the_whole(argv: list[str]) -> None:
    """What main() parses (the named command's parser, or the whole one when the guess of
    the command was wrong) is what the whole parser parses."""
    from pinwarden.cli import _parse_args, build_parser

    data = vars(_parse_args(argv))
    handler = data.pop("handler")
    data["handler"] = getattr(handler, "__qualname__", handler)
    assert data == _parsed(build_parser(), argv)


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["hook", "--help"],
                                  ["hook", "run", "--help"], ["bogus"], [], ["--version"],
                                  ["status", "--bogus"], ["run", "--exclusive"]],
                         ids=lambda a: " ".join(a) or "nothing")
def test_one_command_parser_helps_and_fails_like_the_whole(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pinwarden.cli import _parse, _parse_args, build_parser

    outputs = []
    for parse in (lambda: _parse_args(argv), lambda: _parse(build_parser(), argv)):
        with pytest.raises(SystemExit) as exit_info:
            parse()
        out, err = capsys.readouterr()
        outputs.append((exit_info.value.code, out, err))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("columns", [None, "", "0", "-3", "abc", "40", "132"])
def test_help_width_is_argparse_default(columns: str | None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's parsers find the terminal width without loading shutil, with its rule."""
    import shutil

    from pinwarden.cli import help_width

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert help_width() == shutil.get_terminal_size().columns - 2
