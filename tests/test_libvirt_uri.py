"""Which libvirt URIs pinwarden works through: the local system daemon of the QEMU or LXC
driver only.  Another host's CPUs are not the ones leased here, a user's
``qemu:///session`` domain runs outside the VM partition and the system daemon's listing
(its lease would be freed as dead), and other drivers run no QEMU or LXC process here.
Root's ``qemu:///session`` is the system daemon (test_libvirt_e2e shows it on libvirtd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pinwarden.cli import main
from pinwarden.errors import InputError
from pinwarden.libvirt import connect, daemon
from pinwarden.libvirt.uri import check_uri, uri_problem

ACCEPTED = {
    "qemu:///system": "qemu", "QEMU:///system": "qemu", "qemu+unix:///system": "qemu",
    "qemu+unix:///system?socket=/run/libvirt/libvirt-sock": "qemu",
    "qemu:///system?mode=legacy": "qemu", "qemu://localhost/system": "qemu",
    "qemu+ssh://root@127.0.0.1/system": "qemu", "qemu+tcp://[::1]/system": "qemu",
    "lxc:///": "lxc", "lxc://": "lxc", "lxc:///system": "lxc", "lxc+unix:///": "lxc",
}

REFUSED = {  # URI -> words the one-line refusal must hold (for root and other users)
    "qemu:///embed?root=/srv/vm": "without a libvirt daemon",
    "qemu:///": "does not name the system daemon",
    "qemu:///systemd": "does not name the system daemon",
    "lxc:///session": "does not name the system daemon",
    "qemu+ssh://h/system": "names host 'h'",
    "qemu+tls://other.example/system": "names host 'other.example'",
    "lxc://10.0.0.9/": "names host '10.0.0.9'",
    "test:///default": "uses the 'test' driver",
    "xen:///system": "uses the 'xen' driver",
    "ch:///system": "uses the 'ch' driver",
    "qemu://[bad/system": "is not a URI",
}


@pytest.mark.parametrize("root", [True, False])
@pytest.mark.parametrize("uri", sorted(ACCEPTED))
def test_the_local_system_daemon_is_accepted(uri: str, root: bool) -> None:
    assert uri_problem(uri, root=root) is None
    assert check_uri(uri, root=root) == ACCEPTED[uri]


@pytest.mark.parametrize("root", [True, False])
@pytest.mark.parametrize("uri", sorted(REFUSED))
def test_a_uri_elsewhere_is_refused_in_one_line_saying_why(uri: str, root: bool) -> None:
    problem = uri_problem(uri, root=root)
    assert problem is not None and "\n" not in problem
    assert REFUSED[uri] in problem and "use qemu:///system or lxc:///" in problem
    with pytest.raises(InputError) as caught:
        check_uri(uri, root=root)
    assert caught.value.code == "uri" and caught.value.message == problem


@pytest.mark.parametrize("uri", ["qemu:///session", "qemu+unix:///session?socket=/tmp/s"])
def test_session_is_the_system_daemon_for_root_only(uri: str) -> None:
    assert check_uri(uri, root=True) == "qemu"
    problem = uri_problem(uri, root=False)
    assert problem is not None and "login session's cgroup" in problem


def test_an_alias_is_left_to_libvirt_and_checked_once_resolved() -> None:
    """A libvirt.conf alias (``-c hail``) or libvirt's default names no driver; only the
    URI libvirt resolves can be judged."""
    assert uri_problem("hail", root=True) is None and uri_problem("", root=False) is None


def test_a_huge_uri_is_quoted_short() -> None:
    problem = uri_problem("qemu+ssh://" + "h" * 5000 + "/system", root=True)
    assert problem is not None and len(problem) < 400 and "(5018 characters)" in problem


class _Conn:
    def __init__(self, uri: str) -> None:
        self.uri, self.closed = uri, False

    def getURI(self) -> str:
        return self.uri

    def close(self) -> int:
        self.closed = True
        return 0


class _Binding:
    """The ``libvirt`` module's ``open``: records the URIs it was asked for; an alias
    resolves to ``resolved``."""

    libvirtError = RuntimeError

    def __init__(self, resolved: str) -> None:
        self.resolved, self.opened, self.conns = resolved, [], []

    def open(self, uri: str) -> _Conn:
        self.opened.append(uri)
        self.conns.append(_Conn(self.resolved))
        return self.conns[-1]


def test_a_refused_uri_is_never_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before libvirt is asked: a user's ``qemu:///session`` would start a session
    daemon, a remote URI would dial out."""
    fake = _Binding("qemu:///system")
    monkeypatch.setattr(connect, "binding", lambda: fake)
    monkeypatch.setattr(connect.os, "geteuid", lambda: 1000)
    for uri in ("qemu:///session", "qemu+ssh://h/system"):
        with pytest.raises(InputError, match="libvirt URI"):
            connect.open_connection(uri)
    assert fake.opened == []
    assert connect.open_connection("qemu:///system").uri == "qemu:///system"


def test_an_alias_resolving_elsewhere_is_refused_and_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Binding("xen:///system")
    monkeypatch.setattr(connect, "binding", lambda: fake)
    with pytest.raises(InputError, match="'xen:///system' uses the 'xen' driver"):
        connect.open_connection("hail")
    assert fake.opened == ["hail"] and fake.conns[0].closed


def test_the_daemon_ends_on_a_refused_uri_instead_of_retrying(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``pinwarden daemon -c qemu+ssh://h/system`` exits 1 at once; before, it would have
    retried the connection for ever (and an alias resolving there does the same)."""
    from pinwarden.manager import Manager

    def never(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the daemon went on with a refused URI")

    monkeypatch.setattr(daemon, "_run", never)
    monkeypatch.setattr(connect, "binding", never)
    with pytest.raises(InputError, match="names host 'h'"):
        daemon.main(Manager.__new__(Manager), "qemu+ssh://h/system")


def test_every_libvirt_command_refuses_it(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """start (its own or the daemon's), stop, define and the daemon: exit 1, one line,
    nothing recorded; a user's session is judged as that user means it, not as the root
    daemon serving the start would read it."""
    import os

    monkeypatch.setenv("PINWARDEN_STATE_DIR", str(tmp_path / "state"))
    xml = tmp_path / "d.xml"
    xml.write_text("<domain type='kvm'><name>d</name><memory>1024</memory>"
                   "<vcpu>1</vcpu></domain>")
    for uri, euid, says in (("qemu+ssh://elsewhere/system", 0, "names host 'elsewhere'"),
                            ("qemu:///session", 1000, "login session's cgroup")):
        monkeypatch.setattr(os, "geteuid", lambda euid=euid: euid)
        for argv in (["start", "d"], ["start", "--no-daemon", "d"], ["start", "--dry-run", "d"],
                     ["stop", "d"], ["define", str(xml)], ["daemon", "--once"]):
            assert main([*argv, "-c", uri]) == 1, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err, (argv, err)
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_config_names_a_uri_every_command_would_refuse(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    config = tmp_path / "pinwarden.toml"
    config.write_text('[libvirt]\nuri = "qemu+tls://h.example/system"\n')
    assert main(["config", "--config", str(config)]) == 1
    out = capsys.readouterr()
    assert "qemu+tls://h.example/system" in out.out
    assert out.err.count("\n") == 1 and "names host 'h.example'" in out.err
    assert main(["config", "--config", str(config), "-c", "qemu:///system"]) == 0
