"""The TiMix window paste: the Triton kernel (interpreted on CPU) equals the PyTorch reference bit for bit."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from compare import assert_exact
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.errors import InputError
from cmcaug.kernels import paste_windows, reference

DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class PasteCase:
    """A batch and the windows to paste: (x0, y0, x1, y1) in patch units, sources the size of targets."""

    images: torch.Tensor
    partner: torch.Tensor
    target_box: torch.Tensor
    source_box: torch.Tensor
    patch_size: int


def make_case(batch: int, channels: int, grid: tuple[int, int], patch: int, extra: tuple[int, int],
              dtype: torch.dtype, seed: int, repeat_partners: bool = False) -> PasteCase:
    """Random images, partners and windows (rectangular, any size from empty to the whole grid)."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    H, W = gh * patch + extra[0], gw * patch + extra[1]
    images = torch.randint(0, 256, (batch, channels, H, W), generator=g).to(dtype)
    if dtype.is_floating_point:
        images += torch.rand(images.shape, generator=g).to(dtype)  # fractional bits must survive too
    partner = (torch.randint(0, batch, (batch,), generator=g) if repeat_partners
               else torch.randperm(batch, generator=g))
    kw = torch.randint(0, gw + 1, (batch,), generator=g)
    kh = torch.randint(0, gh + 1, (batch,), generator=g)

    def corner(k: torch.Tensor, n: int) -> torch.Tensor:
        return (torch.rand(batch, generator=g) * (n - k + 1)).long()

    tx, ty, sx, sy = corner(kw, gw), corner(kh, gh), corner(kw, gw), corner(kh, gh)
    return PasteCase(images, partner, torch.stack([tx, ty, tx + kw, ty + kh], 1),
                     torch.stack([sx, sy, sx + kw, sy + kh], 1), patch)


def paste(case: PasteCase, images: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    return paste_windows(case.images if images is None else images, case.partner, case.target_box,
                         case.source_box, patch_size=case.patch_size, **kwargs)


def test_reference_follows_the_contract_pixel_by_pixel() -> None:
    case = make_case(3, 2, (3, 4), 2, (1, 1), torch.float32, seed=1)
    out = reference.paste_windows(case.images, case.partner, case.target_box, case.source_box, patch_size=2)
    p = case.patch_size
    for i in range(3):
        tx0, ty0, tx1, ty1 = case.target_box[i].tolist()
        sx0, sy0 = case.source_box[i, :2].tolist()
        for y in range(case.images.shape[2]):
            for x in range(case.images.shape[3]):
                inside = ty0 * p <= y < ty1 * p and tx0 * p <= x < tx1 * p
                j, sy, sx = ((case.partner[i], y - (ty0 - sy0) * p, x - (tx0 - sx0) * p) if inside else (i, y, x))
                assert torch.equal(out[i, :, y, x], case.images[j, :, sy, sx])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "channels", "grid", "patch", "extra"), [
    (1, 3, (1, 1), 1, (0, 0)),      # one pixel, one image
    (5, 3, (7, 5), 5, (2, 4)),      # odd everything, pixels beyond the last patch
    (4, 1, (3, 9), 16, (0, 0)),     # wide grid, real patch size
    (3, 4, (6, 2), 3, (0, 1)),      # tall grid, 4 channels
])
def test_triton_matches_reference(batch, channels, grid, patch, extra, dtype) -> None:
    case = make_case(batch, channels, grid, patch, extra, dtype, seed=batch * 7 + patch)
    before = case.images.clone()
    expected = paste(case, backend="reference")
    assert_exact(paste(case, backend="triton"), expected)
    assert_exact(case.images, before)  # out of place leaves the input alone
    for backend in ("triton", "reference"):
        inplace = case.images.clone()
        assert paste(case, inplace, backend=backend, inplace=True) is inplace
        assert_exact(inplace, expected)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), channels=st.sampled_from([1, 3]), gh=st.integers(1, 5), gw=st.integers(1, 5),
       patch=st.integers(1, 6), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), repeat=st.booleans())
