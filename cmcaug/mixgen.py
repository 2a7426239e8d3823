"""MixGen (Hao et al., 2022), the baseline TiMix is compared with: blend two images, join their captions.

`mixgen`: the first M = B // 4 images become lam * img_i + (1 - lam) * img_{i+M}, and their captions
caption_i + " " + caption_{i+M}; the rest of the batch is unchanged. `mixgen_batch` pairs the first M
samples (all of them by default) with partners drawn as a random permutation from `generator`.

lam is 0.5 by default, as published. `alpha=` draws it instead, lam ~ Beta(alpha, alpha) from
`generator`, once per call (one lam for the batch, like timm's Mixup in its default "batch" mode); the
captions do not depend on lam, so nothing else changes.

Both return new tensors and lists unless `inplace=True`, and blend from the clean batch (the published
in-place loop reads images it has already mixed when a partner comes earlier in the batch). uint8 images
are blended in float32 and rounded to nearest (ties to even); float16 / bfloat16 are blended in float32 too.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._generator import beta, generator_device
from .errors import InputError


def mixgen(images: torch.Tensor, captions: Sequence[str], num: int | None = None, lam: float | None = None, *,
           alpha: float | None = None, generator: torch.Generator | None = None,
           inplace: bool = False) -> tuple[torch.Tensor, list[str]]:
    """MixGen as published: image and caption i < M mixed with i + M, M = `num` (default B // 4).

    `lam` (default 0.5) or `alpha` (lam ~ Beta(alpha, alpha), drawn from `generator`), not both."""
    batch, lam = _check(images, captions, lam, alpha, generator)
    count = batch // 4 if num is None else num
    if not 0 <= count <= batch // 2:
        raise InputError(f"num must lie in [0, B // 2] = [0, {batch // 2}] so that i + num stays in the "
                         f"batch, got {num}")
    first = torch.arange(count)
    return _blend(images, captions, first, first + count, lam, inplace)


def mixgen_batch(images: torch.Tensor, captions: Sequence[str], num: int | None = None, lam: float | None = None,
                 *, alpha: float | None = None, generator: torch.Generator | None = None,
                 inplace: bool = False) -> tuple[torch.Tensor, list[str]]:
    """MixGen with random partners: samples i < `num` (default B) mixed with perm[i], perm drawn from
    `generator` (after lam, when `alpha` draws it). A sample drawn as its own partner is left as it is."""
    batch, lam = _check(images, captions, lam, alpha, generator)
    count = batch if num is None else num
    if not 0 <= count <= batch:
        raise InputError(f"num must lie in [0, B] = [0, {batch}], got {num}")
    perm = torch.randperm(batch, generator=generator, device=generator_device(generator)).cpu()
    targets = torch.arange(count)
    moved = perm[:count] != targets
    return _blend(images, captions, targets[moved], perm[:count][moved], lam, inplace)


def _blend(images: torch.Tensor, captions: Sequence[str], targets: torch.Tensor, sources: torch.Tensor,
           lam: float, inplace: bool) -> tuple[torch.Tensor, list[str]]:
    out = images if inplace else images.clone()
    if len(targets):
        device_targets, device_sources = targets.to(images.device), sources.to(images.device)
        work = torch.promote_types(images.dtype, torch.float32)
        mixed = lam * images[device_targets].to(work) + (1 - lam) * images[device_sources].to(work)
        if not images.is_floating_point():
            info = torch.iinfo(images.dtype)
            mixed = mixed.round().clamp(info.min, info.max)
        out[device_targets] = mixed.to(images.dtype)
    joined = list(captions)
    for t, s in zip(targets.tolist(), sources.tolist()):
        joined[t] = f"{captions[t]} {captions[s]}"
    if inplace and isinstance(captions, list):
        captions[:] = joined
        return out, captions
    return out, joined


def _check(images: torch.Tensor, captions: Sequence[str], lam: float | None, alpha: float | None,
           generator: torch.Generator | None) -> tuple[int, float]:
    """(batch size, lam): the arguments checked, lam drawn when `alpha` asks for it."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise InputError("captions must be a sequence of str, one per image")
    if images.dim() < 1 or len(captions) != len(images):
        raise InputError(f"need one caption per image: got {len(captions)} captions for images of shape "
                         f"{tuple(images.shape)}")
    if alpha is not None:
        if lam is not None:
            raise InputError(f"pass lam (a fixed weight) or alpha (lam ~ Beta(alpha, alpha)), not both; got "
                             f"lam={lam} and alpha={alpha}")
        return len(images), float(beta(alpha, 1, generator)[0])
    lam = 0.5 if lam is None else lam
    if not 0 <= lam <= 1:
        raise InputError(f"lam must lie in [0, 1], got {lam}")
    return len(images), lam
