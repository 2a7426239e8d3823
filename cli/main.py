"""`cmcaug` entry point: parses arguments, hands each subcommand to its module, maps errors to exit codes.

Exit codes: 0 success, 1 unexpected internal error, 2 bad usage (argparse's own errors, and flags that
conflict, need another flag or name an output the command cannot write: `cmcaug.cli.usage.UsageError`),
3 bad input (`InputError`), 4 malformed bank (`BankFormatError`), 5 missing optional dependency
(`MissingDependencyError`), 6 the bank folder is being written by another process (`BankLockedError`),
7 the file system refused a write: disk full, quota, file too large, permissions, I/O error
(`StorageError`), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from cmcaug import __version__
from cmcaug.errors import BankFormatError, BankLockedError, CMCAugError, InputError, MissingDependencyError, StorageError

from .usage import UsageError

# Each module defines register(subparsers) -> None and run(args) -> int.
COMMANDS = ("synth", "build_bank", "inspect_bank", "tag_text", "preview", "bench")

EXIT_CODES = {InputError: 3, BankFormatError: 4, MissingDependencyError: 5, BankLockedError: 6, StorageError: 7}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmcaug", description="Mix-based augmentation for vision-language pre-training.")
    parser.add_argument("--version", action="version", version=f"cmcaug {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cmcaug.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"cmcaug {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CMCAugError as exc:
        print(f"cmcaug {args.command}: error: {exc}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except KeyboardInterrupt:
        print(f"cmcaug {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cmcaug ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keep Python's exit flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