def test_triton_matches_reference_on_random_cases(batch, channels, gh, gw, patch, extra, dtype, seed, repeat):
    case = make_case(batch, channels, (gh, gw), patch, extra, dtype, seed, repeat_partners=repeat)
    expected = paste(case, backend="reference")
    assert_exact(paste(case, backend="triton"), expected)
    inplace = case.images.clone()
    paste(case, inplace, backend="triton", inplace=True)
    assert_exact(inplace, expected)


@pytest.mark.parametrize("layout", ["channels_last", "strided_view"])
def test_any_strides(layout) -> None:
    case = make_case(4, 3, (4, 5), 4, (3, 2), torch.bfloat16, seed=3)
    if layout == "channels_last":
        images = case.images.to(memory_format=torch.channels_last)
    else:
        wide = torch.zeros(*case.images.shape[:3], 2 * case.images.shape[3], dtype=case.images.dtype)
        wide[..., ::2] = case.images
        images = wide[..., ::2]  # a view with column stride 2
    assert_exact(images, case.images)
    expected = paste(case, backend="reference")
    out = paste(case, images, backend="triton")
    assert_exact(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_empty_windows_and_empty_batch_change_nothing() -> None:
    case = make_case(3, 3, (4, 4), 4, (0, 0), torch.uint8, seed=5)
    empty = torch.tensor([[1, 2, 1, 4], [0, 0, 0, 0], [2, 3, 4, 3]])
    for backend in ("triton", "reference"):
        out = paste_windows(case.images, case.partner, empty, empty, patch_size=4, backend=backend)
        assert_exact(out, case.images)
        inplace = case.images.clone()
        paste_windows(inplace, case.partner, empty, empty, patch_size=4, backend=backend, inplace=True)
        assert_exact(inplace, case.images)
        none = torch.zeros(0, 3, 8, 8)
        idx, box = torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)
        assert paste_windows(none, idx, box, box, patch_size=4, backend=backend).shape == none.shape


def test_swapping_overlapping_windows_in_place_reads_before_it_writes() -> None:
    """Image 0 takes image 1's window and image 1 takes image 0's: in place must stage the sources."""
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    target = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]])
    source = torch.tensor([[1, 1, 3, 3], [0, 0, 2, 2]])
    partner = torch.tensor([1, 0])
    expected = images.clone()
    expected[0, :, 0:2, 0:2] = images[1, :, 1:3, 1:3]
    expected[1, :, 1:3, 1:3] = images[0, :, 0:2, 0:2]
    for backend in ("triton", "reference"):
        inplace = images.clone()
        paste_windows(inplace, partner, target, source, patch_size=1, backend=backend, inplace=True)
        assert_exact(inplace, expected)


@pytest.mark.parametrize(("partner", "target", "source", "message"), [
    ([0, 2], [[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]] * 2, r"partner values .*; sample 1 has partner 2"),
    ([0, 1], [[0, 0, 1, 1], [2, 2, 4, 4]], [[0, 0, 1, 1]] * 2, "inside the 3 x 3 patch grid"),
    ([0, 1], [[0, 0, 1, 1], [1, 1, 0, 0]], [[0, 0, 1, 1], [1, 1, 0, 0]], "x1 >= x0"),
    ([0, 1], [[0, 0, 1, 1], [0, 0, 2, 2]], [[0, 0, 1, 1], [0, 0, 1, 2]], "same width and height"),
])
def test_bad_windows_are_refused(partner, target, source, message) -> None:
    images = torch.zeros(2, 3, 13, 13)
    with pytest.raises(InputError, match=message):
        paste_windows(images, torch.tensor(partner), torch.tensor(target), torch.tensor(source), patch_size=4)


def test_bad_shapes_are_refused() -> None:
    images, partner, box = torch.zeros(2, 3, 8, 8), torch.tensor([1, 0]), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        paste_windows(images[0], partner, box, box, patch_size=4)
    with pytest.raises(InputError, match="partner must be an integer tensor"):
        paste_windows(images, partner.float(), box, box, patch_size=4)
    with pytest.raises(InputError, match="target_box must be an integer tensor"):
        paste_windows(images, partner, box[:, :3], box, patch_size=4)
    with pytest.raises(InputError, match="patch_size"):
        paste_windows(images, partner, box, box, patch_size=0)
    with pytest.raises(InputError, match="backend"):
        paste_windows(images, partner, box, box, patch_size=4, backend="cuda")


