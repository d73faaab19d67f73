"""Generated documentation: shell completion (shtab) and the man page (argparse-manpage), both
from the argument parser, so both must know every command and option there is."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pinwarden.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
             ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command path → its parser: ("host",), ("hook", "install"), …"""
    out: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[(*prefix, name)] = sub
                out.update(commands(sub, (*prefix, name)))
    return out


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


ALL = commands(build_parser())


def test_the_walk_sees_the_commands() -> None:
    assert {("host",), ("status",), ("hook", "install"), ("metrics",), ("config",),
            ("completion",)} <= set(ALL)
    assert len(ALL) > 15


# -- completion -----------------------------------------------------------------------------


def completion(shell: str) -> str:
    proc = subprocess.run([str(BIN / "pinwarden"), "completion", shell], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bash_completion_is_valid_and_complete(tmp_path: Path) -> None:
    script = tmp_path / "pinwarden.bash"
    script.write_text(completion("bash"))
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    text = script.read_text()
    for path, parser in ALL.items():
        assert re.search(rf"\b{re.escape(path[-1])}\b", text), path
        missing = {o for o in options(parser) if o not in text}
        assert not missing, (path, missing)


def complete_bash(script: Path, cwd: Path, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (the completion function, as bash calls
    it on TAB)."""
    quoted = " ".join(f"'{w}'" for w in words)
    code = (f"source '{script}'\n"
            f"COMP_WORDS=(pinwarden {quoted}); COMP_CWORD={len(words)}\n"
            'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
            "_shtab_pinwarden\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_completes(tmp_path: Path) -> None:
    script = tmp_path / "pinwarden.bash"
    script.write_text(completion("bash"))
    work = tmp_path / "work"
    (work / "subdir").mkdir(parents=True)
    (work / "vm.xml").write_text("<domain/>")
    assert complete_bash(script, work, "st") == ["status", "start", "stop"]
    assert complete_bash(script, work, "hook", "") == ["install", "uninstall", "check", "ping",
                                                       "run", "give-back"]
    assert complete_bash(script, work, "audit", "--s") == ["--state-dir", "--strict"]
    assert complete_bash(script, work, "--js") == ["--json"]  # before the command too
    assert complete_bash(script, work, "host", "--root", "") == ["subdir"]  # directories only
    assert set(complete_bash(script, work, "plan", "")) >= {"vm.xml", "subdir"}
    assert complete_bash(script, work, "run", "--threads", "") == \
        ["whole", "prefer", "isolate", "require"]


def test_zsh_completion_is_valid_and_complete(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (make test installs it: APT_PACKAGES)")
    script = tmp_path / "_pinwarden"
    script.write_text(completion("zsh"))
    check = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    text = script.read_text()
    assert text.startswith("#compdef pinwarden")
    for path, parser in ALL.items():
        assert re.search(rf"\b{re.escape(path[-1])}\b", text), path
        missing = {o for o in options(parser) if o not in text}
        assert not missing, (path, missing)


def test_completion_needs_a_shell(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["completion", "fish"])
    assert exc.value.code == 2
    assert "usage: pinwarden completion" in capsys.readouterr().err


# -- the man page -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manpage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pinwarden.1 built the way `make man` builds it."""
    out = tmp_path_factory.mktemp("man") / "man1" / "pinwarden.1"
    out.parent.mkdir()
    proc = subprocess.run([str(REPO / "scripts" / "manpage"), str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BIN": str(BIN)})
    assert proc.returncode == 0, proc.stderr
    return out


def test_man_page_renders_without_warnings(manpage: Path) -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(manpage)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = subprocess.run(["man", "--warnings", "-l", str(manpage)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MANWIDTH": "100",
                                                      "MAN_KEEP_FORMATTING": ""})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("PINWARDEN(1)")


def rendered(manpage: Path) -> str:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-rLL=200n", "-P-cbou", str(manpage)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace("\u2010", "-")  # groff's hyphen


def test_man_page_lists_every_command_and_option(manpage: Path) -> None:
    text = rendered(manpage)
    for path, parser in ALL.items():
        name = " ".join(("pinwarden", *path))
        assert f"usage: {name}" in text, name
        missing = {o for o in options(parser) if not re.search(rf"{re.escape(o)}\b", text)}
        assert not missing, (name, missing)
    for section in ("SYNOPSIS", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), section
    assert "LIBVIRT_DEFAULT_URI" in text and "PINWARDEN_STATE_DIR" in text
    assert "--version" in text


def test_man_page_is_found_by_man(manpage: Path) -> None:
    """Installed in a man1 directory of MANPATH, `man pinwarden` finds it (what systemd's
    Documentation=man:pinwarden(1) asks for)."""
    proc = subprocess.run(["man", "-w", "pinwarden"], capture_output=True, text=True,
                          env={**os.environ, "MANPATH": str(manpage.parent.parent)})
    assert proc.returncode == 0 and proc.stdout.strip() == str(manpage), proc.stderr


def test_every_error_code_is_documented_in_the_readme() -> None:
    """``--json`` error codes are a stable interface: each one pinwarden can raise is in
    the README's table, and the table names no code it cannot (CLI hunt: none was)."""
    src = REPO / "src" / "pinwarden"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    used = set(re.findall(r'\bcode\s*=\s*"([a-z][a-z0-9-]*)"', text))
    for name in re.findall(r"\bcode=([A-Z][A-Z_]+)\b", text):  # (a module's constant)
        used |= set(re.findall(rf'^{name} = "([a-z][a-z0-9-]*)"', text, re.M))
    used |= set(re.findall(r'"code": "([a-z][a-z0-9-]*)"', text))  # (the internal error)
    readme = (REPO / "README.md").read_text()
    table = readme.split("Error codes (", 1)[1].split("\n\n", 2)[1]
    documented = {code for row in table.splitlines() if row.startswith("| `")
                  for code in re.findall(r"`([a-z][a-z0-9-]*)`", row.split(" | ")[0])}
    assert used - documented == set(), "undocumented error codes"
    assert documented - used == set(), "documented codes pinwarden never gives"



def test_a_cpu_list_that_does_not_parse_is_bad_cpuset_wherever_it_is() -> None:
    """README's table: ``bad-cpuset``, a CPU list that does not parse.  Only 'run --cpus'
    said so; one in the domain XML or in host_reserve said ``bad-input`` (README hunt)."""
    import pytest

    from pinwarden.config import parse_config
    from pinwarden.domain import parse_domain
    from pinwarden.errors import InputError

    with pytest.raises(InputError) as xml_err:
        parse_domain("<domain type='kvm'><name>x</name><vcpu cpuset='x-'>1</vcpu></domain>")
    assert xml_err.value.code == "bad-cpuset", xml_err.value
    with pytest.raises(InputError) as config_err:
        parse_config('[partition]\nhost_reserve = "x"\n', Path("pw.toml"))
    assert config_err.value.code == "bad-cpuset", config_err.value
