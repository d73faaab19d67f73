"""The lab's second kernel: the newest Debian kernel, from trixie-backports, unpacked outside
the repository.

The first kernel is the host's own (``/boot``: Debian 12's 6.1).  This one is what hosts that
follow new kernels run (7.3 when this was written), and the cpuset rules have moved between
them (DEVELOPERS.md, "Kernel test lab").  apt fetches it — with a sources list, lists and
cache of its own under the cache directory, so the host's apt configuration is untouched,
and with the archive signatures checked against the host's Debian keyring — and the
packages are unpacked (``dpkg-deb -x``, nothing installed) into
``/var/cache/pinwarden-kernels/RELEASE``, where virtme-ng finds ``lib/modules``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("PINWARDEN_KERNEL_CACHE", "/var/cache/pinwarden-kernels"))
SOURCE = "deb http://deb.debian.org/debian trixie-backports main"
META = "linux-image-amd64"


class KernelFetchError(Exception):
    """The backports kernel could not be fetched or unpacked; the message says why."""


def _apt(state: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={state / 'lists'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", f"Dir::Cache={state / 'cache'}",
            "-o", f"Dir::Cache::Archives={state / 'archives'}",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelFetchError(f"{cmd[0]}: {exc}") from None
    if done.returncode != 0:
        raise KernelFetchError(f"{' '.join(cmd[:2])} … exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def newest_release(state: Path) -> str:
    """``7.3.4+deb13-amd64``: the release the backports ``linux-image-amd64`` depends on."""
    for sub in ("lists/partial", "cache", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(SOURCE + "\n")
    _run(["apt-get", "-qq", *_apt(state), "update"])
    shown = _run(["apt-cache", *_apt(state), "show", META])
    found = re.findall(r"linux-image-(\d+\.\d+[^\s,()]*-amd64) \(", shown)
    if not found:
        raise KernelFetchError(f"no kernel named in {META}'s dependencies: {shown[:400]}")
    return max(found, key=lambda r: [int(x) for x in re.findall(r"\d+", r)[:3]])


def backports_kernel() -> Path:
    """The vmlinuz of the newest backports kernel, fetched and unpacked once (cached)."""
    state = CACHE / "apt"
    release = newest_release(state)
    root = CACHE / release
    image = root / "boot" / f"vmlinuz-{release}"
    if image.exists() and (root / "lib/modules" / release / "modules.dep").exists():
        return image
    shutil.rmtree(root, ignore_errors=True)
    fetch = state / "debs" / release
    fetch.mkdir(parents=True, exist_ok=True)
    names = [f"linux-{part}-{release}" for part in ("image", "binary", "modules")]
    known = [n for n in names
             if subprocess.run(["apt-cache", *_apt(state), "show", n], capture_output=True,
                               stdin=subprocess.DEVNULL).returncode == 0]
    _run(["apt-get", "-qq", *_apt(state), "download", *known], cwd=fetch)
    tmp = CACHE / f".{release}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in sorted(fetch.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if not (tmp / "lib").exists() and (tmp / "usr/lib/modules").is_dir():
        (tmp / "lib").symlink_to("usr/lib")  # merged /usr: virtme-ng looks in lib/modules
    vmlinuz = next((p for p in (tmp / "boot" / f"vmlinuz-{release}",
                                tmp / "lib/modules" / release / "vmlinuz") if p.exists()), None)
    if vmlinuz is None:
        raise KernelFetchError(f"no vmlinuz in {', '.join(known)}")
    (tmp / "boot").mkdir(exist_ok=True)
    if vmlinuz != tmp / "boot" / f"vmlinuz-{release}":
        (tmp / "boot" / f"vmlinuz-{release}").symlink_to(
            os.path.relpath(vmlinuz, tmp / "boot"))
    _run(["depmod", "-b", str(tmp), release])
    tmp.rename(root)
    shutil.rmtree(fetch, ignore_errors=True)
    return image


if __name__ == "__main__":  # by hand: fetch it and print its path
    print(backports_kernel())
