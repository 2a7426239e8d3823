"""normalize_patches: the fused Triton kernel against the reference, and the reference against the formula."""
from __future__ import annotations

import pytest
import torch
from compare import TOLERANCE, assert_close, assert_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmcaug.errors import InputError
from cmcaug.kernels import normalize_patches
from cmcaug.kernels.patch_gather import patch_gather
from cmcaug.kernels.reference import patch_affine
from cmcaug.kernels.reference import patch_gather as reference_patch_gather

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise on the CPU (interpreter and reference round the same fp32 numbers); on a GPU the kernel may
    fuse the multiply-add (one fp32 rounding less), so within one step of the output dtype."""
    (assert_exact if actual.device.type == "cpu" else assert_close)(actual, expected)


def make_pixels(n: int, h: int, w: int, c: int, layout: str, seed: int, device: str) -> torch.Tensor:
    """Random uint8 [N, H, W, C] pixels with the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    shape = {"contiguous": (n, h, w, c), "every_other_patch": (2 * n, h, w, c), "cropped": (n, h + 2, w + 3, c),
             "planar": (n, c, h, w)}[layout]
    base = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    view = {"contiguous": lambda x: x, "every_other_patch": lambda x: x[::2],
            "cropped": lambda x: x[:, 1:h + 1, 2:w + 2], "planar": lambda x: x.permute(0, 2, 3, 1)}[layout](base)
    assert view.shape == (n, h, w, c)
    return view


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 5), h=st.integers(1, 13), w=st.integers(1, 13), c=st.integers(1, 4),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "every_other_patch", "cropped", "planar"]),
       index=st.none() | st.lists(st.integers(0, 4), max_size=7), seed=st.integers(0, 2**16),
       blocks=st.sampled_from([(None, None), (1, 16), (4, 32)]))
def test_triton_matches_reference(triton_device, n, h, w, c, dtype, layout, index, seed, blocks) -> None:
    pixels = make_pixels(n, h, w, c, layout, seed, triton_device)
    rows = None if index is None else torch.tensor([i for i in index if i < n], dtype=torch.int64, device=triton_device)
    mean = torch.linspace(0.3, 0.6, c).tolist()
    std = torch.linspace(0.2, 0.3, c).tolist()
    affine = patch_affine(mean, std, c, torch.device(triton_device))
    got = patch_gather(pixels, rows, affine, dtype, block_m=blocks[0], block_q=blocks[1])
    assert_matches(got, reference_patch_gather(pixels, rows, affine, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_the_formula(dtype) -> None:
    pixels = make_pixels(3, 7, 5, 3, "contiguous", 0, "cpu")
    got = normalize_patches(pixels, CLIP_MEAN, CLIP_STD, dtype, backend="reference")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    want = (pixels.permute(0, 3, 1, 2).double() / 255 - mean) / std
    assert got.shape == (3, 3, 7, 5) and got.is_contiguous() and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[dtype], atol=1e-5)


def test_index_gathers_rows_and_defaults_to_bfloat16(triton_device) -> None:
    pixels = make_pixels(6, 4, 4, 3, "contiguous", 1, triton_device)
    index = torch.tensor([5, 0, 5], device=triton_device, dtype=torch.int32)
    got = normalize_patches(pixels, CLIP_MEAN, CLIP_STD, index=index, backend="triton")
    assert got.dtype == torch.bfloat16 and got.shape == (3, 3, 4, 4)
    assert_matches(got, normalize_patches(pixels[index.long()], CLIP_MEAN, CLIP_STD, backend="reference"))
    assert torch.equal(got[0], got[2])


def test_accepts_tensor_statistics() -> None:
    pixels = make_pixels(2, 3, 3, 3, "contiguous", 2, "cpu")
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float64), torch.tensor(CLIP_STD, dtype=torch.float64)
    a = normalize_patches(pixels, mean, std, torch.float32)
    assert torch.equal(a, normalize_patches(pixels, list(CLIP_MEAN), list(CLIP_STD), torch.float32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pixels": torch.zeros(2, 4, 4, 3)}, "uint8 tensor"),
        ({"pixels": torch.zeros(4, 4, 3, dtype=torch.uint8)}, "uint8 tensor"),
        ({"mean": (0.5, 0.5)}, "mean must hold 3"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"std": (0.5, float("nan"), 0.5)}, "finite"),
        ({"dtype": torch.int32}, "floating-point"),
        ({"index": torch.tensor([0.0])}, "1-D integer tensor"),
        ({"index": torch.tensor([[0]])}, "1-D integer tensor"),
        ({"index": torch.tensor([0, 2])}, r"in \[0, 2\)"),
        ({"index": torch.tensor([-1])}, r"in \[0, 2\)"),
        ({"index": torch.tensor([0], device="meta")}, "index is on meta"),
        ({"backend": "gpu"}, "backend must be"),
    ],
)
def test_errors(kwargs: dict, message: str) -> None:
    args = {"pixels": torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "mean": CLIP_MEAN, "std": CLIP_STD} | kwargs
    with pytest.raises(InputError, match=message):
        normalize_patches(**args)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_as_one_graph(triton_device, backend: str) -> None:
    """`torch.compile(fullgraph=True)` traces a patch encoder's input step (a registered operator: no graph
    break) and returns eager's values; a bad index is still refused, by the operator itself."""
    pixels = make_pixels(6, 5, 3, 3, "contiguous", 3, triton_device)
    index = torch.tensor([4, 0, 4, 2], device=triton_device)

    def step(rows: torch.Tensor) -> torch.Tensor:
        return normalize_patches(pixels, CLIP_MEAN, CLIP_STD, torch.float32, index=rows, backend=backend).relu()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(index), step(index))
    if triton_device == "cpu":
        with pytest.raises(InputError, match=r"index values must lie in \[0, 6\)"):
            compiled(index + 3)


@pytest.mark.parametrize("with_index", [False, True])
def test_operator_passes_opcheck(with_index: bool) -> None:
    """The registration torch.compile relies on (schema, fake tensor) agrees with the implementation."""
    pixels = make_pixels(4, 3, 5, 3, "contiguous", 4, "cpu")
    index = torch.tensor([3, 0, 3]) if with_index else None
    affine = patch_affine(CLIP_MEAN, CLIP_STD, 3, torch.device("cpu"))
    torch.library.opcheck(torch.ops.cmcaug.normalize_patches, (pixels, index, affine, torch.bfloat16, "reference"))
