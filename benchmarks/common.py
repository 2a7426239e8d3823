"""Shared benchmark plumbing: device naming, timing, copy bandwidth, tables, JSON results, plots.

GPU timings use `triton.testing.do_bench` (median); CPU timings use `cpu_time_ms` (median of repeats).
Bandwidth convention: an op's `bytes` counts every byte it reads plus every byte it writes, and
`copy_bandwidth_gbs(nbytes)` times a device-to-device copy that also reads + writes `nbytes` in all,
so `gbs / copy_gbs` is the fraction of the device's achievable bandwidth.

Results go to the folder given by `--out` (every benchmark's parser comes from `argument_parser`), by
default ./cmcaug-bench-results under the working directory, wherever the package is installed: the
committed results in a checkout's benchmarks/results are written only when `--out` names that folder. torch is imported inside the functions that use it, so that
bench_grounding can set its thread variables before torch loads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (float sums then do not depend on the core count), restoring the count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_results_dir() -> Path:
    """./cmcaug-bench-results: where the user is, never the installed package's or checkout's own folders."""
    return Path.cwd() / "cmcaug-bench-results"


def summary(doc: str) -> str:
    """The first paragraph of a benchmark's docstring, on one line: what it measures."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring as the description, and the `--out` option every benchmark shares."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_results_dir(), metavar="DIR",
                        help="folder for the JSON results and plots (default: ./cmcaug-bench-results; "
                        "here %(default)s)")
    return parser


def grounding_eval_set() -> list[dict[str, Any]]:
    """The labelled caption set shipped in cmcaug/data/grounding_eval.jsonl (see tests/test_grounding.py)."""
    text = resources.files("cmcaug").joinpath("data/grounding_eval.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def device_name(device: torch.device | str = "cuda") -> str:
    """The GPU's name for CUDA devices, else the CPU model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """A file-name-safe lowercase form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_time_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` on the GPU (triton.testing.do_bench flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def cpu_time_ms(fn: Callable[[], Any], repeat: int = 7, min_seconds: float = 0.2) -> float:
    """Median milliseconds of one call of `fn` on the CPU, each repeat looping for at least `min_seconds`."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        times.append(elapsed / calls * 1e3)
    return statistics.median(times)


def wall_times(fn: Callable[[], Any], repeats: int, warmup: bool = False) -> list[float]:
    """Seconds of each of `repeats` whole calls of `fn` (optionally after one warm-up call): for jobs too long
    to loop, such as a whole build or a corpus pass; report the best (least disturbed) and the median."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth_gbs(
    nbytes: int, device: torch.device | str = "cuda", time_ms: Callable[[Callable[[], Any]], float] | None = None,
) -> float:
    """GB/s of a same-device copy that reads and writes `nbytes` in all (a buffer of nbytes/2).

    Timed with `time_ms` (default: `gpu_time_ms` on CUDA, `cpu_time_ms` elsewhere), so pass the timer the
    providers use and the ratio compares like with like.
    """
    import torch

    device = torch.device(device)
    time_ms = time_ms or (gpu_time_ms if device.type == "cuda" else cpu_time_ms)
    n = max(nbytes // 2, 1)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbs(2 * n, time_ms(lambda: dst.copy_(src)))


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """Print rows as an aligned table of the given columns."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(v.rjust(w) for v, w in zip(b, widths)))


def write_results(name: str, payload: Mapping[str, Any], *, out: Path, device: str | None = None) -> Path:
    """Write `payload` to <out>/<name>-<device slug>.json (or <name>.json) and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}-{slug(device)}.json" if device else f"{name}.json")
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {path}")
    return path


def plot_rows(
    rows: Iterable[Mapping[str, Any]], x: str, y: str, series: Sequence[str], path: Path, title: str,
    xlabel: str | None = None, ylabel: str | None = None, hline: float | None = None,
) -> Path | None:
    """Line plot of `y` against `x`, one line per distinct combination of the `series` keys; PNG at `path`.

    Without matplotlib (the GPU machines' image lacks it) the plot is skipped with a note and None returned:
    the JSON, written first, is the result.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipped the plot {path.name}", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[Any, Any]]] = {}
    for r in rows:
        label = " ".join(str(r[k]) for k in series)
        lines.setdefault(label, []).append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label="copy bandwidth")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
