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
         "uuid", "pinwarden.jsonout")

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
