"""Plain-text rendering of the stats that library calls return: tables and key/value summaries, and the
library warnings a command prints itself, after them."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


@contextlib.contextmanager
def held_back(logger: str, marked: str) -> Iterator[None]:
    """Drop the records of `logger` whose `marked` attribute is true (`extra={marked: True}`): warnings that are
    also in the returned stats, which the command prints once, after its tables."""
    def keep(record: logging.LogRecord) -> bool:
        return not getattr(record, marked, False)

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_cell, value))
    return str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def summary(title: str, stats: Mapping[str, Any]) -> str:
    """A titled key/value block; nested mappings (a manifest's provenance and build stats) are indented
    one level per depth."""
    def block(mapping: Mapping[str, Any], indent: str) -> list[str]:
        lines = []
        for key, value in mapping.items():
            if isinstance(value, Mapping) and value:
                lines += [f"{indent}{key}:", *block(value, indent + "  ")]
            else:
                lines.append(f"{indent}{key}: {_cell(value)}")
        return lines

    return "\n".join([title, *block(stats, "  ")])