def test_images_that_require_grad_take_the_differentiable_path() -> None:
    case = make_case(3, 2, (2, 3), 2, (1, 0), torch.float64, seed=9, repeat_partners=True)
    images = case.images.clone().requires_grad_()
    with pytest.raises(InputError, match="no backward"):
        paste(case, images, backend="triton")
    assert torch.autograd.gradcheck(lambda x: paste(case, x, backend="auto"), (images,))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_as_one_graph(backend: str) -> None:
    """`torch.compile(fullgraph=True)` traces a TiMix step (windows from cmcaug.timix, so validate=False): the
    paste is a registered operator, out of place and in place, and gives eager's bytes."""
    case = make_case(3, 2, (3, 4), 2, (1, 1), torch.float32, seed=4)

    def step(images: torch.Tensor) -> torch.Tensor:
        mixed = paste(case, images, backend=backend, validate=False)
        return paste(case, mixed * 2, backend=backend, validate=False, inplace=True) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_exact(compiled(case.images), step(case.images))


@pytest.mark.parametrize("operator", ["paste_windows", "paste_windows_"])
def test_operators_pass_opcheck(operator: str) -> None:
    """The registrations torch.compile relies on (schema, mutation, fake tensor) agree with the implementations."""
    case = make_case(3, 2, (3, 4), 2, (1, 1), torch.float32, seed=6, repeat_partners=True)
    args = (case.images.clone(), case.partner, case.target_box, case.source_box, case.patch_size, "reference")
    torch.library.opcheck(getattr(torch.ops.cmcaug, operator), args)


def test_kernel_compiles_for_hopper_with_16_byte_accesses() -> None:
    """No GPU here: compile the kernel ahead of time for sm_90 with the specializations the runtime makes
    (pointers 16-byte aligned, sizes and strides that are multiples of 16 marked so, unit strides as
    constants) and check that a 224-pixel, 16-pixel-patch paste moves 16-byte vectors, masks included, out of
    place and in place (COPY_REST=False)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget compile API")
    from cmcaug.kernels import image_mix

    kernel = JITFunction(getattr(image_mix._paste_kernel, "fn", image_mix._paste_kernel))
    names = list(kernel.arg_names)
    for dtype, block_h, copy_rest in (("u8", 32, True), ("bf16", 32, True), ("fp32", 16, True), ("bf16", 32, False)):
        signature = {name: "i32" for name in names}
        signature.update({"src_ptr": f"*{dtype}", "dst_ptr": f"*{dtype}", "partner_ptr": "*i32",
                          "src_box_ptr": "*i32", "dst_box_ptr": "*i32"})
        constants = {"PATCH": 16, "BLOCK_H": block_h, "BLOCK_W": 256, "COPY_REST": copy_rest, "s_w": 1, "d_w": 1}
        signature.update({name: "constexpr" for name in constants})
        aligned = {"H", "W", "s_b", "s_c", "s_h", "d_b", "d_c", "d_h"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if signature[name].startswith("*") or name in aligned}
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        accesses = set(re.findall(r"(ld|st)\.global\.v4", compiled.asm["ptx"]))
        assert accesses == {"ld", "st"}, f"{dtype} (copy_rest={copy_rest}): pixels do not move as 16-byte vectors"


def test_unfold_fold_baseline_pastes_the_same_windows() -> None:
    from cmcaug.benchmarks.bench_image_mix import make_case as bench_case
    from cmcaug.benchmarks.bench_image_mix import unfold_fold_paste

    case = bench_case(5, 48, torch.bfloat16, "cpu", seed=2)
    args = (case["images"], case["partner"], case["target_box"], case["source_box"])
    assert_exact(unfold_fold_paste(*args, 16), reference.paste_windows(*args, patch_size=16))
