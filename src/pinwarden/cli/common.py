"""Helpers shared by command modules: the configuration, the host root, the lease manager."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pinwarden.config import Config, load_config, state_dir

if TYPE_CHECKING:
    from pinwarden.manager import Manager


def config_of(args: argparse.Namespace) -> Config:
    cached = getattr(args, "_config", None)
    if isinstance(cached, Config):
        return cached
    config = load_config(Path(args.config) if args.config else None)
    args._config = config
    return config


def root_of(args: argparse.Namespace) -> Path:
    return Path(args.root)


def state_dir_of(args: argparse.Namespace) -> Path:
    return state_dir(Path(args.state_dir) if args.state_dir else None, config_of(args))


def manager_of(args: argparse.Namespace) -> Manager:
    """The lease manager of this command (close it: ``with manager_of(args) as m``)."""
    from pinwarden.manager import Manager

    return Manager(config_of(args), root_of(args), state_dir_of(args), warn=_warn)


def _warn(message: str) -> None:
    print(f"pinwarden: warning: {message}", file=sys.stderr)
