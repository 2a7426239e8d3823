"""How kernel tests compare tensors: bit for bit where an op only moves values, within a per-dtype tolerance
where it computes. Every kernel test uses these two, so a test states what it compares, not how."""
from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}
"""rtol = atol per dtype: one rounding step of the dtype (a GPU kernel may fuse a multiply-add the reference
rounds twice)."""

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and raw bits: -0.0 differs from 0.0, NaN equals a NaN with the same payload."""
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {list(actual.shape)} != {list(expected.shape)}"
    a, e = (x.detach().cpu().contiguous() for x in (actual, expected))
    bits = _BITS[a.element_size()]
    differ = a.view(bits) != e.view(bits)
    assert not differ.any(), f"{int(differ.sum())} of {a.numel()} elements differ"


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype and shape, values within `TOLERANCE[dtype]`."""
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol)
