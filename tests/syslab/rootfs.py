"""Root file systems of the systemd host lab: Debian suites built with mmdebstrap, cached.

A root is built from a :class:`Recipe` (suite, mirrors, packages, files written into it)
into ``$PINWARDEN_SYSLAB_CACHE`` (default ``/var/cache/pinwarden-syslab``) as
``<suite>-<recipe hash>/``:

* ``root.img`` — the root as a raw ext4 image (``mkfs.ext4 -d``), booted read-only through a
  per-boot qcow2 overlay, so every boot starts from the same fresh system and the 9p
  traps (no unix sockets, no SQLite WAL) do not exist;
* ``kernel/boot/vmlinuz-*`` and ``kernel/lib/modules/*`` — the suite's own kernel, for
  suites booted with it (trixie); virtme-ng exports those modules to the guest;
* ``recipe.json``, ``packages.tsv`` (``dpkg-query -W`` of the root: what was tested),
  ``build.log``.

The build runs on first use and whenever the recipe changes (another hash, another
directory).  It happens in ``.<name>.tmp-<pid>`` and is renamed into place only when
complete, so an interrupted build never leaves a root that a later run would trust; stale
temporary directories of dead builders are removed.  Building needs root (mmdebstrap's
root mode), ``mmdebstrap`` and the network to the Debian mirror.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("PINWARDEN_SYSLAB_CACHE", "/var/cache/pinwarden-syslab"))
#: Bump when the build procedure below changes in a way the recipe does not show.
BUILD_VERSION = 1
BUILD_TIMEOUT = float(os.environ.get("PINWARDEN_SYSLAB_BUILD_TIMEOUT", "1800"))
MIRROR = os.environ.get("PINWARDEN_SYSLAB_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("PINWARDEN_SYSLAB_SECURITY_MIRROR",
                                 "http://deb.debian.org/debian-security")

#: What every lab root holds: systemd as init, libvirtd (qemu and lxc drivers) with QEMU,
#: the distribution's Python with its venv module and libvirt binding, and the tools the
#: checks use (busctl comes with systemd, inotifywait with inotify-tools).
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "udev", "procps", "iproute2", "util-linux", "kmod",
    "libvirt-daemon-system", "libvirt-clients", "libvirt-daemon-driver-lxc",
    "qemu-system-x86", "seabios",
    "python3", "python3-venv", "python3-libvirt",
    "inotify-tools",
)

#: libvirtd logs its cgroup, systemd (machined) and hook decisions at debug level into a
#: file of its own: the checks quote what libvirt wrote where.  In /run, because
#: virtme-ng-init mounts tmpfs over /var/log (and /var/cache, /var/tmp) after systemd has
#: started libvirtd.
LIBVIRTD_CONF_APPEND = """
# pinwarden syslab: libvirt's cgroup, machined and hook decisions, at debug level
log_filters="1:util.cgroup 1:util.systemd 1:util.hook 1:util.command"
log_outputs="1:file:/run/libvirt/libvirtd-debug.log"
"""


@dataclass(frozen=True)
class Recipe:
    suite: str
    #: ``deb`` source lines for mmdebstrap
    sources: tuple[str, ...]
    packages: tuple[str, ...]
    #: ``"host"``: booted with the host's kernel (``/boot/vmlinuz-…``); ``"root"``: with the
    #: kernel the root installs (``linux-image-amd64``), kept beside the image
    kernel: str
    #: files appended to (path → text)
    append: tuple[tuple[str, str], ...] = ()
    #: files removed after the installation
    remove: tuple[str, ...] = ()
    build_version: int = field(default=BUILD_VERSION)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.suite}-{self.digest()}"


def _sources(suite: str) -> tuple[str, ...]:
    return (f"deb {MIRROR} {suite} main",
            f"deb {MIRROR} {suite}-updates main",
            f"deb {SECURITY_MIRROR} {suite}-security main")


_APPEND = (("etc/libvirt/libvirtd.conf", LIBVIRTD_CONF_APPEND),)
#: the default NAT network needs dnsmasq and a bridge: libvirtd would only log errors
_REMOVE = ("etc/libvirt/qemu/networks/autostart/default.xml",)

RECIPES: dict[str, Recipe] = {
    # libvirt 9.0, systemd 252, Python 3.11; the host's Debian 6.1 kernel
    "bookworm": Recipe("bookworm", _sources("bookworm"), PACKAGES, "host", _APPEND, _REMOVE),
    # libvirt 11.x, systemd 257, Python 3.13; its own 6.12 kernel; AppArmor as a Debian
    # install has it (the kernel enables the LSM, the apparmor package loads the profiles):
    # libvirtd runs confined, and so does each QEMU (libvirt-UUID, from virt-aa-helper)
    "trixie": Recipe("trixie", _sources("trixie"),
                     (*PACKAGES, "linux-image-amd64", "apparmor"), "root", _APPEND, _REMOVE),
}


class BuildError(Exception):
    """The root could not be built; the message says why and where the log is."""


@dataclass(frozen=True)
class BuiltRoot:
    recipe: Recipe
    path: Path

    @property
    def image(self) -> Path:
        return self.path / "root.img"

    def kernel(self) -> Path | None:
        """The suite's own kernel (``kernel = "root"``), else None."""
        found = sorted((self.path / "kernel" / "boot").glob("vmlinuz-*"))
        return found[-1] if found else None

    def packages(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in (self.path / "packages.tsv").read_text().splitlines():
            name, _, version = line.partition("\t")
            out[name.split(":")[0]] = version
        return out


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except FileNotFoundError:
            raise BuildError(f"{cmd[0]} is not installed (apt-get install "
                             f"{'mmdebstrap' if cmd[0] == 'mmdebstrap' else 'e2fsprogs'})"
                             ) from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"{cmd[0]} took more than {timeout:.0f} s; log: {log}") from None
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"{' '.join(cmd[:3])} … exited {proc.returncode}; log {log}:\n{tail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(cache: Path) -> None:
    """Temporary build directories whose builder is gone (an interrupted build)."""
    for tmp in cache.glob(".*.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _rmtree(tmp)


def _rmtree(path: Path) -> None:
    # mmdebstrap may leave mounts behind when killed: never follow into them
    subprocess.run(["umount", "-R", "-l", str(path / "root" / "proc")], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["umount", "-R", "-l", str(path / "root" / "sys")], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(cache: Path, suite: str) -> Iterator[None]:
    with (cache / f".{suite}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(recipe: Recipe, tmp: Path) -> None:
    log = tmp / "build.log"
    root = tmp / "root"
    cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
           "--aptopt=Acquire::Retries \"3\"", recipe.suite, str(root), *recipe.sources]
    start = time.monotonic()
    _run(cmd, log, BUILD_TIMEOUT)
    for rel, text in recipe.append:
        with (root / rel).open("a") as f:
            f.write(text)
    for rel in recipe.remove:
        (root / rel).unlink(missing_ok=True)
    (root / "etc" / "pinwarden-syslab").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    query = subprocess.run(["chroot", str(root), "dpkg-query", "-W"], capture_output=True,
                           text=True, check=False)
    if query.returncode != 0:
        raise BuildError(f"dpkg-query in {root} failed: {query.stderr}")
    (tmp / "packages.tsv").write_text(query.stdout)
    if recipe.kernel == "root":
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise BuildError(f"{recipe.suite}: no /boot/vmlinuz-* in the root")
        (tmp / "kernel" / "boot").mkdir(parents=True)
        shutil.copy2(kernels[-1], tmp / "kernel" / "boot")
        shutil.copytree(root / "lib" / "modules", tmp / "kernel" / "lib" / "modules",
                        symlinks=True)
    used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    size_mib = used // 2**20 + 2048  # room for what the guest writes (the overlay holds it)
    _run(["mkfs.ext4", "-q", "-F", "-L", "pwsyslab", "-d", str(root),
          str(tmp / "root.img"), f"{size_mib}M"], log, 600)
    _rmtree(root)
    (tmp / "recipe.json").write_text(json.dumps(
        {**asdict(recipe), "digest": recipe.digest(),
         "build_seconds": round(time.monotonic() - start, 1)}, indent=1) + "\n")


def ensure_root(suite: str, *, cache: Path = CACHE) -> BuiltRoot:
    """The cached root of ``suite``, built first if missing (:class:`BuildError`)."""
    try:
        recipe = RECIPES[suite]
    except KeyError:
        raise BuildError(f"unknown lab suite {suite!r} (known: {', '.join(RECIPES)})") from None
    final = cache / recipe.name
    if (final / "recipe.json").exists():
        return BuiltRoot(recipe, final)
    if os.geteuid() != 0:
        raise BuildError(f"building the {suite} lab root needs root (mmdebstrap); "
                         f"run as root or point PINWARDEN_SYSLAB_CACHE at a built cache")
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache, suite):
        if (final / "recipe.json").exists():  # another session built it meanwhile
            return BuiltRoot(recipe, final)
        _remove_stale(cache)
        tmp = cache / f".{recipe.name}.tmp-{os.getpid()}"
        _rmtree(tmp)
        tmp.mkdir()
        try:
            _build(recipe, tmp)
        except BaseException:
            log = tmp / "build.log"
            kept = cache / f"failed-{recipe.name}.log"
            with contextlib.suppress(OSError):
                shutil.copy2(log, kept)
            _rmtree(tmp)
            raise
        if final.exists():  # a half directory from an older scheme: never trusted
            _rmtree(final)
        tmp.rename(final)
    return BuiltRoot(recipe, final)


if __name__ == "__main__":  # by hand: python tests/syslab/rootfs.py [SUITE…]
    import sys

    for name in sys.argv[1:] or list(RECIPES):
        built = ensure_root(name)
        print(built.path, built.kernel() or "(host kernel)")
