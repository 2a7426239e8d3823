"""TiMix applied: optimal windows, the paste, lam and soft targets, CutMix equivalence, the relevance head.

The draws (partners, window sides, alpha, prob) are tested in tests/test_timix_draws.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import cmcaug
from cmcaug.errors import InputError
from cmcaug.kernels import paste_windows, reference
from cmcaug.losses import info_nce
from cmcaug.relevance import patch_alignment_loss, patch_labels_from_boxes
from cmcaug.timix import (
    MixResult,
    TextAwarePatchPredictor,
    choose_partners,
    find_windows,
    mix_lambda,
    mixed_contrastive_loss,
    soft_targets,
    text_aware_mix,
)
from timix_helpers import batch, seeded


def brute_force_windows(relevance: torch.Tensor, partner: torch.Tensor, sides: torch.Tensor):
    """Every window of every image, scanned top to bottom, left to right; the first strict best wins."""
    B, gh, gw = relevance.shape
    found = []
    for i in range(B):
        k, low, high = int(sides[i]), None, None
        for y in range(gh - k + 1):
            for x in range(gw - k + 1):
                own = relevance[i, y:y + k, x:x + k].double().sum().item()
                theirs = relevance[partner[i], y:y + k, x:x + k].double().sum().item()
                if low is None or own < low[0]:
                    low = (own, [x, y, x + k, y + k])
                if high is None or theirs > high[0]:
                    high = (theirs, [x, y, x + k, y + k])
        found.append((low, high))
    return found


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 5), gh=st.integers(1, 6), gw=st.integers(1, 6), ties=st.booleans())
def test_windows_are_optimal_against_brute_force(data, B, gh, gw, ties) -> None:
    g = seeded(data.draw(st.integers(0, 2**16)))
    # small integers make many exact ties, which must break the same way as the scan (top, then left)
    relevance = (torch.randint(0, 3, (B, gh, gw), generator=g).float() if ties
                 else torch.rand(B, gh, gw, generator=g))
    partner = torch.randperm(B, generator=g)
    sides = torch.tensor(data.draw(st.lists(st.integers(0, min(gh, gw)), min_size=B, max_size=B)))
    target, source = find_windows(relevance.double(), partner, sides)
    for i, (low, high) in enumerate(brute_force_windows(relevance, partner, sides)):
        if ties:
            assert target[i].tolist() == low[1] and source[i].tolist() == high[1]
        else:  # continuous scores: the window found attains the optimum
            x0, y0, x1, y1 = target[i].tolist()
            assert math.isclose(relevance[i, y0:y1, x0:x1].double().sum().item(), low[0], abs_tol=1e-9)
            x0, y0, x1, y1 = source[i].tolist()
            assert math.isclose(relevance[partner[i], y0:y1, x0:x1].double().sum().item(), high[0], abs_tol=1e-9)


def test_target_and_source_windows_may_differ() -> None:
    relevance = torch.zeros(2, 4, 4)
    relevance[0, 2:, 2:] = 5  # image 0: its caption lives bottom-right, so its top-left goes
    relevance[1, :2, 2:] = 5  # image 1: top-right matters most, and is what image 0 receives
    res = text_aware_mix(torch.zeros(2, 1, 8, 8), relevance, patch_size=2, window=2)
    assert res.target_box[0].tolist() == [0, 0, 2, 2] and res.source_box[0].tolist() == [2, 0, 4, 2]


def test_the_mix_is_the_paste_of_the_chosen_windows() -> None:
    images, relevance = batch(7, (5, 6), 3)
    res = text_aware_mix(images, relevance, patch_size=3, window="per_sample", partner="random",
                         generator=seeded(1))
    expected = reference.paste_windows(images, res.partner, res.target_box, res.source_box, patch_size=3)
    assert torch.equal(res.images, expected)
    sizes = res.target_box[:, 2:] - res.target_box[:, :2]
    assert torch.equal(sizes[:, 0], sizes[:, 1])  # square windows
    assert torch.equal(sizes, res.source_box[:, 2:] - res.source_box[:, :2])
    assert res.images.dtype == images.dtype and res.patch_size == 3


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16], ids=str)
def test_triton_and_reference_backends_mix_identically(dtype) -> None:
    images, relevance = batch(5, (3, 5), 4, dtype=dtype)
    mixed = [text_aware_mix(images, relevance, patch_size=4, generator=seeded(3), backend=backend)
             for backend in ("triton", "reference")]
    assert torch.equal(mixed[0].images, mixed[1].images) and torch.equal(mixed[0].lam, mixed[1].lam)


def test_non_square_grids() -> None:
    images, relevance = batch(4, (3, 7), 2)
    res = text_aware_mix(images, relevance, patch_size=2, window="per_sample", generator=seeded(5))
    sides = (res.target_box[:, 2] - res.target_box[:, 0]).tolist()
    assert all(1 <= k <= 2 for k in sides)  # the shorter side (3) bounds the window: 0.75 * 3 -> 2
    assert (res.target_box[:, 3] <= 3).all() and (res.target_box[:, 2] <= 7).all()


def test_input_is_untouched_unless_inplace() -> None:
    images, relevance = batch(4)
    before = images.clone()
    res = text_aware_mix(images, relevance, patch_size=4, generator=seeded(0))
    assert torch.equal(images, before) and not torch.equal(res.images, before)
    again = text_aware_mix(images, relevance, patch_size=4, generator=seeded(0), inplace=True)
    assert again.images is images and torch.equal(images, res.images)


def test_bad_inputs_are_refused() -> None:
    images, relevance = batch(2)
    with pytest.raises(InputError, match=r"relevance must be \[B, H // patch_size"):
        text_aware_mix(images, relevance[:, :3], patch_size=4)
    with pytest.raises(InputError, match="NaN"):
        text_aware_mix(images, relevance.masked_fill(relevance > 0.5, math.nan), patch_size=4)
    with pytest.raises(InputError, match="non-negative"):
        text_aware_mix(images, relevance - 1, patch_size=4, label_mode="relevance")
    with pytest.raises(InputError, match="label_mode"):
        text_aware_mix(images, relevance, patch_size=4, label_mode="mass")


def test_area_lambda_is_the_visible_fraction() -> None:
    images, relevance = batch(6, (5, 5), 2)
    res = text_aware_mix(images, relevance, patch_size=2, window="per_sample", generator=seeded(4))
    k = (res.target_box[:, 2] - res.target_box[:, 0]).float()
    assert torch.allclose(res.lam, 1 - k**2 / 25)
    assert torch.equal((res.images != images).flatten(1).any(1), res.lam < 1)


def test_relevance_lambda() -> None:
    uniform = torch.ones(4, 5, 5)
    images = torch.zeros(4, 1, 10, 10)
    area = text_aware_mix(images, uniform, patch_size=2, window=3)
    same = text_aware_mix(images, uniform, patch_size=2, window=3, label_mode="relevance")
    assert torch.allclose(area.lam, same.lam)  # uniform relevance: the area value

    relevance = torch.zeros(2, 2, 2)
    relevance[0] = torch.tensor([[0.0, 1.0], [1.0, 2.0]])  # total 4; its least relevant 1x1 window holds 0
    relevance[1] = torch.tensor([[3.0, 1.0], [0.0, 0.0]])  # total 4; its best 1x1 window holds 3
    res = text_aware_mix(torch.zeros(2, 1, 2, 2), relevance, patch_size=1, window=1, label_mode="relevance")
    kept, pasted = 1 - 0 / 4, 3 / 4  # image 0 keeps all its evidence and gains 3/4 of image 1's
    assert res.lam[0].item() == pytest.approx(kept / (kept + pasted))
    kept, pasted = 1 - 0 / 4, 2 / 4  # image 1 loses a zero patch and gains image 0's best (2 of 4)
    assert res.lam[1].item() == pytest.approx(kept / (kept + pasted))

    blank = text_aware_mix(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 2), patch_size=2, window=1,
                           label_mode="relevance")
    assert torch.allclose(blank.lam, torch.full((2,), 0.75))  # no evidence anywhere: area again


def test_soft_targets() -> None:
    images, relevance = batch(5)
    res = text_aware_mix(images, relevance, patch_size=4, window="per_sample", partner="random",
                         generator=seeded(8))
    p = torch.randn(5, 7).softmax(1)
    targets = soft_targets(p, res)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    for i in range(5):
        expected = res.lam[i] * p[i] + (1 - res.lam[i]) * p[res.partner[i]]
        assert torch.allclose(targets[i], expected)
    hard = soft_targets(torch.eye(5), res)
    moved = res.partner != torch.arange(5)
    assert torch.allclose(hard[torch.arange(5), torch.arange(5)][moved], res.lam[moved])
    assert soft_targets(p.bfloat16(), res).dtype == torch.float32  # low precision mixes in fp32
    precise = soft_targets(p.double(), res)
    assert precise.dtype == torch.float64 and torch.allclose(precise.sum(1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(InputError, match="one per mixed image"):
        soft_targets(torch.eye(4), res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_torchvision_cutmix_when_the_windows_coincide(seed, dtype) -> None:
    """torchvision's CutMix pastes images.roll(1, 0) into one box: TiMix's paste, lam and soft targets
    with partner="roll", 1-pixel patches and that box as both source and target give the same batch."""
    v2 = pytest.importorskip("torchvision.transforms.v2", reason="the GPU machines' image has no torchvision")

    images = torch.randint(0, 256, (6, 3, 20, 17), generator=seeded(seed)).to(dtype)
    labels = torch.arange(6)
    cutmix = v2.CutMix(num_classes=6)
    torch.manual_seed(seed)
    params = cutmix.make_params([images])
    torch.manual_seed(seed)
    expected_images, expected_labels = cutmix(images, labels)

    partner = choose_partners(6, "roll")
    box = torch.tensor([params["box"]]).repeat(6, 1)
    for backend in ("triton", "reference"):
        mixed = paste_windows(images, partner, box, box, patch_size=1, backend=backend)
        assert torch.equal(mixed, expected_images)
    lam = mix_lambda(torch.zeros(6, 20, 17), partner, box, box, "area")
    assert torch.allclose(lam, torch.full((6,), params["lam_adjusted"]))
    res = MixResult(mixed, lam, partner, box, box, 1, lam, partner)
    assert torch.allclose(soft_targets(F.one_hot(labels, 6).float(), res), expected_labels)


def test_equals_batch_cutmix_when_relevance_is_flat() -> None:
    """Flat relevance makes every window tie, so both windows go top-left: the timm-style batch CutMix
    `x[..., :s, :s] = x.flip(0)[..., :s, :s]` with lam = 1 - box area / image area."""
    images, _ = batch(6, (5, 5), 4)
    res = text_aware_mix(images, torch.ones(6, 5, 5), patch_size=4, window=3)
    expected = images.clone()
    expected[..., :12, :12] = images.flip(0)[..., :12, :12]
    assert torch.equal(res.images, expected)
    assert torch.allclose(res.lam, torch.full((6,), 1 - 12 * 12 / (20 * 20)))


def test_mixed_contrastive_loss() -> None:
    g = seeded(0)
    image, text = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g)
    plain = mixed_contrastive_loss(image, text, torch.eye(6))
    assert torch.allclose(plain, info_nce(image, text))  # nothing mixed: InfoNCE

    targets = torch.eye(6) * 0.7 + torch.eye(6).roll(1, 1) * 0.3  # image i holds 30 % of text i + 1
    loss = mixed_contrastive_loss(image, text, targets, temperature=0.1)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.1
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    columns = targets.T / targets.T.sum(1, keepdim=True)
    t2i = -(columns * logits.T.log_softmax(1)).sum(1).mean()
    assert torch.allclose(loss, (i2t + t2i) / 2)
    loss.backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    with pytest.raises(InputError, match="targets must be"):
        mixed_contrastive_loss(image, text, torch.eye(5))


def test_predictor_head_learns_patch_relevance_and_feeds_text_aware_mix() -> None:
    """A patch is relevant when its features carry the caption's vector; a few steps teach the head."""
    torch.manual_seed(0)
    B, grid, dim = 8, (4, 4), 16
    text = F.normalize(torch.randn(B, dim), dim=-1)
    labels = torch.rand(B, *grid) < 0.3
    patches = torch.randn(B, grid[0] * grid[1], dim) * 0.5 + labels.view(B, -1, 1) * text[:, None] * 3
    head = TextAwarePatchPredictor(dim, dim)
    assert cmcaug.TextAwarePatchPredictor is TextAwarePatchPredictor
    assert head(patches, text).shape == (B, 16, 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = patch_alignment_loss(head(patches, text), labels, positive_weight=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    relevance = head.relevance(patches, text, grid)
    assert relevance.shape == (B, *grid) and ((relevance >= 0) & (relevance <= 1)).all()
    assert ((relevance > 0.5) == labels).float().mean() > 0.9
    res = text_aware_mix(torch.zeros(B, 3, 32, 32), relevance, patch_size=8, label_mode="relevance")
    assert res.lam.shape == (B,)
    with pytest.raises(InputError, match="do not fill"):
        head.relevance(patches, text, (3, 5))


def test_patch_labels_from_boxes() -> None:
    boxes = [
        torch.tensor([[0.0, 0.0, 20.0, 10.0]]),  # pixels of a 40 x 40 image: top-left 2 x 1 patches of 10
        torch.tensor([[31.0, 31.0, 33.0, 33.0]]),  # smaller than a patch: only its center's patch
        torch.zeros(0, 4),
        torch.tensor([[5.0, 0.0, 16.0, 10.0]]),  # half of patch (0, 0), 60 % of patch (0, 1)
    ]
    labels = patch_labels_from_boxes(boxes, (4, 4), image_size=(40, 40))
    assert labels[0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert labels[1].nonzero().tolist() == [[3, 3]]
    assert not labels[2].any()
    assert labels[3].nonzero().tolist() == [[0, 0], [0, 1]]
    strict = patch_labels_from_boxes(boxes[3:], (4, 4), image_size=(40, 40), min_overlap=0.55)
    assert strict[0].nonzero().tolist() == [[0, 1]]
    fractions = patch_labels_from_boxes([torch.tensor([[0.5, 0.5, 1.0, 1.0]])], (2, 4))
    assert fractions[0].tolist() == [[False, False, False, False], [False, False, True, True]]


def test_patch_alignment_loss_is_cross_entropy() -> None:
    logits, labels = torch.randn(2, 6, 2), torch.rand(2, 2, 3) > 0.5
    assert torch.allclose(patch_alignment_loss(logits, labels),
                          F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1).long()))
    with pytest.raises(InputError):
        patch_alignment_loss(logits, labels[:, :1])


@pytest.mark.gpu
def test_cuda_mix_matches_cpu() -> None:
    images, relevance = batch(9, (14, 14), 16, dtype=torch.bfloat16)
    cpu = text_aware_mix(images, relevance, patch_size=16, window="per_sample", generator=seeded(0))
    gpu = text_aware_mix(images.cuda(), relevance.cuda(), patch_size=16, window="per_sample",
                         generator=seeded(0))
    for field in ("images", "lam", "partner", "target_box", "source_box"):
        assert torch.equal(getattr(gpu, field).cpu(), getattr(cpu, field))


@pytest.mark.gpu
def test_patch_labels_from_boxes_on_cuda() -> None:
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 10.0]]), torch.tensor([[31.0, 31.0, 33.0, 33.0]])]
    on_gpu = patch_labels_from_boxes([b.cuda() for b in boxes], (4, 4), image_size=(40, 40))
    assert torch.equal(on_gpu, patch_labels_from_boxes(boxes, (4, 4), image_size=(40, 40)))


def test_mix_result_repr_is_compact() -> None:
    res = text_aware_mix(torch.rand(3, 3, 32, 32), torch.rand(3, 2, 2), patch_size=16, window=1, partner="flip")
    assert repr(res) == ("MixResult(images=[3, 3, 32, 32] torch.float32, patch_size=16, lam=[0.75, 0.75, 0.75], "
                         "partner=[2, 0, 1])")
