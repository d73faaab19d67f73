"""Which libvirt connection URIs pinwarden can work through.  Pure: no I/O.

pinwarden leases *this host's* CPUs and enforces them in *this host's* cgroups, and its
daemon frees a lease whose domain the system daemon no longer lists.  So every domain it
starts, stops or follows must be one the local system daemon of the QEMU or LXC driver
runs, inside the VM partition:

* another host (``qemu+ssh://h/system``): its CPUs are not the ones recorded here;
* ``qemu:///session`` of a user other than root: the domain runs in the user's
  login-session cgroup, outside the VM partition, and the system daemon never lists it, so
  its lease would be freed as dead.  For root, libvirt makes ``qemu:///session`` the system
  daemon (its client dials the system socket, whose QEMU driver takes both paths), so root's
  is accepted;
* ``qemu:///embed``: no libvirt daemon at all;
* other drivers (``test``, ``xen``, ``ch``, ``vz``, …): not QEMU or LXC processes here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pinwarden.errors import InputError, shorten

#: Server names that are this host whatever its name.
LOCAL_SERVERS = frozenset({"", "localhost", "localhost.localdomain", "127.0.0.1", "::1"})

#: Each driver's system-daemon paths (``lxc:///`` and ``lxc:///system`` are the same).
SYSTEM_PATHS = {"qemu": frozenset({"/system"}), "lxc": frozenset({"", "/", "/system"})}

_USE = "use qemu:///system or lxc:///"


def driver_of(uri: str) -> str:
    """``qemu`` or ``lxc`` from a connection URI (``qemu:///system``, ``lxc:///``)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    return "lxc" if scheme == "lxc" else "qemu"


def uri_problem(uri: str, *, root: bool) -> str | None:
    """Why pinwarden cannot work through ``uri``, in one line; None when it names the local
    system daemon of the QEMU or LXC driver (any transport, any query: ``socket=…``), or
    names no driver at all: an alias from libvirt.conf or libvirt's default, which only
    libvirt resolves (:func:`check_uri` the URI of the open connection then).  ``root``:
    whether the caller is root, for whom ``qemu:///session`` is the system daemon."""
    if "://" not in uri:
        return None
    shown = shorten(uri)
    try:
        parts = urlsplit(uri.strip())
        server = parts.hostname or ""
    except ValueError as exc:
        return f"libvirt URI {shown} is not a URI ({exc}); {_USE}"
    driver = parts.scheme.partition("+")[0]
    if driver not in SYSTEM_PATHS:
        return (f"libvirt URI {shown} uses the {driver!r} driver; pinwarden places the "
                f"domains of the qemu and lxc drivers only: {_USE}")
    if server.lower() not in LOCAL_SERVERS:
        return (f"libvirt URI {shown} names host {shorten(server)}; pinwarden leases the "
                f"CPUs of the host it runs on: run it there, or {_USE} here")
    system = SYSTEM_PATHS[driver] | ({"/session"} if root and driver == "qemu" else set())
    if parts.path not in system:
        why = {"/session": "runs domains in your login session's cgroup, outside the VM "
                           "partition, where the system daemon does not see them",
               "/embed": "runs domains without a libvirt daemon"}.get(
            parts.path if driver == "qemu" else "", "does not name the system daemon")
        return f"libvirt URI {shown} {why}; pinwarden works with the system daemon: {_USE}"
    return None


def check_uri(uri: str, *, root: bool) -> str:
    """The driver (``qemu``/``lxc``) of ``uri``; an :class:`InputError` (code ``uri``)
    saying why pinwarden cannot work through it otherwise."""
    problem = uri_problem(uri, root=root)
    if problem is not None:
        raise InputError(problem, code="uri")
    return driver_of(uri)
