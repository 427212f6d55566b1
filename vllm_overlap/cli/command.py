"""The one command type: every command module of ``cli/`` defines ``COMMAND``, and the
dispatcher (``cli/dispatch.py``) loops over them (as vLLM's ``CLISubcommand`` does)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


@dataclass(frozen=True)
class Command:
    name: str  # the subcommand: ``vllm-overlap <name>``
    help: str
    run: Callable[[argparse.Namespace], int]  # the exit status
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
