"""The ``fastdistill`` command (also ``python -m fastdistill``).

Subcommands are registered with :func:`register_command`: a name, a help line, a function that
adds the subcommand's arguments to its parser, and a function that runs it and returns the exit
code. ``main`` builds the parser from the registry, so a new subcommand (e.g. ``report RUN_DIR``)
is one ``register_command`` call and touches nothing else.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> Command:
    """Add a subcommand ``fastdistill NAME``; ``run(args)`` returns the process exit code."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    command = Command(name, help, add_arguments, run)
    COMMANDS[name] = command
    return command


# ---- env ------------------------------------------------------------------------------------


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _env_run(args: argparse.Namespace) -> int:
    # Imported here so `fastdistill --help` stays instant (env imports torch).
    from fastdistill.env import collect_env, format_env

    report = collect_env()
    print(json.dumps(report, indent=2) if args.json else format_env(report))
    return 0


register_command(
    "env",
    "show versions, the compiled core and the backend each op uses (paste into bug reports)",
    _env_arguments,
    _env_run,
)


# ---- report (runs of fastdistill-train) ------------------------------------------------------

from fastdistill.train import cli as _train_cli  # noqa: E402  (argparse only; torch is already in)

register_command(
    "report", _train_cli.REPORT_HELP, _train_cli.report_arguments, _train_cli.report_run
)


# ---- entry point ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdistill", description="fastdistill: fused knowledge-distillation losses."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastdistill`` command line; returns the exit code (2 for a usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
