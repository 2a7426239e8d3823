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
