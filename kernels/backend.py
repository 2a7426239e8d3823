"""Which implementation runs an op: the one small dispatch function every op shares.

CUDA tensors run the Triton kernels; CPU tensors run `kernels/reference.py`. With `TRITON_INTERPRET=1`
(set before `cmcaug.kernels` is imported) the Triton kernels also run on CPU tensors when asked for with
`backend="triton"`: that is how the test suite checks the kernels on a machine with no GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Literal

import torch

from cmcaug.errors import InputError

Backend = Literal["auto", "triton", "reference"]


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_can_run(device: torch.device) -> bool:
    """True when a Triton kernel can launch on tensors of `device`: a usable driver, not just `import triton`."""
    if not triton_installed():
        return False
    if interpreter_enabled():
        return True
    return device.type == "cuda" and torch.cuda.is_available()


@torch.compiler.assume_constant_result  # under torch.compile: decided once, while tracing
def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "reference"]:
    """Turn a user's `backend` choice into the implementation that runs on `device`."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_can_run(device) else "reference"
    if backend == "triton":
        if not triton_can_run(device):
            raise InputError(
                f"backend='triton' cannot run on {device} tensors here: it needs CUDA tensors with a working "
                "GPU driver, or TRITON_INTERPRET=1 set before cmcaug.kernels is imported (CPU interpreter)"
            )
        return "triton"
    raise InputError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while a kernel launches: Triton launches on the current CUDA device and its
    stream, so tensors on another GPU (a process that never called torch.cuda.set_device) need this."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
