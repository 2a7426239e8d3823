"""MixGen: blended images and joined captions, from the clean batch, without touching the input."""
from __future__ import annotations

import pytest
import torch

from cmcaug._generator import beta
from cmcaug.errors import InputError
from cmcaug.mixgen import mixgen, mixgen_batch

CAPTIONS = [f"caption {i}" for i in range(8)]


def images(dtype: torch.dtype = torch.float32, b: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 5, 4), generator=torch.Generator().manual_seed(0)).to(dtype)


def test_mixgen_blends_the_first_quarter_with_the_next() -> None:
    x = images()
    before = x.clone()
    mixed, captions = mixgen(x, CAPTIONS)
    assert torch.equal(x, before) and captions is not CAPTIONS  # non-destructive
    assert torch.equal(mixed[:2], 0.5 * x[:2] + 0.5 * x[2:4]) and torch.equal(mixed[2:], x[2:])
    assert captions[:3] == ["caption 0 caption 2", "caption 1 caption 3", "caption 2"]
    assert captions[2:] == CAPTIONS[2:]


def test_mixgen_options() -> None:
    x = images()
    mixed, captions = mixgen(x, CAPTIONS, num=4, lam=0.75)
    assert torch.allclose(mixed[:4], 0.75 * x[:4] + 0.25 * x[4:]) and captions[3] == "caption 3 caption 7"
    same, unchanged = mixgen(x, CAPTIONS, num=0)
    assert torch.equal(same, x) and unchanged == CAPTIONS
    mine, names = x.clone(), list(CAPTIONS)
    out, joined = mixgen(mine, names, inplace=True)
    assert out is mine and joined is names and torch.equal(mine, mixgen(x, CAPTIONS)[0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_images_blend_in_float32(dtype) -> None:
    x = images(dtype)
    mixed, _ = mixgen(x, CAPTIONS, lam=0.3)
    exact = 0.3 * x[:2].float() + 0.7 * x[2:4].float()
    expected = exact.round().to(dtype) if dtype == torch.uint8 else exact.to(dtype)
    assert mixed.dtype == dtype and torch.equal(mixed[:2], expected)


def test_mixgen_batch_is_seeded_and_reads_the_clean_batch() -> None:
    x = images()
    first = mixgen_batch(x, CAPTIONS, generator=torch.Generator().manual_seed(3))
    again = mixgen_batch(x, CAPTIONS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    for i, j in enumerate(perm.tolist()):
        if i == j:  # drawn as its own partner: left alone
            assert torch.equal(first[0][i], x[i]) and first[1][i] == CAPTIONS[i]
        else:  # blended with the partner's clean image, even when the partner was mixed already
            assert torch.equal(first[0][i], 0.5 * x[i] + 0.5 * x[j])
            assert first[1][i] == f"{CAPTIONS[i]} {CAPTIONS[j]}"
    head, _ = mixgen_batch(x, CAPTIONS, num=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(head[3:], x[3:])


def test_alpha_draws_lam_from_beta_once_per_call() -> None:
    x = images()
    mixed, captions = mixgen(x, CAPTIONS, alpha=0.4, generator=torch.Generator().manual_seed(7))
    lam = float(beta(0.4, 1, torch.Generator().manual_seed(7))[0])
    assert 0 < lam < 1 and lam != 0.5
    assert torch.allclose(mixed[:2], lam * x[:2] + (1 - lam) * x[2:4]) and torch.equal(mixed[2:], x[2:])
    assert captions == mixgen(x, CAPTIONS)[1]  # captions do not depend on lam
    again, _ = mixgen(x, CAPTIONS, alpha=0.4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mixed, again)
    draws = {round(float(beta(0.4, 1, torch.Generator().manual_seed(s))[0]), 6) for s in range(20)}
    assert len(draws) == 20  # a new lam for every generator state


def test_mixgen_batch_with_alpha_draws_lam_then_partners() -> None:
    g = torch.Generator().manual_seed(3)
    mixed, _ = mixgen_batch(images(), CAPTIONS, alpha=2.0, generator=g)
    g = torch.Generator().manual_seed(3)
    lam = float(beta(2.0, 1, g)[0])
    perm = torch.randperm(8, generator=g)
    x = images()
    for i, j in enumerate(perm.tolist()):
        assert torch.allclose(mixed[i], x[i] if i == j else lam * x[i] + (1 - lam) * x[j])


def test_bad_arguments_are_refused() -> None:
    x = images()
    with pytest.raises(InputError, match="one caption per image"):
        mixgen(x, CAPTIONS[:7])
    with pytest.raises(InputError, match="sequence of str"):
        mixgen(x, "caption")
    with pytest.raises(InputError, match=r"num must lie in \[0, B // 2\]"):
        mixgen(x, CAPTIONS, num=5)
    with pytest.raises(InputError, match=r"num must lie in \[0, B\]"):
        mixgen_batch(x, CAPTIONS, num=9)
    with pytest.raises(InputError, match="lam"):
        mixgen(x, CAPTIONS, lam=1.5)
    with pytest.raises(InputError, match="not both"):
        mixgen(x, CAPTIONS, lam=0.5, alpha=1.0)
    with pytest.raises(InputError, match="alpha must be a positive"):
        mixgen_batch(x, CAPTIONS, alpha=0.0)
