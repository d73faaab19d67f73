"""``/etc/pinwarden/pinwarden.toml``: the operator's settings.

Example (every key optional)::

    [partition]
    mode = "auto"          # auto | isolcpus | cgroup | none
    host_reserve = "0"     # none mode: CPUs kept for the OS; default: the first physical core
    cgroup = "machine"     # cgroup-v1 VM partition; v2 default "machine.slice"
    exclusive = "pinwarden.partition"  # holder groups: pinwarden-vm-NAME.partition …

    [ledger]
    state_dir = "/var/lib/pinwarden"

    [libvirt]
    uri = "qemu:///system"

Every key with its default and what overrides it: :data:`SETTINGS`, the commented sample
``contrib/pinwarden.toml``, and ``pinwarden config`` (effective values and their sources).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Literal, TextIO, cast

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.errors import InputError
from pinwarden.record import record

DEFAULT_CONFIG = Path("/etc/pinwarden/pinwarden.toml")
DEFAULT_STATE_DIR = Path("/var/lib/pinwarden")

ModeSetting = Literal["auto", "isolcpus", "cgroup", "none"]


@record
class Config:
    """The settings (:data:`SETTINGS` says where each comes from)."""

    mode: ModeSetting = "auto"
    host_reserve: CpuSet | None = None  # None: the first physical core
    cgroup_v1: str = "machine"
    cgroup_v2: str = "machine.slice"
    exclusive_cgroup: str = "pinwarden.partition"  # tree holding every leased CPU
    state_dir: Path = DEFAULT_STATE_DIR
    libvirt_uri: str = "qemu:///system"
    isolate_noise: bool = True  # steer IRQs, unbound work and kthreads off leased CPUs


@record
class Setting:
    """One configuration key: its ``Config`` field, where it lives in the file and what may
    override it (for ``pinwarden config``, the sample config and the docs).

    Precedence, highest first: the command-line ``option``, the environment variable
    ``env``, the file's ``[section] key``, the default (``Config()``'s field, or
    ``default_text`` where the default is decided at run time).
    """

    field: str
    section: str
    key: str
    help: str
    env: str | None = None
    option: str | None = None
    default_text: str | None = None


#: Every setting, in the order ``pinwarden config`` and the sample config list them. A new
#: key is one row here (plus its parsing in :func:`parse_config`).
SETTINGS: tuple[Setting, ...] = (
    Setting("mode", "partition", "mode",
            "how CPUs are split between VMs and the host: auto, isolcpus, cgroup or none"),
    Setting("host_reserve", "partition", "host_reserve",
            "none mode: CPUs kept for the OS", default_text="the first physical core"),
    Setting("cgroup_v1", "partition", "cgroup", "cgroup v1 VM partition (libvirt's)"),
    Setting("cgroup_v2", "partition", "cgroup_v2", "cgroup v2 VM partition (libvirt's)"),
    Setting("exclusive_cgroup", "partition", "exclusive",
            "name the holder cgroups start with, beside the VM partition: "
            "pinwarden.partition gives pinwarden-vm-NAME.partition (libvirt partition "
            "/pinwarden-vm-NAME; systemd slice pinwarden\\x2dvm\\x2dNAME.slice)"),
    Setting("state_dir", "ledger", "state_dir", "directory of the lease database",
            env="PINWARDEN_STATE_DIR", option="--state-dir"),
    Setting("libvirt_uri", "libvirt", "uri", "libvirt connection URI",
            env="LIBVIRT_DEFAULT_URI", option="--connect"),
    Setting("isolate_noise", "isolation", "noise",
            "while CPUs are leased, move IRQs, unbound kernel work and movable kernel "
            "threads off them (put back when the last lease goes): true or false"),
)


def known_keys() -> dict[str, set[str]]:
    """``{section: {key, …}}`` of :data:`SETTINGS`."""
    known: dict[str, set[str]] = {}
    for setting in SETTINGS:
        known.setdefault(setting.section, set()).add(setting.key)
    return known


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InputError(f"{path}: [{name}] must be a table")
    return cast(dict[str, Any], value)


def _str(table: dict[str, Any], key: str, default: str, path: Path) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise InputError(f"{path}: {key} must be a string, not {type(value).__name__}")
    if "\x00" in value:  # TOML's \u0000: no path, cgroup or URI holds one
        raise InputError(f"{path}: {key} holds a NUL character (\\u0000); remove it")
    return value


def _nonempty(table: dict[str, Any], key: str, default: str, path: Path) -> str:
    value = _str(table, key, default, path)
    if not value.strip():
        raise InputError(f"{path}: {key} is empty: give a directory, or remove the setting "
                         f"for the default {default}")
    return value


def _absolute(table: dict[str, Any], key: str, default: str, path: Path) -> Path:
    """A directory setting: an absolute path (a relative one named another directory for
    each working directory — the hook's, the daemon's, the operator's: several ledgers)."""
    value = Path(_nonempty(table, key, default, path))
    if not value.is_absolute():
        raise InputError(f"{path}: {key} must be an absolute path, not {str(value)!r} (a "
                         f"relative one names another directory for each command's "
                         f"working directory)")
    return value


def _bool(table: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"{path}: {key} must be true or false, not {type(value).__name__}")
    return value


def parse_config(text: str, path: Path = DEFAULT_CONFIG) -> Config:
    import tomllib  # here: most hosts have no configuration file, and it is slow to load

    # a byte order mark some editors write first is no statement (tomllib: "Invalid
    # statement (at line 1, column 1)", on a file that looked right: hunt)
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # the line itself, where the parser's words alone do not say what is wrong
        # ("Cannot overwrite a value": a setting given twice)
        import re

        at = re.search(r"at line (\d+)", str(exc))
        lines = text.splitlines()
        lineno = int(at[1]) if at else 0
        shown = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
        twice = " (a setting given twice?)" if "overwrite" in str(exc) else ""
        raise InputError(f"{path}: {exc}{twice}" +
                         (f": {shown[:80]!r}" if shown else "")) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise InputError(f"{path}: values nested too deeply to be a pinwarden "
                         "configuration") from None
    part = _table(data, "partition", path)
    ledger = _table(data, "ledger", path)
    virt = _table(data, "libvirt", path)
    isolation = _table(data, "isolation", path)
    known = known_keys()
    for section, keys in known.items():
        for key in _table(data, section, path):
            if key not in keys:
                raise InputError(f"{path}: unknown setting [{section}] {key}")
    for section, value in data.items():
        if section in known:
            continue
        if isinstance(value, dict):
            raise InputError(f"{path}: unknown section [{section}]")
        homes = [f"[{name}]" for name, keys in known.items() if section in keys]
        raise InputError(f"{path}: setting {section} is outside any section"
                         + (f": put it under {' or '.join(homes)}" if homes else
                            f" and no section has it (sections: "
                            f"{', '.join(f'[{name}]' for name in known)})"))
    mode = _str(part, "mode", "auto", path)
    if mode not in ("auto", "isolcpus", "cgroup", "none"):
        raise InputError(f"{path}: partition.mode must be auto, isolcpus, cgroup or none, "
                         f"not {mode!r}")
    reserve_text = part.get("host_reserve")
    reserve: CpuSet | None = None
    if reserve_text is not None:
        if not isinstance(reserve_text, str):
            raise InputError(f"{path}: host_reserve must be a CPU list string like \"0-1\"")
        try:
            reserve = CpuSet.parse(reserve_text)
        except CpuSetError as exc:
            raise InputError(f"{path}: [partition] host_reserve: {exc.message}",
                             code=exc.code) from None
    config = Config(
        mode=cast(ModeSetting, mode),
        host_reserve=reserve,
        cgroup_v1=_str(part, "cgroup", "machine", path).strip("/"),
        cgroup_v2=_str(part, "cgroup_v2", "machine.slice", path).strip("/"),
        exclusive_cgroup=_str(part, "exclusive", "pinwarden.partition", path).strip("/"),
        state_dir=_absolute(ledger, "state_dir", str(DEFAULT_STATE_DIR), path),
        libvirt_uri=_str(virt, "uri", "qemu:///system", path),
        isolate_noise=_bool(isolation, "noise", True, path),
    )
    from pinwarden.enforce.names import LayoutNames

    for shared in (config.cgroup_v1, config.cgroup_v2):
        try:
            LayoutNames(shared=shared, exclusive=config.exclusive_cgroup)
        except ValueError as exc:
            raise InputError(f"{path}: [partition] {exc}") from None
    return config


#: The most characters of a configuration file read (``--config /dev/zero`` grew without
#: end).
MAX_CONFIG_BYTES = 1 << 20


def _open_text(path: Path) -> TextIO:
    """``path`` opened for reading as UTF-8 text, without waiting for a writer: a named
    pipe nobody writes to reads as empty (its open waited forever, and with it every hook
    call — every 'virsh start': CLI hunt); one somebody writes to (``--config <(…)``) is
    read as it comes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)  # reads wait for data again
        return open(fd, encoding="utf-8")  # (the caller closes it)
    except BaseException:
        os.close(fd)
        raise


def load_config(path: Path | None) -> Config:
    """Read the config file; a missing default file means all defaults."""
    text = read_config_text(path)
    return Config() if text is None else parse_config(text, path or DEFAULT_CONFIG)


def read_config_text(path: Path | None) -> str | None:
    """The text of the config file ``path`` (None: the default one), read once — a named
    pipe (``--config <(…)``) cannot be read twice; None when the default file does not
    exist.  A file that cannot be read as a configuration is refused (:class:`InputError`)."""
    explicit = path is not None
    target = path if path is not None else DEFAULT_CONFIG
    try:
        with _open_text(target) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise InputError(f"config file {target} is larger than the {MAX_CONFIG_BYTES} "
                             f"characters accepted: is it the configuration file?")
    except UnicodeDecodeError as exc:
        raise InputError(f"config file {target} is not UTF-8 text (byte {exc.start}); TOML "
                         f"files are UTF-8") from None
    except FileNotFoundError:
        if explicit:
            raise InputError(f"config file {target} does not exist") from None
        return None
    except OSError as exc:
        raise InputError(f"cannot read config file {target}: {exc.strerror}") from None
    return text


def state_dir(cli_value: Path | None, config: Config) -> Path:
    """``--state-dir`` beats ``PINWARDEN_STATE_DIR`` beats the config file.  A relative
    option or variable names a directory below the current one, made absolute here: the
    hook script, the daemon and libvirt's hook calls use it from elsewhere (a relative
    ``state_dir`` in the file is refused: it is relative to nothing)."""
    env = os.environ.get("PINWARDEN_STATE_DIR")
    return state_dir_from(None if cli_value is None else Path(os.path.abspath(cli_value)),
                          os.path.abspath(env) if env else None, config)


def state_dir_from(cli_value: Path | None, env: str | None, config: Config) -> Path:
    """:func:`state_dir` with ``env`` for the environment variable (the daemon resolves
    a command's: :func:`pinwarden.libvirt.startserver.resolve`)."""
    if cli_value is not None:
        return cli_value
    if env:
        return Path(env)
    return config.state_dir


def libvirt_uri(cli_value: str | None, config: Config) -> str:
    """``--connect`` beats ``LIBVIRT_DEFAULT_URI`` beats the config file beats
    ``qemu:///system`` (virsh: ``-c`` beats ``LIBVIRT_DEFAULT_URI`` beats libvirt.conf's
    ``uri_default``; an empty variable counts as unset, as in libvirt)."""
    return libvirt_uri_from(cli_value, os.environ.get("LIBVIRT_DEFAULT_URI"), config)


def libvirt_uri_from(cli_value: str | None, env: str | None, config: Config) -> str:
    """:func:`libvirt_uri` with ``env`` for the environment variable."""
    if cli_value:
        return cli_value
    if env:
        return env
    return config.libvirt_uri
