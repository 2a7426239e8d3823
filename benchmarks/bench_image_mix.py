"""Benchmark the TiMix window paste: Triton kernel vs the published unfold/fold approach vs kornia.

Every provider does the same job on a [B, 3, S, S] batch: paste one k x k-patch window of a partner image
into every image (k = half the patch grid side, 16-pixel patches, partners flipped):

  triton          cmcaug.kernels.paste_windows, out of place: one read and one write of the batch
  triton_inplace  the same, in place: only the windows move (through a staging buffer)
  timix           the whole cmcaug.text_aware_mix: window search on a relevance map + lam + the paste
  unfold_fold     the published TPMix approach, written here: images -> patch matrix -> copy the window
                  patches -> images (two full reshuffles of the batch around the window copy)
  reference       kernels/reference.py: clone + one slice copy per image (the CPU path)
  kornia          kornia.augmentation.RandomCutMixV2 applying pre-drawn boxes of the same area (float only)

Bytes per call are 2 * B * 3 * S * S * itemsize for all (what an out-of-place paste must move at least),
so GB/s compare directly and % copy = GB/s / measured device copy GB/s. Targets on a GPU: triton >= 80 %
of copy bandwidth and >= 10x unfold_fold.

    cmcaug bench image_mix [--out DIR]    # GPU sweep: B 128..512, 224/384 px, bf16/uint8
    cmcaug bench image_mix --smoke        # one tiny CPU size (no GPU needed)
    python -m cmcaug.benchmarks.bench_image_mix [--smoke] [--out DIR]   # the same as a module
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from cmcaug.kernels import paste_windows, reference
from cmcaug.kernels.backend import interpreter_enabled
from cmcaug.timix import find_windows, text_aware_mix

from . import common

PATCH = 16


def unfold_fold_paste(images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor,
                      source_box: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The published approach (one window size per batch): patchify, copy window patches, un-patchify."""
    B, C, H, W = images.shape
    p, gh, gw = patch_size, H // patch_size, W // patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B * gh * gw, C * p * p)
    k = int(target_box[0, 2] - target_box[0, 0])
    steps = torch.arange(k, device=images.device)

    def window_rows(box: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        rows = (box[:, 1:2] + steps)[:, :, None] * gw + (box[:, 0:1] + steps)[:, None, :]
        return (rows.flatten(1) + owner[:, None] * gh * gw).flatten()

    batch = torch.arange(B, device=images.device)
    patches[window_rows(target_box, batch)] = patches[window_rows(source_box, partner)]
    return patches.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def make_case(batch: int, size: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Any]:
    """A batch, its relevance map and fixed windows (k = grid // 2), drawn reproducibly."""
    g = torch.Generator().manual_seed(seed)
    grid = size // PATCH
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g).to(device=device, dtype=dtype)
    relevance = torch.rand(batch, grid, grid, generator=g).to(device)
    partner = torch.arange(batch - 1, -1, -1, device=device)
    sides = torch.full((batch,), grid // 2, device=device)
    target_box, source_box = find_windows(relevance.double(), partner, sides)
    return dict(images=images, relevance=relevance, partner=partner, target_box=target_box,
                source_box=source_box, side=grid // 2, grid=grid)


def providers(case: dict[str, Any], interpreted_triton: bool) -> dict[str, Callable[[], Any] | str]:
    """name -> zero-argument callable, or a string saying why the provider does not run here."""
    x, partner, tb, sb = case["images"], case["partner"], case["target_box"], case["source_box"]
    on_gpu = x.is_cuda
    scratch = x.clone()
    found: dict[str, Callable[[], Any] | str] = {}
    if on_gpu or interpreted_triton:
        found["triton"] = lambda: paste_windows(x, partner, tb, sb, patch_size=PATCH, backend="triton",
                                                validate=False)
        found["triton_inplace"] = lambda: paste_windows(scratch, partner, tb, sb, patch_size=PATCH,
                                                        backend="triton", inplace=True, validate=False)
        found["timix"] = lambda: text_aware_mix(x, case["relevance"], patch_size=PATCH, window=case["side"],
                                                backend="triton", validate=False)
    else:
        found["triton"] = "needs CUDA or TRITON_INTERPRET=1"
    found["unfold_fold"] = lambda: unfold_fold_paste(x, partner, tb, sb, PATCH)
    found["reference"] = lambda: reference.paste_windows(x, partner, tb, sb, patch_size=PATCH)
    found["kornia"] = _kornia_provider(x, case["side"] / case["grid"])
    return found


def _kornia_provider(x: torch.Tensor, side_ratio: float) -> Callable[[], Any] | str:
    if not x.is_floating_point():
        return f"RandomCutMixV2 takes float images only, not {x.dtype}"
    try:
        import kornia.augmentation as K
    except ImportError:
        return "kornia not installed"
    warnings.filterwarnings("ignore", module="kornia")
    area = side_ratio**2
    aug = K.RandomCutMixV2(cut_size=torch.tensor([area, area]), data_keys=["input"], use_correct_lambda=True)
    aug.set_rng_device_and_dtype(device=x.device, dtype=torch.float32)  # boxes and masks on the images' device
    params = aug.forward_parameters(x.shape)
    try:  # a third-party baseline: a kornia version that rejects this dtype or device skips, not aborts the sweep
        aug(x, params=params)
    except (RuntimeError, TypeError, ValueError) as error:
        return f"RandomCutMixV2 failed here: {error}"
    return lambda: aug(x, params=params)


def check(found: dict[str, Callable[[], Any] | str], case: dict[str, Any]) -> None:
    """Every provider that pastes the same windows must produce the reference's bytes."""
    expected = reference.paste_windows(case["images"], case["partner"], case["target_box"], case["source_box"],
                                       patch_size=PATCH)
    for name in ("triton", "unfold_fold"):
        fn = found[name]
        if callable(fn) and not torch.equal(fn(), expected):
            raise AssertionError(f"{name} differs from the reference paste")


def run(sizes: list[tuple[int, int]], dtypes: list[torch.dtype], device: str, smoke: bool) -> list[dict]:
    """Time every provider on every (dtype, batch, size); one row per provider and case."""
    interpreted = smoke and interpreter_enabled()
    timer = (lambda fn: common.cpu_time_ms(fn, repeat=1, min_seconds=0.0)) if smoke else common.gpu_time_ms
    rows = []
    for dtype in dtypes:
        for batch, size in sizes:
            case = make_case(batch, size, dtype, device)
            found = providers(case, interpreted)
            check(found, case)
            nbytes = 2 * case["images"].numel() * case["images"].element_size()
            copy_gbs = common.copy_bandwidth_gbs(nbytes, device, timer)
            case_rows = []
            for name, fn in found.items():
                row = dict(provider=name, dtype=str(dtype).removeprefix("torch."), batch=batch, px=size,
                           window=f"{case['side']}x{case['side']} of {case['grid']}x{case['grid']}",
                           bytes=nbytes, copy_gbs=copy_gbs)
                if isinstance(fn, str):
                    case_rows.append({**row, "skipped": fn})
                    continue
                ms = timer(fn)
                case_rows.append({**row, "ms": ms, "gbs": common.gbs(nbytes, ms),
                                  "pct_copy": 100 * common.gbs(nbytes, ms) / copy_gbs})
            baseline = next((r["ms"] for r in case_rows if r["provider"] == "unfold_fold" and "ms" in r), None)
            for row in case_rows:
                if baseline is not None and "ms" in row:
                    row["speedup_vs_unfold_fold"] = baseline / row["ms"]
            rows += case_rows
            del case, found
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("bench_image_mix", __doc__)
    parser.add_argument("--smoke", action="store_true", help="one tiny size on the CPU (checks, not numbers)")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="image side in pixels")
    args = parser.parse_args(argv)
    if args.smoke:
        device, sizes, dtypes = "cpu", [(4, 64)], [torch.float32, torch.uint8]
    elif not torch.cuda.is_available():
        print("bench_image_mix needs a CUDA GPU (Triton kernels); run with --smoke for a CPU check",
              file=sys.stderr)
        return 2
    else:
        device, dtypes = "cuda", [torch.bfloat16, torch.uint8]
        sizes = [(b, s) for s in args.sizes for b in args.batches]
    rows = run(sizes, dtypes, device, args.smoke)
    name = common.device_name(device)
    columns = ["provider", "dtype", "batch", "px", "ms", "gbs", "pct_copy", "speedup_vs_unfold_fold", "skipped"]
    common.print_table(rows, columns, title=f"TiMix window paste on {name}")
    result_name = "image_mix-smoke" if args.smoke else "image_mix"
    path = common.write_results(result_name, {"device": name, "patch_size": PATCH, "rows": rows}, out=args.out,
                                device=name)
    timed = [r for r in rows if "ms" in r]
    for px in sorted({r["px"] for r in timed}):
        common.plot_rows([r for r in timed if r["px"] == px], x="batch", y="pct_copy",
                         series=["provider", "dtype"], path=path.with_name(f"{path.stem}-{px}px.png"),
                         title=f"TiMix paste, {px}x{px} px, {name}", ylabel="% of copy bandwidth", hline=100.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
