"""How every op of `cmcaug.kernels` is wired: which implementation runs, and `kernel_op`, which wires an op once.

CUDA tensors run the Triton kernels; CPU tensors run `kernels/reference.py`. With `TRITON_INTERPRET=1`
(set before `cmcaug.kernels` is imported) the Triton kernels also run on CPU tensors when asked for with
`backend="triton"`: that is how the test suite checks the kernels on a machine with no GPU.

`kernel_op` turns one definition (the op's signature and output shape) into a registered operator, which
`torch.compile` keeps as one opaque node, and a cheaper eager path that skips the operator dispatcher.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from cmcaug.errors import InputError

Backend = Literal["auto", "triton", "reference"]

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a constant, so torch.compile traces through


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """True when a Triton kernel can launch on tensors of `device`: a usable driver, not just `import triton`."""
    if not _TRITON_INSTALLED:
        return False
    if interpreter_enabled():
        return True
    return device.type == "cuda" and torch.cuda.is_available()


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


class KernelOp:
    """One op, callable as `op(*inputs, backend="auto")`; the backend is resolved on `inputs[0].device`.

    - Under `torch.compile`: the registered operator `self.operator` (no graph break; the same kernel runs).
    - Eager, an input requiring grad: an `autograd.Function` over the same functions; an op without a
      backward runs its reference instead, which autograd differentiates.
    - Eager otherwise: the implementation itself.

    Why eager skips the operator: on tiny CPU tensors the dispatcher costs ~60 us a call and ~140 us with
    grad (custom_op's autograd is a new-style Function, which binds its arguments with `inspect`), the
    Function here ~15 and ~35 us (medians on the 2-core CPU build machine, torch 2.14).
    """

    def __init__(self, name: str, fake: Callable, implementations: dict[str, Callable], *,
                 check: Callable | None, backward: Callable | None, setup_context: Callable | None,
                 mutates_args: Sequence[str]) -> None:
        self.name = name
        self._implementations, self._check = implementations, check
        schema = torch.library.infer_schema(fake, mutates_args=mutates_args)
        self.operator = torch.library.custom_op(name, self._run, mutates_args=mutates_args, schema=schema)
        self.operator.register_fake(fake)
        self._function = None
        if backward is not None:
            self.operator.register_autograd(backward, setup_context=setup_context)
            self._function = _autograd_function(name, self._run, backward, setup_context)

    def __call__(self, *inputs: Any, backend: Backend = "auto") -> Any:
        implementation = resolve_backend(backend, inputs[0].device)
        wants_grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
        if wants_grad and self._function is None:
            if backend == "triton":
                raise InputError(f"{self.name}: the Triton kernel has no backward and an input requires grad; pass "
                                 "backend='auto' or 'reference' (differentiable), or detach the input")
            implementation = "reference"
        elif torch.compiler.is_compiling():
            return self.operator(*inputs, implementation)
        elif wants_grad:
            return self._function.apply(*inputs, implementation)
        return self._run(*inputs, implementation)

    def _run(self, *args: Any) -> Any:
        """The operator's body: checks that need values (they run in compiled code too), then the implementation."""
        *inputs, implementation = args
        if self._check is not None:
            self._check(*inputs)
        return self._implementations[implementation](*inputs)


def kernel_op(name: str, *, triton: Callable, reference: Callable, check: Callable | None = None,
              backward: Callable | None = None, setup_context: Callable | None = None,
              mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: wire the op `name` ("cmcaug::...") from its definition, the decorated function.

    The definition's signature is the operator's schema, ending in `implementation: str`, and its body is
    the fake implementation: the output's shape, dtype and strides, without reading data. `triton` and
    `reference` take the other arguments; `check(*inputs)` runs before either. `backward(ctx, *grads)` and
    `setup_context(ctx, inputs, output)` are `register_autograd`'s; gradients come back for every input,
    `implementation` included (None), and `ctx.needs_input_grad` counts the same way.
    """
    def define(fake: Callable) -> KernelOp:
        return KernelOp(name, fake, {"triton": triton, "reference": reference}, check=check, backward=backward,
                        setup_context=setup_context, mutates_args=tuple(mutates_args))

    return define


def _autograd_function(name: str, run: Callable, backward: Callable, setup_context: Callable) -> type:
    """The eager twin of an operator's autograd registration. Old style (`ctx` in `forward`): a new-style
    Function with `setup_context` binds its arguments with `inspect.signature` on every call."""
    def forward(ctx, *args):
        output = run(*args)
        setup_context(ctx, args, output)
        return output

    return type(name.replace("::", "_"), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
