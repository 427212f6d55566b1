"""``vllm-overlap``: one subcommand per command module (``doctor``, ``diff``, ``compat``,
``prove``, ``calibrate``, ``config``), each a :class:`~vllm_overlap.cli.command.Command`."""

from __future__ import annotations

import argparse
import sys

from vllm_overlap.cli import calibrate, compat, config_samples, diff, doctor, prove

COMMANDS = (doctor.COMMAND, diff.COMMAND, compat.COMMAND, prove.COMMAND, calibrate.COMMAND, config_samples.COMMAND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-overlap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.arguments(sub.add_parser(command.name, help=command.help))
    args = parser.parse_args(argv)
    run = {command.name: command.run for command in COMMANDS}[args.command]
    from vllm_overlap.config.loader import ConfigError

    try:
        return run(args)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
