"""Contrastive losses shared by the augmentations: in-batch InfoNCE and its soft-target form.

Both views of an image-text pair (CLIP-style image/text, or CMC's text view and its cross-modal-CutMix view)
are scored with `contrastive_logits`: cosine similarities divided by a temperature, computed in float32 so
bf16 features do not lose the small differences the softmax amplifies.

- `info_nce(a, b)`: row i of `a` and row i of `b` are the positive pair, every other row a negative; the
  loss is symmetric (a->b and b->a cross entropy, averaged), as in CLIP and ALBEF. `hard_negatives` add
  per-row candidates to the a->b direction (CMC's hard patch negatives, `cmcaug.negatives`).
- `soft_info_nce(logits, targets)`: cross entropy against a full target distribution per row, the form mixed
  samples need (TiMix: lam * P_i + (1 - lam) * P_partner).

To use features gathered across GPUs, gather them first and pass the gathered tensors; nothing here
communicates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def contrastive_logits(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07,
                       normalize: bool = True) -> torch.Tensor:
    """[N, M] float32 similarities a @ b.T / temperature, of L2-normalized rows unless `normalize=False`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"features must be [N, D] and [M, D] with the same D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T / temperature


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07, normalize: bool = True, *,
             hard_negatives: torch.Tensor | None = None, hard_negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of paired features `a` [N, D] and `b` [N, D]; a scalar float32 tensor.

    Rows with the same index are positives, all other rows of the batch negatives. `normalize=False` when
    the features are already unit vectors (or when raw dot products are wanted). `hard_negatives` [N, H, D]
    are H more candidates for row i of `a` only (a->b: logits `a_i . b_j` for all j, then `a_i . h_ih`);
    b->a is unchanged. In-batch rows differ in their words; a hard negative (the same caption, other
    concepts' patches) differs only where the patches are, so only the patches can tell it apart.
    `hard_negative_mask` [N, H] (bool) drops the False entries, as if they were not there.
    """
    if a.shape[0] != b.shape[0]:
        raise InputError(f"info_nce pairs row i of a with row i of b: got {a.shape[0]} and {b.shape[0]} rows")
    logits = contrastive_logits(a, b, temperature, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    if hard_negatives is None:
        if hard_negative_mask is not None:
            raise InputError("hard_negative_mask was given without hard_negatives")
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    hard = _hard_logits(a, hard_negatives, hard_negative_mask, temperature, normalize)
    return (F.cross_entropy(torch.cat([logits, hard], dim=1), labels) + F.cross_entropy(logits.T, labels)) / 2


def _hard_logits(a: torch.Tensor, negatives: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                 normalize: bool) -> torch.Tensor:
    """[N, H] float32 `a_i . negatives[i, h] / temperature` (cosines unless `normalize=False`), -inf where ~mask."""
    if negatives.dim() != 3 or negatives.shape[0] != a.shape[0] or negatives.shape[2] != a.shape[1]:
        raise InputError(f"hard_negatives must be [N, H, D] = [{a.shape[0]}, H, {a.shape[1]}] like a [N, D], got "
                         f"{list(negatives.shape)}")
    a, negatives = a.float(), negatives.float()
    if normalize:
        a, negatives = F.normalize(a, dim=-1), F.normalize(negatives, dim=-1)
    hard = torch.einsum("nd,nkd->nk", a, negatives) / temperature
    if mask is None:
        return hard
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(hard.shape):
        raise InputError(f"hard_negative_mask must be a bool tensor [N, H] = {list(hard.shape)}, got "
                         f"{mask.dtype} {list(mask.shape)}")
    return hard.masked_fill(~mask, float("-inf"))


def soft_info_nce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross entropy between `targets` [N, M] (rows sum to 1) and softmax(`logits`).

    With one-hot targets this is the usual InfoNCE direction; targets carry no gradient.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise InputError(f"logits and targets must both be [N, M], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(targets.detach().to(log_p.dtype) * log_p).sum(-1).mean()
