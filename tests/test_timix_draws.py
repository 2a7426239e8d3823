"""TiMix draws: partners (every image mixed for B >= 2, derangements, fixed points flagged), window sides (the
paper's ratio range, Beta-drawn areas), the apply probability, and reproducibility from one generator."""
from __future__ import annotations

import math

import pytest
import torch

from cmcaug._generator import beta
from cmcaug.errors import InputError
from cmcaug.timix import choose_partners, draw_window_sides, text_aware_mix
from timix_helpers import batch, seeded


def test_window_side_draws_follow_the_paper_range() -> None:
    on_16 = {int(draw_window_sides((16, 16), 1, generator=seeded(s))[0]) for s in range(300)}
    assert on_16 == set(range(5, 13))  # the paper's 256-pixel images, 16-pixel patches: int(16 * 0.35) = 5
    on_7 = {int(draw_window_sides((7, 7), 1, generator=seeded(s))[0]) for s in range(100)}
    assert on_7 == {2, 3, 4, 5}  # the ratio bounds the side: 5 x 5 of 7 x 7 is half the image
    low, high = int(0.35 * 14), int(0.75 * 14)  # TPMix: self.min_side = int(side * min_side_ratio)
    per_batch = {int(draw_window_sides((14, 14), 3, generator=seeded(s))[0]) for s in range(300)}
    assert per_batch == set(range(low, high + 1))
    per_sample = draw_window_sides((14, 20), 500, "per_sample", generator=seeded(0))
    assert set(per_sample.tolist()) == set(range(low, high + 1))
    assert len(set(draw_window_sides((14, 14), 8, generator=seeded(1)).tolist())) == 1
    assert draw_window_sides((3, 9), 4, 2).tolist() == [2] * 4
    assert draw_window_sides((1, 1), 2).tolist() == [1, 1]  # tiny grids still mix one patch


@pytest.mark.parametrize(("window", "ratio", "message"), [
    (4, (0.35, 0.75), r"window sides must lie in \[0, 3\]"),
    (torch.tensor([1.0, 2.0]), (0.35, 0.75), "integer sides"),
    ("square", (0.35, 0.75), "window must be"),
    (None, (0.8, 0.4), "window_ratio"),
])
def test_bad_windows_are_refused(window, ratio, message) -> None:
    with pytest.raises(InputError, match=message):
        draw_window_sides((3, 5), 2, window, ratio)


@pytest.mark.parametrize(("grid", "window"), [((7, 7), "per_sample"), ((3, 12), "per_sample"), ((16, 16), None)])
def test_alpha_draws_the_kept_area_from_beta(grid, window) -> None:
    """k = round(sqrt((1 - lam) * grid area)) with lam ~ Beta(alpha, alpha), clipped to the shorter side."""
    sides = draw_window_sides(grid, 400, window, alpha=0.3, generator=seeded(3))
    lam = beta(0.3, 400 if window else 1, seeded(3))
    expected = ((1 - lam) * grid[0] * grid[1]).sqrt().round().clamp(max=min(grid)).long()
    assert torch.equal(sides, expected.expand(400))
    if window == "per_sample":
        assert sides.min() == 0 and sides.max() == min(grid)  # lam near 1 pastes nothing, near 0 most
    peaked = draw_window_sides((7, 7), 50, "per_sample", alpha=1000.0, generator=seeded(0))
    assert set(peaked.tolist()) == {5}  # lam ~ 0.5: half of 49 patches, round(sqrt(24.5)) = 5


def test_alpha_mixes_report_the_area_kept() -> None:
    images, relevance = batch(64, (5, 5), 2)
    res = text_aware_mix(images, relevance, patch_size=2, window="per_sample", alpha=0.5, generator=seeded(1))
    k = (res.target_box[:, 2] - res.target_box[:, 0]).float()
    assert torch.allclose(res.lam, 1 - k**2 / 25) and len(set(k.tolist())) > 3
    assert torch.equal(res.unmixed, k == 0) and torch.equal(res.images[res.unmixed], images[res.unmixed])
    with pytest.raises(InputError, match="alpha draws the window side"):
        text_aware_mix(images, relevance, patch_size=2, window=2, alpha=1.0)
    for alpha in (0.0, -1.0, math.inf, True):
        with pytest.raises(InputError, match="alpha must be a positive"):
            draw_window_sides((5, 5), 2, alpha=alpha)


def test_prob_mixes_each_image_with_that_probability() -> None:
    images, relevance = batch(400, (4, 4), 2)
    res = text_aware_mix(images, relevance, patch_size=2, prob=0.3, generator=seeded(2))
    assert 0.22 < (~res.unmixed).float().mean() < 0.38
    alone = res.unmixed
    assert torch.equal(res.images[alone], images[alone]) and (res.lam[alone] == 1).all()
    assert torch.equal(res.partner[alone], torch.arange(400)[alone])
    assert (res.images[~alone] != images[~alone]).flatten(1).any(1).all()
    none = text_aware_mix(images, relevance, patch_size=2, prob=0.0)
    assert none.unmixed.all() and torch.equal(none.images, images)
    default = text_aware_mix(images, relevance, patch_size=2, generator=seeded(2))
    every = text_aware_mix(images, relevance, patch_size=2, prob=1.0, generator=seeded(2))
    assert torch.equal(default.images, every.images) and not every.unmixed.any()  # prob = 1 draws nothing
    for prob in (-0.1, 1.5):
        with pytest.raises(InputError, match="prob"):
            text_aware_mix(images, relevance, patch_size=2, prob=prob)


