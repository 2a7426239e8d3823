"""`cmcaug bench [NAME ...]`: run the project's benchmarks (cmcaug.benchmarks) from an installed copy too."""
from __future__ import annotations

import argparse
from pathlib import Path

from .usage import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (kernels, grounding, bank build, transform) and write JSON results",
        usage="cmcaug bench [--smoke] [--out DIR] [--list] [NAME ...] [-- ARG ...]",
        description="Run the named benchmarks (grounding, build, transform, splice, image_mix), or all of them: "
        "each prints a table and writes JSON (and plots, with matplotlib) into --out. Without NAME and without "
        "a CUDA device the GPU kernel benchmarks (splice, image_mix) are skipped with a note; named, they fail "
        "there unless --smoke. --list says what each one measures. Exit code 1 when a benchmark fails.",
        epilog="ARGs after -- go to every named benchmark (e.g. `cmcaug bench build -- --workers 4`; "
        "`cmcaug bench splice -- --help` lists a benchmark's own options); put cmcaug bench's options before "
        "NAME when you use --.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks every code path, not numbers")
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for the results (default: ./cmcaug-bench-results; "
                        "the committed results of a checkout: --out benchmarks/results)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and what each measures, run nothing")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cmcaug.benchmarks import run_all

    from .render import table

    # argparse drops "--" and appends what follows to NAME: the benchmarks' own arguments start at the first option.
    first = next((i for i, value in enumerate(args.names) if value.startswith("-")), len(args.names))
    names, extra = args.names[:first], args.names[first:]
    try:
        run_all.check_names(names)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.list and (args.smoke or args.out is not None or extra):
        raise UsageError("--list runs nothing, so it takes no --smoke, --out or benchmark arguments")
    if args.list:
        gpu = set(run_all.GPU_BENCHMARKS)
        rows = [(name, "CUDA" if name in gpu else "CPU", run_all.describe(name)) for name in names or run_all.BENCHMARKS]
        print(table(rows, ["name", "device", "measures"]))
        return 0
    return run_all.run(names, smoke=args.smoke, out=args.out, extra=extra)
