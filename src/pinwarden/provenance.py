"""The effective configuration and where each value came from (``pinwarden config``).

Driven by :data:`pinwarden.config.SETTINGS`: for every setting the source is, highest first,
its command-line option, its environment variable, the configuration file's
``[section] key``, or the default — the same precedence :func:`pinwarden.config.state_dir`
and :func:`pinwarden.config.libvirt_uri` apply for the commands.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pinwarden.config import (
    DEFAULT_CONFIG,
    SETTINGS,
    Config,
    Setting,
    parse_config,
    read_config_text,
)
from pinwarden.cpuset import CpuSet
from pinwarden.record import record

SourceKind = Literal["option", "env", "file", "default"]


@record
class Source:
    kind: SourceKind
    #: ``--state-dir``, ``PINWARDEN_STATE_DIR``, ``/etc/pinwarden/pinwarden.toml [ledger]
    #: state_dir``; None for a default.
    detail: str | None = None

    def __str__(self) -> str:
        words = {"option": "command-line option", "env": "environment variable",
                 "file": "config file", "default": "default"}
        return words[self.kind] if self.detail is None else f"{words[self.kind]} {self.detail}"


@record
class Value:
    setting: Setting
    value: Any  # str, Path, CpuSet, or None (a default decided at run time)
    default: Any
    source: Source


@record
class Effective:
    config_file: Path
    config_given: bool  # --config named it (else the default location)
    config_exists: bool
    values: tuple[Value, ...]

    def get(self, field: str) -> Any:
        for item in self.values:
            if item.setting.field == field:
                return item.value
        raise KeyError(field)


def _keys_in(text: str) -> set[tuple[str, str]]:
    """``(section, key)`` pairs a file's text sets (validated by :func:`parse_config`)."""
    try:  # (a byte order mark read past, as parse_config reads past it)
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except ValueError:  # (TOMLDecodeError is one)
        return set()
    return {(section, key) for section, table in data.items() if isinstance(table, dict)
            for key in table}


def _convert(default: Any, text: str) -> Any:
    """An option's or variable's text as the type of the setting's default (a path made
    absolute, as :func:`pinwarden.config.state_dir` makes it)."""
    if isinstance(default, Path):
        return Path(os.path.abspath(text))
    if isinstance(default, CpuSet):
        return CpuSet.parse(text)
    return text


def resolve(config_path: Path | None, options: Mapping[str, str | None],
            environ: Mapping[str, str]) -> Effective:
    """The effective settings.  ``options`` maps option names (``--state-dir``) to the values
    given on the command line (None: not given); ``environ`` is the environment."""
    target = config_path if config_path is not None else DEFAULT_CONFIG
    # read once: a named pipe (--config <(…)) reads as empty the second time, and every
    # value it set was shown as the default (CLI hunt)
    text = read_config_text(config_path)  # refuses a bad file with a one-line error
    config = Config() if text is None else parse_config(text, target)
    exists = text is not None
    in_file = _keys_in(text) if text is not None else set()
    defaults = Config()
    values = []
    for setting in SETTINGS:
        default = getattr(defaults, setting.field)
        given = options.get(setting.option) if setting.option else None
        env = environ.get(setting.env) if setting.env else None
        if given:
            value, source = _convert(default, given), Source("option", setting.option)
        elif env:
            value, source = _convert(default, env), Source("env", setting.env)
        elif (setting.section, setting.key) in in_file:
            value = getattr(config, setting.field)
            source = Source("file", f"{target} [{setting.section}] {setting.key}")
        else:
            value, source = default, Source("default")
        values.append(Value(setting, value, default, source))
    return Effective(target, config_path is not None, exists, tuple(values))


def _text(value: Any) -> str:
    """A value as the configuration file spells it: a boolean ``true`` or ``false`` (as
    Python's ``True``, copied into the file it was refused: CLI hunt)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def shown(value: Any, setting: Setting) -> str:
    """A value for people: lists and paths as text, a run-time default in words."""
    if value is None:
        return f"({setting.default_text})" if setting.default_text else "-"
    return _text(value)


def to_json(effective: Effective) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return None if value is None else _text(value)

    return {
        "config_file": {"path": str(effective.config_file),
                        "source": "option --config" if effective.config_given else "default",
                        "exists": effective.config_exists},
        "settings": [{
            "section": v.setting.section,
            "key": v.setting.key,
            "value": plain(v.value),
            "default": plain(v.default),
            "default_text": v.setting.default_text,
            "source": v.source.kind,
            "from": v.source.detail,
            "env": v.setting.env,
            "option": v.setting.option,
            "help": v.setting.help,
        } for v in effective.values],
    }


def render(effective: Effective) -> str:
    if effective.config_given:
        where = "given with --config"
    elif effective.config_exists:
        where = "the default location"
    else:
        where = "the default location, absent: every setting not overridden has its default"
    lines = [f"config file {effective.config_file} ({where})"]
    rows = [(f"[{v.setting.section}] {v.setting.key}", shown(v.value, v.setting), str(v.source))
            for v in effective.values]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, value, source in rows:
        lines.append(f"  {name:<{widths[0]}}  {value:<{widths[1]}}  {source}")
    overridable = [v.setting for v in effective.values if v.setting.env or v.setting.option]
    lines.append("precedence: command-line option > environment variable > config file > "
                 "default (" + "; ".join(
                     f"{s.key}: {' > '.join(x for x in (s.option, s.env) if x)}"
                     for s in overridable) + ")")
    return "\n".join(lines)