def test_validate_false_skips_only_the_host_sync_of_a_sides_tensor() -> None:
    """A tensor of sides (on a GPU, a host sync to check) is trusted; an int costs nothing to check, so it is."""
    assert draw_window_sides((3, 5), 2, torch.tensor([4, 1]), validate=False).tolist() == [4, 1]
    with pytest.raises(InputError, match="window sides must lie"):
        draw_window_sides((3, 5), 2, 4, validate=False)


def test_partners() -> None:
    assert choose_partners(6, "flip").tolist() == [5, 4, 3, 2, 1, 0]  # the published pairing
    assert choose_partners(5, "flip").tolist() == [4, 3, 1, 2, 0]  # odd: the middle three form a cycle
    assert choose_partners(3, "flip").tolist() == [2, 0, 1]
    assert torch.equal(torch.arange(5)[choose_partners(5, "roll")], torch.arange(5).roll(1, 0))
    perm = choose_partners(6, "random", generator=seeded(2))
    assert sorted(perm.tolist()) == list(range(6))
    assert torch.equal(perm, choose_partners(6, "random", generator=seeded(2)))
    assert choose_partners(3, torch.tensor([2, 2, 0])).tolist() == [2, 2, 0]
    with pytest.raises(InputError, match=r"lie in \[0, 3\)"):
        choose_partners(3, torch.tensor([0, 1, 3]))
    with pytest.raises(InputError, match="partner must be"):
        choose_partners(3, "shuffle")


@pytest.mark.parametrize("partner", ["flip", "roll", "derangement"])
@pytest.mark.parametrize("b", [2, 3, 4, 5, 7, 8, 9])
def test_every_image_of_a_batch_of_two_or_more_is_mixed(partner, b) -> None:
    partners = choose_partners(b, partner, generator=seeded(b))
    assert sorted(partners.tolist()) == list(range(b)) and not (partners == torch.arange(b)).any()
    images, relevance = batch(b)
    res = text_aware_mix(images, relevance, patch_size=4, partner=partner, generator=seeded(b))
    assert not res.unmixed.any() and (res.lam < 1).all()
    assert (res.images != images).flatten(1).any(1).all()


def test_derangements_are_uniform_and_seeded() -> None:
    draws = [tuple(choose_partners(4, "derangement", generator=seeded(s)).tolist()) for s in range(900)]
    counts = {d: draws.count(d) for d in set(draws)}
    assert len(counts) == 9 and all(60 < n < 140 for n in counts.values())  # 9 derangements of 4, ~100 each
    again = choose_partners(4, "derangement", generator=seeded(5))
    assert torch.equal(again, torch.tensor(draws[5]))


def test_random_partners_leave_fixed_points_unmixed_and_say_so() -> None:
    images, relevance = batch(4)
    res = text_aware_mix(images, relevance, patch_size=4, partner="random", generator=seeded(0))
    assert res.unmixed.tolist() == [True, True, False, False]  # this seed draws images 0 and 1 as their own
    assert res.partner[:2].tolist() == [0, 1] and res.lam[:2].tolist() == [1.0, 1.0]
    assert torch.equal(res.images[:2], images[:2]) and not torch.equal(res.images[2:], images[2:])
    explicit = text_aware_mix(images, relevance, patch_size=4, window=torch.tensor([0, 1, 1, 1]))
    assert explicit.unmixed.tolist() == [True, False, False, False] and explicit.partner[0] == 0


def test_a_batch_of_one_is_returned_unchanged() -> None:
    images, relevance = batch(1)
    for partner in ("flip", "roll", "derangement", "random"):
        res = text_aware_mix(images, relevance, patch_size=4, partner=partner, label_mode="relevance")
        assert torch.equal(res.images, images) and res.lam.tolist() == [1.0] and res.partner.tolist() == [0]
        assert res.unmixed.tolist() == [True]
    assert choose_partners(0, "derangement").tolist() == []


@pytest.mark.parametrize("options", [
    {"window": "per_sample", "partner": "random"},
    {"window": "per_sample", "partner": "derangement", "alpha": 0.4, "prob": 0.5},
    {"alpha": 2.0, "prob": 0.8},
], ids=["random", "derangement-alpha-prob", "batch-alpha"])
def test_seeded_draws_are_reproducible(options) -> None:
    images, relevance = batch(8)
    runs = [text_aware_mix(images, relevance, patch_size=4, generator=seeded(11), **options) for _ in range(2)]
    for field in ("images", "lam", "partner", "target_box", "source_box"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field))
    other = text_aware_mix(images, relevance, patch_size=4, generator=seeded(12), **options)
    assert not torch.equal(other.images, runs[0].images)


@pytest.mark.gpu
def test_cuda_generators_draw_every_option_reproducibly() -> None:
    images, relevance = batch(9, (14, 14), 16, dtype=torch.bfloat16)
    runs = [text_aware_mix(images.cuda(), relevance.cuda(), patch_size=16, window="per_sample", alpha=1.0, prob=0.7,
                           partner="derangement", generator=torch.Generator("cuda").manual_seed(0)) for _ in range(2)]
    for field in ("images", "lam", "partner", "target_box", "source_box"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field))
    assert runs[0].images.is_cuda and runs[0].unmixed.is_cuda
