"""Run benchmarks by name (`make bench`, `cmcaug bench`): all of them by default, where the GPU kernel
benchmarks are skipped with a note when there is no CUDA device (their --smoke runs need none).

    python -m cmcaug.benchmarks.run_all [NAME ...] [--smoke] [--out DIR]
"""
from __future__ import annotations

import argparse
import ast
import importlib
import sys
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from . import common

CPU_BENCHMARKS = ("grounding", "build", "transform", "tag_memory")
GPU_BENCHMARKS = ("splice", "image_mix")
BENCHMARKS = CPU_BENCHMARKS + GPU_BENCHMARKS  # NAME runs the module bench_<NAME>


def describe(name: str) -> str:
    """What benchmark `name` measures: its docstring's first paragraph, read without importing it (and torch)."""
    source = resources.files(__package__).joinpath(f"bench_{name}.py").read_text(encoding="utf-8")
    return common.summary(ast.get_docstring(ast.parse(source)) or "")


def check_names(names: Sequence[str]) -> None:
    """Raise ValueError naming the unknown benchmarks among `names`, and the known ones."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(map(repr, unknown))} (choose from {', '.join(BENCHMARKS)})")


def run(names: Sequence[str] = (), *, smoke: bool = False, out: Path | None = None, extra: Sequence[str] = ()) -> int:
    """Run the named benchmarks in turn, each with `--smoke`, `--out` and `extra` as its arguments; 1 when any
    failed, else 0. A failure (an exception, a non-zero return or a rejected argument) does not stop the others."""
    check_names(names)
    skipped: tuple[str, ...] = ()
    if not names:
        import torch

        names, skipped = (BENCHMARKS, ()) if smoke or torch.cuda.is_available() else (CPU_BENCHMARKS, GPU_BENCHMARKS)
    argv = ["--smoke"] * smoke + (["--out", str(out)] if out is not None else []) + list(extra)
    failed = []
    for name in names:
        print(f"\n=== bench_{name} {' '.join(argv)} ===", flush=True)
        try:
            code = importlib.import_module(f".bench_{name}", __package__).main(argv)
        except SystemExit as exc:  # its argument parser: --help (0) or an argument it does not take (2)
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception:  # report and go on: one broken benchmark should not hide the others' numbers
            traceback.print_exc()
            code = 1
        if code != 0:
            failed.append(name)
    if skipped:
        print(f"\nno CUDA device: skipped {', '.join(skipped)} (run them on a GPU machine, or with --smoke)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path, not numbers")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results folder (default: each benchmark's, see its --help)")
    args = parser.parse_args(argv)
    try:
        check_names(args.names)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args.names, smoke=args.smoke, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
