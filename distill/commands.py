"""Subcommand registration for this package (argparse only; work is imported when a command runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``dinoforge`` parser."""
