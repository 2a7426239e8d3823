"""splice: the Triton kernels (interpreted on CPU, compiled on CUDA) equal the reference bit for bit, forward
and backward, and the reference equals a per-row construction, on random ragged plans of every shape."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from compare import assert_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import PlanSpec, plan_specs, random_spec, spliced_rows

from cmcaug.errors import InputError
from cmcaug.kernels import SpliceOutput, reference, splice
from cmcaug.kernels.index_maps import SpliceMaps
from cmcaug.kernels.splice import _row_offsets, splice_backward, splice_forward
from cmcaug.plan import SplicePlan

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "row_strided", "transposed", "d_strided", "expanded"]


def examples(n: int) -> settings:
    """Hypothesis settings: n examples, no deadline (the interpreter is slow), fixtures allowed (they are constants)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def inverse_maps(plan: SplicePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps the backward launchers take: (text_destination, patch_destination)."""
    return plan.text_destination, plan.patch_destination


def make_tensor(shape: tuple[int, int, int], dtype: torch.dtype, layout: str, seed: int, device: str) -> torch.Tensor:
    """A random [A, R, D] tensor with the given memory layout (a view of a larger or permuted buffer)."""
    a, r, d = shape
    base_shape = {"contiguous": (a, r, d), "row_strided": (a, r + 2, d + 3), "transposed": (r, a, d),
                  "d_strided": (a, r, 2 * d), "expanded": (1, r, d)}[layout]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(base_shape, generator=g).to(device=device, dtype=dtype)
    view = {"contiguous": lambda x: x, "row_strided": lambda x: x[:, 1:r + 1, 2:d + 2],
            "transposed": lambda x: x.transpose(0, 1), "d_strided": lambda x: x[..., ::2],
            "expanded": lambda x: x.expand(a, r, d)}[layout](base)
    assert view.shape == (a, r, d)
    return view


def naive_splice(text: torch.Tensor, patches: torch.Tensor, spec: PlanSpec) -> torch.Tensor:
    """The spliced batch built row by row, token by token (autograd follows the copies)."""
    rows = spliced_rows(spec)
    out = text.new_zeros(len(rows), max(len(row) for row in rows), text.shape[-1])
    for b, row in enumerate(rows):
        for t, (kind, i, j) in enumerate(row):
            out[b, t] = text[b, i] if kind == "text" else patches[i, j]
    return out


def case(spec: PlanSpec, d: int, dtype: torch.dtype, layout: str, seed: int, device: str, grad: bool = False):
    plan = spec.build().to(device)
    text = make_tensor((plan.batch_size, plan.text_length, d), dtype, layout, seed, device)
    patches = make_tensor((plan.num_slots, plan.patch_tokens, d), dtype, layout, seed + 1, device)
    if grad:
        text, patches = text.detach().requires_grad_(), patches.detach().requires_grad_()
    return plan, text, patches


# -- the reference against the per-row construction ----------------------------------------------------
@examples(600)
@given(spec=plan_specs(), d=st.sampled_from([1, 3, 8]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_reference_matches_per_row_construction(spec: PlanSpec, d: int, dtype, layout: str, seed: int) -> None:
    plan, text, patches = case(spec, d, dtype, layout, seed, "cpu", grad=True)
    out = splice(text, patches, plan, backend="reference")
    want = naive_splice(text, patches, spec)
    assert_exact(out.embeds, want)
    g = make_tensor(tuple(out.embeds.shape), dtype, "contiguous", seed + 2, "cpu")
    got = torch.autograd.grad(out.embeds, (text, patches), g)
    want_grads = torch.autograd.grad(want, (text, patches), g, allow_unused=True) if want.requires_grad else (None,) * 2
    for actual, expected, x in zip(got, want_grads, (text, patches)):
        assert_exact(actual, torch.zeros_like(x) if expected is None else expected)


@pytest.mark.parametrize("seed", range(8))
def test_reference_on_large_random_plans(seed: int) -> None:
    spec = random_spec(np.random.default_rng(1000 + seed), batch=64)
    plan, text, patches = case(spec, 4, torch.float32, "contiguous", seed, "cpu")
    assert_exact(reference.splice_forward(text, patches, plan.source_index), naive_splice(text, patches, spec))


# -- Triton against the reference ----------------------------------------------------------------------
@examples(400)
@given(spec=plan_specs(max_batch=4, max_text=14), d=st.sampled_from([1, 3, 5, 16, 33, 100]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16),
       blocks=st.sampled_from([(None, None), (8, None), (None, 4), (32, 16)]))
def test_triton_matches_reference(triton_device, spec, d, dtype, layout, seed, blocks) -> None:
    block_rows, block_d = blocks
    plan, text, patches = case(spec, d, dtype, layout, seed, triton_device)
    out = splice_forward(text, patches, plan.source_index, block_rows=block_rows, block_d=block_d)
    assert_exact(out, reference.splice_forward(text, patches, plan.source_index))
    g = make_tensor(tuple(out.shape), dtype, layout, seed + 2, triton_device)
    got = splice_backward(g, *inverse_maps(plan), block_rows=block_rows, block_d=block_d)
    for actual, expected in zip(got, reference.splice_backward(g, *inverse_maps(plan))):
        assert_exact(actual, expected)


@examples(80)
@given(spec=plan_specs(max_batch=4, max_text=12), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       needs=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_triton_autograd_matches_reference(triton_device, spec, dtype, seed, needs) -> None:
    outputs, grads = [], []
    for backend in ("triton", "reference"):
        plan, text, patches = case(spec, 6, dtype, "contiguous", seed, triton_device)
        text.requires_grad_(needs[0])
        patches.requires_grad_(needs[1])
        out = splice(text, patches, plan, backend=backend)
        g = make_tensor(tuple(out.embeds.shape), dtype, "contiguous", seed + 2, triton_device)
        inputs = [x for x, need in zip((text, patches), needs) if need]
        outputs.append(out)
        grads.append(torch.autograd.grad(out.embeds, inputs, g))
    for a, b in zip(outputs[0], outputs[1]):
        assert_exact(a, b)
    for a, b in zip(grads[0], grads[1]):
        assert_exact(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_triton_on_large_random_plans(triton_device, seed: int) -> None:
    """Many ragged rows per launch: 6 x 64 rows, every dtype, forward and backward."""
    spec = random_spec(np.random.default_rng(2000 + seed), batch=64)
    dtype = DTYPES[seed % len(DTYPES)]
    plan, text, patches = case(spec, 7, dtype, LAYOUTS[seed % len(LAYOUTS)], seed, triton_device)
    source = plan.source_index
    assert_exact(splice_forward(text, patches, source), reference.splice_forward(text, patches, source))
    g = make_tensor((plan.batch_size, plan.output_length, 7), dtype, "contiguous", seed + 1, triton_device)
    got, expected = splice_backward(g, *inverse_maps(plan)), reference.splice_backward(g, *inverse_maps(plan))
    for actual, wanted in zip(got, expected):
        assert_exact(actual, wanted)


EDGE_CASES = {
    "one row, no spans": PlanSpec((5,), ((),)),
    "no patches at all (M = 0)": PlanSpec((3, 4), ((), ())),
    "rows entirely patches": PlanSpec((3, 2), (((0, 1), (1, 3)), ((0, 2),)), patch_tokens=3),
    "all rows empty": PlanSpec((0, 0), ((), ())),
    "truncated by max_length": PlanSpec((9, 4), (((2, 4), (6, 7)), ((0, 4),)), patch_tokens=4, max_length=6),
    "padded text width": PlanSpec((2, 3), (((1, 2),), ()), patch_tokens=2, text_length=7),
}


@pytest.mark.parametrize("d", [1, 1000])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(triton_device, name: str, d: int) -> None:
    spec = EDGE_CASES[name]
    results = []
    for backend in ("triton", "reference"):
        plan, text, patches = case(spec, d, torch.bfloat16, "contiguous", 7, triton_device, grad=True)
        out = splice(text, patches, plan, backend=backend)
        results.append((out.embeds, *torch.autograd.grad(out.embeds, (text, patches), torch.ones_like(out.embeds))))
    assert_exact(results[0][0], naive_splice(text.detach().cpu(), patches.detach().cpu(), spec))
    for a, b in zip(*results):
        assert_exact(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_keep_their_bits(triton_device, dtype) -> None:
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5], dtype=torch.float64)
    spec = PlanSpec((4, 3), (((1, 2),), ((0, 3),)), patch_tokens=2)
    plan = spec.build().to(triton_device)
    text = specials[torch.arange(2 * 4 * 5) % 7].reshape(2, 4, 5).to(device=triton_device, dtype=dtype)
    patches = specials[torch.arange(2 * 2 * 5) % 5 + 1].reshape(2, 2, 5).to(device=triton_device, dtype=dtype)
    out = splice_forward(text, patches, plan.source_index)
    assert_exact(out, reference.splice_forward(text, patches, plan.source_index))
    got = splice_backward(-out, *inverse_maps(plan))  # gradients with -0.0 and NaN
    for actual, expected in zip(got, reference.splice_backward(-out, *inverse_maps(plan))):
        assert_exact(actual, expected)


def test_assert_exact_compares_bits() -> None:
    """The comparison every kernel test uses: NaN equals its own bits, -0.0 is not 0.0, dtypes must agree."""
    nan = torch.tensor([float("nan"), 1.0])
    assert_exact(nan, nan.clone())
    for other in (torch.tensor([-0.0]), torch.tensor([0.0], dtype=torch.float64)):
        with pytest.raises(AssertionError):
            assert_exact(torch.tensor([0.0]), other)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "text", "patches"])
def test_gradcheck_and_gradgradcheck(triton_device, backend: str, needs: tuple[bool, bool]) -> None:
    """First and second derivatives (a gradient penalty differentiates the backward), with either input alone."""
    plan, text, patches = case(EDGE_CASES["truncated by max_length"], 2, torch.float64, "row_strided", 3,
                               triton_device)
    inputs = tuple(x.detach().requires_grad_() for x, need in zip((text, patches), needs) if need)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        given = iter(args)
        t, p = (next(given) if need else x for x, need in zip((text, patches), needs))
        return splice(t, p, plan, backend=backend).embeds

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_replaced_text_tokens_get_zero_gradient(triton_device, backend: str) -> None:
    plan = SplicePlan.build([4], [[(1, 3)]]).to(triton_device)
    text = torch.ones(1, 4, 2, device=triton_device, requires_grad=True)
    patches = torch.ones(1, 1, 2, device=triton_device, requires_grad=True)
    splice(text, patches, plan, backend=backend).embeds.sum().backward()  # a zero-stride (expanded) gradient
    assert text.grad[0, :, 0].tolist() == [1.0, 0.0, 0.0, 1.0] and patches.grad.tolist() == [[[1.0, 1.0]]]


def test_any_object_carrying_the_maps_is_a_plan() -> None:
    """The kernels read a plan through `SpliceMaps`: the six maps, sizes from their shapes; no SplicePlan needed."""
    plan = SplicePlan.build([3, 1], [[(1, 2)], []], patch_tokens=2)
    maps = SimpleNamespace(**{name: getattr(plan, name) for name in SpliceMaps.__annotations__})
    text, patches = torch.randn(2, 3, 4), torch.randn(1, 2, 4)
    for got, want in zip(splice(text, patches, maps), splice(text, patches, plan)):
        assert_exact(got, want)


def test_output_maps_come_from_the_plan() -> None:
    plan = SplicePlan.build([3, 1], [[(1, 2)], []], patch_tokens=2)
    out = splice(torch.zeros(2, 3, 4), torch.zeros(1, 2, 4), plan)
    assert isinstance(out, SpliceOutput)
    assert torch.equal(out.attention_mask, plan.attention_mask) and out.attention_mask.dtype == torch.int64
    assert torch.equal(out.modality_ids, plan.modality_ids)
    assert torch.equal(out.position_ids, plan.position_ids)
    assert out.source_index is plan.source_index
    assert out.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_as_one_graph(triton_device, backend: str) -> None:
    """`torch.compile(fullgraph=True)` traces a model step that splices (no graph break) and gives eager's
    output and gradients bit for bit; the splice is a registered operator, so the same kernel runs."""
    plan, text, patches = case(EDGE_CASES["truncated by max_length"], 5, torch.float32, "contiguous", 4,
                               triton_device)

    def step(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        out = splice(t, p, plan, backend=backend)
        return (out.embeds.tanh() * out.attention_mask[..., None] + out.modality_ids[..., None]).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        t, p = text.detach().requires_grad_(), patches.detach().requires_grad_()
        loss = fn(t, p)
        loss.backward()
        results.append((loss, t.grad, p.grad))
    for eager, compiled in zip(*results):
        assert_exact(compiled, eager)


def test_operators_pass_opcheck() -> None:
    """The registrations torch.compile relies on (schema, fake tensors, autograd) agree with the kernels."""
    plan, text, patches = case(EDGE_CASES["truncated by max_length"], 3, torch.float64, "contiguous", 5, "cpu")
    maps = (plan.source_index, plan.text_destination, plan.patch_destination)
    grad = torch.randn(plan.batch_size, plan.output_length, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cmcaug.splice, (text.requires_grad_(), patches, *maps, "reference"))
    for wanted in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.cmcaug.splice_transpose, (grad.requires_grad_(), *maps, *wanted, "reference"))


@triton.jit
def _row_offsets_probe(out_ptr, rows_ptr, inner, stride_outer, stride_inner, FLAT: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, 2))
    tl.store(out_ptr + tl.arange(0, 2), _row_offsets(rows, inner, stride_outer, stride_inner, FLAT))


@examples(40)
@given(row=st.integers(0, 2**31 - 1), inner=st.integers(1, 2**31 - 1),
       strides=st.tuples(st.integers(0, 2**32), st.integers(0, 2**32)))
def test_row_offsets_use_64_bit_math(triton_device, row: int, inner: int, strides: tuple[int, int]) -> None:
    """The offset helper of the kernels, on int32 rows whose offsets overflow 32 bits (strides up to 2^32
    keep every true offset, at most row * 2^32, inside int64 as in any real tensor)."""
    rows = torch.tensor([row, max(row - 1, 0)], dtype=torch.int32, device=triton_device)
    out = torch.zeros(2, dtype=torch.int64, device=triton_device)
    _row_offsets_probe[(1,)](out, rows, inner, *strides, FLAT=False)
    assert out.tolist() == [r // inner * strides[0] + r % inner * strides[1] for r in rows.tolist()]
    _row_offsets_probe[(1,)](out, rows, inner, *strides, FLAT=True)
    assert out.tolist() == [r * strides[1] for r in rows.tolist()]


@pytest.mark.gpu
def test_more_than_2_31_elements_on_cuda() -> None:
    d, width = 1024, 2**21 + 5  # text and output each hold more than 2^31 bf16 elements
    spans = [[(width - 9, width - 7), (width - 3, width - 2)]]
    plan = SplicePlan.build([width], spans, patch_tokens=3).to("cuda")
    text = torch.randn(1, width, d, device="cuda", dtype=torch.bfloat16)
    patches = torch.randn(2, 3, d, device="cuda", dtype=torch.bfloat16)
    out = splice(text, patches, plan).embeds
    assert text.numel() > 2**31 and out.numel() > 2**31
    assert_exact(out[0, -12:], reference.splice_forward(text, patches, plan.source_index)[0, -12:])
    grad_text, grad_patches = splice_backward(out, *inverse_maps(plan))
    assert_exact(grad_text[0, -12:], reference.splice_backward(out, *inverse_maps(plan))[0][0, -12:])
    assert_exact(grad_patches, patches)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_gpu_that_is_not_current() -> None:
    """Triton launches on the current device: the launcher must switch to the tensors' GPU."""
    plan = SplicePlan.build([5, 3], [[(1, 3)], [(0, 1)]], patch_tokens=2).to("cuda:1")
    text = torch.randn(2, 5, 8, device="cuda:1", requires_grad=True)
    patches = torch.randn(2, 2, 8, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        out = splice(text, patches, plan).embeds
        grads = torch.autograd.grad(out, (text, patches), torch.ones_like(out))
    assert_exact(out, reference.splice_forward(text, patches, plan.source_index))
    for actual, expected in zip(grads, reference.splice_backward(torch.ones_like(out), *inverse_maps(plan))):
        assert_exact(actual, expected)


_COMPILE_FOR_GPU = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cmcaug.kernels.patch_gather import _patch_gather_kernel
from cmcaug.kernels.splice import _gather_rows_kernel

def compile(fn, types, constexprs):
    signature = dict(types, **dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

for dtype, signed, flat in itertools.product(("fp32", "bf16"), (True, False), (True, False)):
    names = ["out_ptr", "index_ptr", "n_rows", "D", "a_ptr", "a_inner", "a_stride0", "a_stride1",
             "b_ptr", "b_inner", "b_stride0", "b_stride1"]
    types = ["*" + dtype, "*i32", "i32", "i32", "*" + dtype, "i32", "i64", "i32", "*" + dtype, "i32", "i32", "i32"]
    compile(_gather_rows_kernel, dict(zip(names, types)),
            {"SIGNED": signed, "A_FLAT": flat, "B_FLAT": not flat, "BLOCK_R": 16, "BLOCK_D": 256, "D_BLOCKS": 3})
for dtype, has_index in itertools.product(("fp32", "bf16"), (True, False)):
    names = ["out_ptr", "pixels_ptr", "index_ptr", "affine_ptr", "M", "HW", "W", "stride_n", "stride_h",
             "stride_w", "stride_c"]
    types = ["*" + dtype, "*u8", "*i64", "*fp32"] + ["i32"] * 7
    compile(_patch_gather_kernel, dict(zip(names, types)),
            {"C": 3, "HAS_INDEX": has_index, "TO_BFLOAT16": dtype == "bf16", "BLOCK_M": 1, "BLOCK_Q": 1024})
"""


def test_kernels_compile_for_a_gpu_target() -> None:
    """Compile every kernel variant to H100 code (no GPU needed): catches what only the compiler rejects."""
    import inspect
    import os
    import subprocess
    import sys

    from triton.compiler import ASTSource

    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels for real")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"triton {triton.__version__} has another ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# -- errors --------------------------------------------------------------------------------------------
def test_errors() -> None:
    plan = SplicePlan.build([3, 2], [[(0, 1)], []], patch_tokens=2)
    text, patches = torch.zeros(2, 3, 4), torch.zeros(1, 2, 4)
    with pytest.raises(InputError, match="build the plan with text_length"):
        splice(torch.zeros(2, 5, 4), patches, plan)
    with pytest.raises(InputError, match=r"\[M, K, D\] = \[1, 2, 4\]"):
        splice(text, torch.zeros(2, 2, 4), plan)
    with pytest.raises(InputError, match="share a dtype"):
        splice(text, patches.half(), plan)
    with pytest.raises(InputError, match="3-D floating-point"):
        splice(text.long(), patches.long(), plan)
    with pytest.raises(InputError, match="3-D floating-point"):
        splice(text[0], patches, plan)
    with pytest.raises(InputError, match=r"SplicePlan \(see SplicePlan.build\), got Tensor"):
        splice(text, patches, plan.source_index)
    with pytest.raises(InputError, match="one device"):
        splice(text.to("meta"), patches.to("meta"), plan)
    with pytest.raises(InputError, match="backend must be"):
        splice(text, patches, plan, backend="cuda")

