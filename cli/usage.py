"""Usage errors, one rule for every subcommand: a flag that conflicts with another or needs another, a number
out of range and an output name the command cannot write are bad usage, exit 2, printed as argparse prints
its own (`cmcaug preview: error: ...`); exit 3 stays for input files that are wrong.

A subcommand checks its flags before any work and raises `UsageError`, which `cmcaug.cli.main` turns into
that line and exit code 2; `number` makes an argparse type from a `Rule`, so `--rows 0` is refused by
argparse itself with the rule's words (`argument --rows: must be >= 1, got 0`), as `build-bank` refuses
`--patch-size 4`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cmcaug.builder.options import Rule


class UsageError(Exception):
    """Flags that cannot be used together or as given; the message names them and says what to do."""


def number(kind: type[int] | type[float], low: float | None = None, high: float | None = None, *,
           above: bool = False) -> Callable[[str], Any]:
    """An argparse `type`: the text as `kind`, at least `low` (more than `low` with `above`), at most `high`."""
    rule = Rule(kind, low, high, above)

    def parse(text: str) -> Any:
        try:
            return rule.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
