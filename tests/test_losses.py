"""Contrastive losses: InfoNCE as CLIP computes it, and its soft-target form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.errors import InputError
from cmcaug.losses import contrastive_logits, info_nce, soft_info_nce


def features(n: int = 5, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_info_nce_is_clip_loss() -> None:
    a, b = features()
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.05
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(info_nce(a, b, temperature=0.05), expected)
    assert torch.allclose(info_nce(a, b), info_nce(b, a))  # symmetric


def test_info_nce_options_and_precision() -> None:
    a, b = features()
    raw = a @ b.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(raw, labels) + F.cross_entropy(raw.T, labels)) / 2
    assert torch.allclose(info_nce(a, b, temperature=1.0, normalize=False), expected)
    low = info_nce(a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32  # bf16 features, float32 logits
    assert torch.allclose(low, info_nce(a.bfloat16().float(), b.bfloat16().float()))
    assert info_nce(a, a, temperature=0.01) < 1e-3  # identical views: nothing left to learn


def test_gradients_reach_both_views() -> None:
    a, b = (t.requires_grad_() for t in features())
    info_nce(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_bad_arguments_are_refused() -> None:
    a, b = features()
    with pytest.raises(InputError, match="same D"):
        contrastive_logits(a, b[:, :4])
    with pytest.raises(InputError, match="temperature"):
        info_nce(a, b, temperature=0.0)
    with pytest.raises(InputError, match="row i of b"):
        info_nce(a, b[:4])
    with pytest.raises(InputError, match="both be"):
        soft_info_nce(torch.zeros(3, 4), torch.zeros(3, 5))


def test_soft_info_nce_with_one_hot_targets_is_cross_entropy() -> None:
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 5, 2, 2])
    assert torch.allclose(soft_info_nce(logits, F.one_hot(labels, 6).float()), F.cross_entropy(logits, labels))


def test_targets_carry_no_gradient() -> None:
    logits, targets = torch.randn(3, 3, requires_grad=True), torch.rand(3, 3).softmax(1).requires_grad_()
    soft_info_nce(logits, targets).backward()
    assert targets.grad is None and logits.grad is not None


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_soft_info_nce_is_at_least_the_target_entropy(rows, cols, seed) -> None:
    """Gibbs: H(t, softmax(z)) >= H(t), with equality when z = log t."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(rows, cols, generator=g).add(0.01).softmax(1)
    entropy = -(targets * targets.log()).sum(1).mean()
    assert soft_info_nce(torch.randn(rows, cols, generator=g), targets) >= entropy - 1e-6
    assert torch.allclose(soft_info_nce(targets.log(), targets), entropy, atol=1e-6)


# -- hard negatives --------------------------------------------------------------------------------


def test_hard_negatives_join_the_a_to_b_direction_only() -> None:
    a, b = features()
    hard = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1))
    an, bn, hn = F.normalize(a, dim=-1), F.normalize(b, dim=-1), F.normalize(hard, dim=-1)
    labels = torch.arange(5)
    forward = torch.cat([an @ bn.T, torch.stack([hn[i] @ an[i] for i in range(5)])], dim=1) / 0.1  # [5, 5 + 3]
    expected = (F.cross_entropy(forward, labels) + F.cross_entropy((an @ bn.T).T / 0.1, labels)) / 2
    torch.testing.assert_close(info_nce(a, b, temperature=0.1, hard_negatives=hard), expected)
    raw = torch.cat([a @ b.T, torch.einsum("nd,nkd->nk", a, hard)], dim=1)
    expected_raw = (F.cross_entropy(raw, labels) + F.cross_entropy((a @ b.T).T, labels)) / 2
    torch.testing.assert_close(info_nce(a, b, temperature=1.0, normalize=False, hard_negatives=hard), expected_raw)
    assert info_nce(a, b, hard_negatives=hard) > info_nce(a, b)  # more candidates: a larger a->b loss


def test_without_hard_negatives_the_loss_is_unchanged_bit_for_bit() -> None:
    a, b = features(7, 16, seed=3)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.07
    labels = torch.arange(7)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.equal(info_nce(a, b), expected)
    assert torch.equal(info_nce(a, b, hard_negatives=None, hard_negative_mask=None), expected)


def test_masked_hard_negatives_are_as_if_dropped() -> None:
    a, b = features(4, 8)
    hard = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([True, False, True])
    mask = keep.expand(4, 3)
    torch.testing.assert_close(info_nce(a, b, hard_negatives=hard, hard_negative_mask=mask),
                               info_nce(a, b, hard_negatives=hard[:, keep]))
    none = torch.zeros(4, 3, dtype=torch.bool)
    torch.testing.assert_close(info_nce(a, b, hard_negatives=hard, hard_negative_mask=none), info_nce(a, b))
    rows = torch.tensor([[True, True, True], [False, False, False], [True, True, True], [False, False, False]])
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.07  # per-row masks: rows 1 and 3 see none
    hard_logits = torch.einsum("nd,nkd->nk", F.normalize(a, dim=-1), F.normalize(hard, dim=-1)) / 0.07
    labels = torch.arange(4)
    per_row = [F.cross_entropy(torch.cat([logits[i], hard_logits[i]])[None] if rows[i].any() else logits[i][None],
                               labels[i: i + 1]) for i in range(4)]
    expected = (torch.stack(per_row).mean() + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(info_nce(a, b, hard_negatives=hard, hard_negative_mask=rows), expected)


def test_gradients_reach_the_hard_negatives() -> None:
    a, b = (t.requires_grad_() for t in features())
    hard = torch.randn(5, 2, 8, requires_grad=True)
    mask = torch.tensor([[True, False]] * 5)
    info_nce(a, b, hard_negatives=hard, hard_negative_mask=mask).backward()
    assert hard.grad[:, 0].abs().sum(-1).gt(0).all() and (hard.grad[:, 1] == 0).all()  # masked: no gradient
    assert torch.isfinite(a.grad).all() and b.grad.abs().sum() > 0


def test_bad_hard_negatives_are_refused() -> None:
    a, b = features()
    with pytest.raises(InputError, match=r"hard_negatives must be \[N, H, D\] = \[5, H, 8\]"):
        info_nce(a, b, hard_negatives=torch.zeros(5, 8))
    with pytest.raises(InputError, match="hard_negatives must be"):
        info_nce(a, b, hard_negatives=torch.zeros(4, 2, 8))
    with pytest.raises(InputError, match=r"hard_negative_mask must be a bool tensor \[N, H\] = \[5, 2\]"):
        info_nce(a, b, hard_negatives=torch.zeros(5, 2, 8), hard_negative_mask=torch.ones(5, 2))
    with pytest.raises(InputError, match="without hard_negatives"):
        info_nce(a, b, hard_negative_mask=torch.ones(5, 2, dtype=torch.bool))
