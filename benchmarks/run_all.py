"""`make bench`: every benchmark in turn; the GPU kernel benchmarks are skipped (with a note) without CUDA."""
from __future__ import annotations

import importlib
import sys

import torch

CPU_BENCHMARKS = ("bench_grounding", "bench_build", "bench_transform")
GPU_BENCHMARKS = ("bench_splice", "bench_image_mix")


def main() -> int:
    failed = []
    names = CPU_BENCHMARKS + (GPU_BENCHMARKS if torch.cuda.is_available() else ())
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        if importlib.import_module(f"benchmarks.{name}").main([]) != 0:
            failed.append(name)
    if not torch.cuda.is_available():
        print(f"\nno CUDA device: skipped {', '.join(GPU_BENCHMARKS)} (run them on a GPU machine)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
