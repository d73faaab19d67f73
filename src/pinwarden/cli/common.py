"""Helpers shared by command modules: loading the host snapshot, the ledger, output."""

from __future__ import annotations

import argparse
from pathlib import Path

from pinwarden.config import Config, load_config, state_dir


def config_of(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def root_of(args: argparse.Namespace) -> Path:
    return Path(args.root)


def state_dir_of(args: argparse.Namespace) -> Path:
    return state_dir(Path(args.state_dir) if args.state_dir else None, config_of(args))
