"""Benchmark the fused CMC splice against eager PyTorch, torch.compile and a per-sample Python loop.

    cmcaug bench splice [--out DIR] [-- --sizes B,L,D ...]   # needs a CUDA GPU; writes splice-<gpu>.json + .png
    cmcaug bench splice --smoke                             # one small size on the CPU: checks the code path only
    python -m cmcaug.benchmarks.bench_splice [--smoke] [--out DIR]  # the same as a module

Providers: "triton" (`splice`, the fused kernels), "eager" (`splice(backend="reference")`: one gather
from stacked rows, gather-based backward), "compile" (`torch.compile` of the reference forward; autograd
derives its backward) and "loop" (slices and `torch.cat` per sample, then `pad_sequence`: what research
code usually does). Passes: "fwd", "bwd" (autograd.grad of a kept graph) and "fwd+bwd", with inputs that
require grad, as in training. `bytes` is the minimum traffic of the pass (see kernels/splice.py), `gbs`
is bytes / time and `pct_copy` compares it with a device-to-device copy of the same bytes, timed in the
same run.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cmcaug.kernels import reference, splice
from cmcaug.plan import SplicePlan

from . import common

SIZES = [(32, 40, 512), (128, 64, 768), (256, 77, 768), (512, 128, 768), (1024, 128, 1024)]
SMOKE_SIZE = (4, 16, 32)
PROVIDERS = ("triton", "eager", "compile", "loop")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_MB = 64  # the targets apply from this size of a fwd+bwd pass up


def random_batch(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Captions of L/2..L tokens where ~1 token in 8 starts a grounded span of 1-2 tokens ("dog", "hot dog")."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, batch)
    spans = []
    for n in lengths.tolist():
        row, position = [], 0
        for start in np.flatnonzero(rng.random(n) < 0.125).tolist():
            end = min(start + int(rng.integers(1, 3)), n)
            if start >= position:
                row.append((start, end))
                position = end
        spans.append(row)
    return lengths, spans


def loop_splice(text: torch.Tensor, patches: torch.Tensor, segments: list[list[tuple[str, int, int]]]) -> torch.Tensor:
    """The per-sample baseline: cut each caption around its spans, cat in the patches, pad the batch."""
    rows = []
    for b, row in enumerate(segments):
        rows.append(torch.cat([text[b, i:j] if kind == "text" else patches[i] for kind, i, j in row]))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def row_segments(lengths: np.ndarray, spans: list[list[tuple[int, int]]]) -> list[list[tuple[str, int, int]]]:
    """("text", start, end) and ("patch", slot, 0) pieces of every row, for `loop_splice`."""
    segments, slot = [], 0
    for n, row in zip(lengths.tolist(), spans):
        pieces, position = [], 0
        for start, end in row:
            pieces += [("text", position, start), ("patch", slot, 0)]
            slot, position = slot + 1, end
        segments.append(pieces + [("text", position, n)])
    return segments


def pass_bytes(plan: SplicePlan, d: int, element_size: int) -> dict[str, int]:
    """Minimum bytes each pass must move: rows read + rows written + the int32 index map it reads."""
    rows_used = int(plan.attention_mask.sum())  # non-padding output rows
    out_rows = plan.batch_size * plan.output_length
    in_rows = plan.batch_size * plan.text_length + plan.num_slots * plan.patch_tokens
    fwd = (rows_used + out_rows) * d * element_size + 4 * out_rows
    bwd = (rows_used + in_rows) * d * element_size + 4 * in_rows
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def providers(plan: SplicePlan, segments, names: Sequence[str]) -> dict[str, Callable]:
    """provider name -> f(text, patches) returning the spliced embeddings."""
    table = {
        "triton": lambda t, p: splice(t, p, plan, backend="triton").embeds,
        "eager": lambda t, p: splice(t, p, plan, backend="reference").embeds,
        "loop": lambda t, p: loop_splice(t, p, segments),
    }
    if "compile" in names:
        torch._dynamo.reset()  # a fresh compile per size and dtype (static shapes, no recompile limit)
        compiled = torch.compile(reference.splice_forward, dynamic=False)
        table["compile"] = lambda t, p: compiled(t, p, plan.source_index)
    return {name: table[name] for name in names}


def timed_passes(fn: Callable, text: torch.Tensor, patches: torch.Tensor, time_ms: Callable) -> dict[str, float]:
    inputs = (text, patches)
    out = fn(text, patches)
    grad = torch.randn_like(out)
    return {
        "fwd": time_ms(lambda: fn(text, patches)),
        "bwd": time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)),
        "fwd+bwd": time_ms(lambda: torch.autograd.grad(fn(text, patches), inputs, grad)),
    }


def run(sizes, dtypes: Sequence[str], names: Sequence[str], patch_tokens: int, device: torch.device,
        time_ms: Callable, copy_gbs: Callable[[int], float]) -> list[dict]:
    rows = []
    for b, l, d in sizes:
        lengths, spans = random_batch(b, l, seed=b * l)
        base = SplicePlan.build(lengths, spans, patch_tokens=patch_tokens)
        plan = base.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else base
        segments = row_segments(lengths, spans)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            text = torch.randn(b, plan.text_length, d, device=device, dtype=dtype, requires_grad=True)
            patches = torch.randn(plan.num_slots, patch_tokens, d, device=device, dtype=dtype, requires_grad=True)
            nbytes = pass_bytes(plan, d, text.element_size())
            for provider, fn in providers(plan, segments, names).items():
                for name, ms in timed_passes(fn, text, patches, time_ms).items():
                    copy = copy_gbs(nbytes[name])
                    speed = common.gbs(nbytes[name], ms)
                    rows.append({
                        "provider": provider, "pass": name, "dtype": dtype_name, "B": b, "L": l, "D": d,
                        "K": patch_tokens, "L_out": plan.output_length, "bytes": nbytes[name], "ms": ms,
                        "gbs": speed, "copy_gbs": copy, "pct_copy": 100 * speed / copy,
                    })
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per size and dtype, fwd+bwd: Triton's share of copy bandwidth and its speed-up over the others."""
    def key(r: dict) -> tuple:
        return r["dtype"], r["B"], r["L"], r["D"]

    both = [r for r in rows if r["pass"] == "fwd+bwd"]
    summary = []
    for tri in (r for r in both if r["provider"] == "triton"):
        entry = dict(zip(("dtype", "B", "L", "D"), key(tri)), MB=tri["bytes"] / 1e6, triton_pct_copy=tri["pct_copy"])
        for r in both:
            if r["provider"] != "triton" and key(r) == key(tri):
                entry[f"x_vs_{r['provider']}"] = r["ms"] / tri["ms"]
        summary.append(entry)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.argument_parser("bench_splice", __doc__)
    parser.add_argument("--smoke", action="store_true", help="one small size on the CPU (checks the code path)")
    parser.add_argument("--sizes", nargs="+", type=_size, metavar="B,L,D", help="sizes (default: the issue's sweep)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--patch-tokens", type=int, default=4, help="K, tokens per patch (default 4)")
    args = parser.parse_args(argv)
    sizes = args.sizes or SIZES
    if args.smoke:
        from cmcaug.kernels.backend import interpreter_enabled

        device = torch.device("cpu")
        sizes, dtypes = [SMOKE_SIZE], ["fp32"]
        names = [p for p in ("triton", "eager", "loop") if p != "triton" or interpreter_enabled()]
        time_ms = functools.partial(common.cpu_time_ms, repeat=3, min_seconds=0.01)
        name = "splice-smoke"
    else:
        if not torch.cuda.is_available():
            print("bench_splice times CUDA kernels and needs a GPU with a working driver; none was found. "
                  "Run it on a GPU machine, or pass --smoke for a quick CPU check of the code path.", file=sys.stderr)
            return 1
        device, dtypes, names, time_ms = torch.device("cuda"), args.dtypes, args.providers, common.gpu_time_ms
        name = "splice"
    copy_gbs = functools.cache(lambda n: common.copy_bandwidth_gbs(n, device, time_ms))
    rows = run(sizes, dtypes, names, args.patch_tokens, device, time_ms, copy_gbs)
    columns = ["provider", "pass", "dtype", "B", "L", "D", "K", "bytes", "ms", "gbs", "pct_copy"]
    common.print_table(rows, columns, title=f"splice on {common.device_name(device)}")
    summary = summarize(rows)
    if summary:
        common.print_table(summary, list(summary[0]), title=f"fwd+bwd summary (targets from {TARGET_MB} MB: "
                           ">= 85% of copy, >= 5x eager, >= 2x compile)")
    device_label = common.device_name(device)
    peak_copy = max(r["copy_gbs"] for r in rows)
    payload = {"device": device_label, "copy_gbs": peak_copy, "torch": torch.__version__,
               "triton": _triton_version(), "rows": rows, "summary": summary}
    path = common.write_results(name, payload, out=args.out, device=device_label)
    plotted = [dict(r, MB=r["bytes"] / 1e6, series=f"{r['provider']} {r['dtype']}")
               for r in rows if r["pass"] == "fwd+bwd"]
    common.plot_rows(plotted, x="MB", y="gbs", series=["series"], path=path.with_suffix(".png"),
                     title=f"CMC splice fwd+bwd on {device_label}", xlabel="MB moved", ylabel="GB/s",
                     hline=peak_copy)
    return 0


def _size(text: str) -> tuple[int, int, int]:
    try:
        b, l, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is B,L,D (three integers, e.g. 256,77,768), got {text!r}") from None
    return b, l, d


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
