"""The ``pbs2pc`` command line: one argparse subcommand per stage, each a thin adapter over the Python API.

Exit codes: 0 success; 2 bad input or a missing tool (one line on stderr, no traceback; argparse's usage
errors also exit 2); 130 interrupted. Anything else is a bug and shows its traceback (exit 1).

Every command lives in ``pbs2pc/commands/<name>.py`` with ``add_parser(subparsers) -> parser`` and
``run(args) -> int``.
Heavy imports (torch, TVM) happen inside ``run``, so ``pbs2pc --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pbs2pc import __version__
from pbs2pc.errors import EXIT_USER_ERROR, Pbs2pcError

#: Subcommands in the order of the pipeline (the order ``--help`` lists them).
COMMANDS = ("demo", "compress", "eval", "export", "tune", "compile", "run", "inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbs2pc",
        description="Compile LLMs compressed with PBS2P (N:M sparse + binary weights) into shared libraries.",
        epilog="Pipeline: compress MODEL -> export DIR -> compile model.onnx -> run model.so",
    )
    parser.add_argument("--version", action="version", version=f"pbs2pc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"pbs2pc.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Pbs2pcError as exc:
        print(f"pbs2pc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"pbs2pc {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`pbs2pc run ... | head`): stop quietly, as Unix tools do. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
