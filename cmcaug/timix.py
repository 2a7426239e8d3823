"""TiMix: text-aware image mixing for paired image-text data (Jiang et al., AAAI 2024).

For every image i, the k x k window of patches *least* relevant to its own caption is overwritten by the
k x k window *most* relevant to the caption of a partner image, and the contrastive target of the mixed
image becomes lam_i * P_i + (1 - lam_i) * P_partner(i), with P the softmax of the clean image-text
similarities. `relevance` is any per-patch text-relevance score: the published code uses a small
text-aware patch predictor (`TextAwarePatchPredictor`, in `cmcaug.relevance`); attention maps work too.

One training step (features all-gathered across GPUs or not; see `soft_targets`):

    with torch.no_grad():
        relevance = head.relevance(patch_features, text_cls, grid)   # or an attention map [B, gh, gw]
        p = (clean_image_features @ text_features.T / 0.07).softmax(1)
    res = text_aware_mix(images, relevance, patch_size=16, generator=g)
    loss = mixed_contrastive_loss(encode_image(res.images), text_features, soft_targets(p, res))

Draw, then apply:
- `choose_partners`, `draw_window_sides`, `find_windows` and `mix_lambda` draw or derive plain tensors;
- `cmcaug.kernels.paste_windows` applies them (one Triton pass on CUDA) and draws nothing.

Choices that differ from the published code (chaoyajiang/TiMiX, TPMix.py), on purpose:
- any batch size: the published "flip" asserts an even batch; here an odd batch closes the middle three
  images into a cycle, so every image of a batch of 2 or more is mixed. An image can still be left alone
  (B = 1, partner="random" drawing it as its own partner, `prob` < 1, a window side of 0): it keeps
  lam = 1 and is flagged in `MixResult.unmixed`. No `.cuda()`, any device;
- the window side k may be drawn per batch (the paper), per sample, from lam ~ Beta(alpha, alpha) (timm's
  CutMix), or fixed; images may be mixed with a probability `prob`; non-square patch grids work
  (k <= the shorter side); window sums come from one integral image for all B at once, in float64, and
  ties go to the top-most, then left-most window;
- under torch.distributed the images are mixed within each rank (no pixels cross GPUs), and the
  per-sample lam and partner are all-gathered, so targets built from all-gathered features pair each
  mixed image with its true partner (the published code flips the gathered targets as one batch while
  flipping images per GPU, which pairs the wrong rows as soon as there are two GPUs);
- the text-to-image half of `mixed_contrastive_loss` uses the transposed targets, each column normalized
  (the published code reuses the image-to-text targets untransposed);
- `label_mode="relevance"` is this project's text-aware variant of lam (see `mix_lambda`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ._generator import beta, generator_device
from .errors import InputError
from .kernels import paste_windows
from .losses import contrastive_logits, soft_info_nce
from .relevance import TextAwarePatchPredictor

__all__ = [
    "MixResult", "TextAwarePatchPredictor", "choose_partners", "draw_window_sides", "find_windows",
    "mix_lambda", "mixed_contrastive_loss", "soft_targets", "text_aware_mix",
]

Partner = Literal["flip", "roll", "derangement", "random"] | torch.Tensor
Window = Literal["per_batch", "per_sample"] | int | torch.Tensor | None


@dataclass(frozen=True)
class MixResult:
    """What `text_aware_mix` did; boxes are (x0, y0, x1, y1) in patch units, end-exclusive.

    `lam[i]` is the weight of image i's own caption in its target. `partner[i]` indexes this batch (this
    rank's batch under torch.distributed); `gathered_lam` / `gathered_partner` are the same for the batch
    all-gathered across ranks, in rank order, with partners as indices into it (equal to `lam` / `partner`
    without torch.distributed). Multiply boxes by `patch_size` for pixels.
    """

    images: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor
    target_box: torch.Tensor
    source_box: torch.Tensor
    patch_size: int
    gathered_lam: torch.Tensor
    gathered_partner: torch.Tensor

    @property
    def unmixed(self) -> torch.Tensor:
        """[B] bool: images returned as they came (no window pasted; lam = 1, partner = itself).

        A batch of one is always unmixed; so is an image that `partner="random"` drew as its own partner,
        one skipped by `prob`, or one given a window side of 0."""
        return self.target_box[:, 2] == self.target_box[:, 0]

    def __repr__(self) -> str:
        b, c, h, w = self.images.shape
        return (f"MixResult(images=[{b}, {c}, {h}, {w}] {self.images.dtype}, patch_size={self.patch_size}, "
                f"lam={[round(v, 3) for v in self.lam.tolist()[:8]]}{'...' if b > 8 else ''}, "
                f"partner={self.partner.tolist()[:8]}{'...' if b > 8 else ''})")


def text_aware_mix(
    images: torch.Tensor, relevance: torch.Tensor, *, patch_size: int, window: Window = None,
    window_ratio: tuple[float, float] = (0.35, 0.75), alpha: float | None = None, prob: float = 1.0,
    partner: Partner = "flip", label_mode: Literal["area", "relevance"] = "area",
    generator: torch.Generator | None = None, inplace: bool = False, backend: str = "auto", validate: bool = True,
    group: torch.distributed.ProcessGroup | None = None,
) -> MixResult:
    """Mix each image with its partner where its caption cares least and the partner's caption most.

    images     [B, C, H, W] uint8 / float / bf16 on any device (not modified unless `inplace=True`).
    relevance  [B, H // patch_size, W // patch_size] patch-to-own-caption scores (higher = more relevant);
               probabilities, logits or attention weights all work for `label_mode="area"`.
    window     None or "per_batch": one window side k for the batch (the paper); "per_sample": one draw per
               image; an int: that k for all; a [B] tensor: those. Drawn sides are uniform on
               {floor(r0 * s), ..., floor(r1 * s)} (at least 1), (r0, r1) = `window_ratio`, s the shorter
               grid side: both bounds truncated, as the published TPMix does (`int(side * ratio)`). The
               ratio bounds the *side*, so the window covers (k / s)^2 of a square grid: k in 5..12 for the
               paper's (0.35, 0.75) on its 16 x 16 grid, 10 % to 56 % of the image; on a 7 x 7 grid k in
               2..5, and the 5 x 5 window is half the image (lam = 0.49). For smaller pastes lower the
               ratio: (0.2, 0.5) covers 4 % to 25 %.
    alpha      draw k from lam ~ Beta(alpha, alpha) instead of `window_ratio` (timm's and torchvision's
               CutMix): k = round(sqrt((1 - lam) * gh * gw)), clipped to [0, s], per batch or per sample as
               `window` says; lam then reports the area kept, 1 - k^2 / (gh * gw) (timm's `correct_lam`).
    prob       each image is mixed with probability `prob`, drawn per sample from `generator` (1: all
               mixed, nothing drawn); the others keep their pixels and lam = 1.
    partner    "flip" (i <-> B-1-i, the paper; on an odd B, around the middle image m, image m-1 gets the
               window of m+1, m+1 that of m, m that of m-1); "roll" (image i-1 goes into image i, like
               `images.roll(1, 0)`); "derangement" (a permutation without fixed points, uniform, from
               `generator`); "random" (any permutation, uniform: images drawn as their own partner stay
               unmixed); or a [B] index tensor. All but "random" mix every image of a batch of 2 or more.
    label_mode "area": lam = 1 - k^2 / (grid area) (the published code); "relevance": see `mix_lambda`.
    validate   check relevance values (finite; non-negative for "relevance"), explicit partners and window
               sides: host syncs; pass False in a tuned loop once inputs are known to be good.
    group      the torch.distributed group whose features will be all-gathered (default: the world group,
               when initialized). Then every rank must call this together (it all-gathers lam and partner).

    Images left unmixed have partner[i] = i and lam = 1 (`MixResult.unmixed`); B = 1 leaves the only one.
    """
    B, grid = _check_inputs(images, relevance, patch_size, prob)
    device = images.device
    scores = relevance.detach().to(device=device, dtype=torch.float64)
    if validate and B > 0:
        _check_relevance_values(scores, label_mode)
    partners = choose_partners(B, partner, generator=generator, device=device, validate=validate)
    sides = draw_window_sides(grid, B, window, window_ratio, alpha=alpha, generator=generator,
                              validate=validate).to(device)
    index = torch.arange(B, device=device)
    skipped = partners == index
    if prob < 1:
        skipped |= (torch.rand(B, generator=generator, device=generator_device(generator)) >= prob).to(device)
    sides = torch.where(skipped, 0, sides)
    partners = torch.where(sides == 0, index, partners)
    target_box, source_box = find_windows(scores, partners, sides)
    lam = mix_lambda(scores, partners, target_box, source_box, label_mode)
    mixed = paste_windows(images, partners, target_box, source_box, patch_size=patch_size, inplace=inplace,
                          backend=backend, validate=False)
    gathered_lam, gathered_partner = _gather_across_ranks(lam, partners, group)
    return MixResult(mixed, lam, partners, target_box, source_box, patch_size, gathered_lam, gathered_partner)


def choose_partners(batch_size: int, partner: Partner = "flip", *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, validate: bool = True) -> torch.Tensor:
    """[B] int64 index of the image whose window goes into each image; see `text_aware_mix`."""
    if isinstance(partner, torch.Tensor):
        if partner.shape != (batch_size,) or partner.is_floating_point() or partner.dtype == torch.bool:
            raise InputError(f"an explicit partner must be an integer tensor of shape ({batch_size},), got "
                             f"{partner.dtype} {tuple(partner.shape)}")
        partner = partner.to(device=device, dtype=torch.int64)
        if validate and batch_size and bool(((partner < 0) | (partner >= batch_size)).any()):
            raise InputError(f"explicit partner indices must lie in [0, {batch_size}) (rows of this batch), got "
                             f"values from {int(partner.min())} to {int(partner.max())}")
        return partner
    index = torch.arange(batch_size, device=device)
    if partner == "flip":
        flipped = index.flip(0)
        if batch_size % 2 and batch_size > 1:  # flip would pair the middle image with itself
            middle = batch_size // 2
            flipped[middle], flipped[middle + 1] = middle - 1, middle
        return flipped
    if partner == "roll":
        return (index - 1) % max(batch_size, 1)
    if partner in ("random", "derangement"):
        return _permutation(batch_size, partner == "derangement", generator).to(device)
    raise InputError(f"partner must be 'flip', 'roll', 'derangement', 'random' or a [B] index tensor, got "
                     f"{partner!r}")


def _permutation(batch_size: int, without_fixed_points: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random permutation, on the generator's device; uniform among those without a fixed point
    when asked (rejection: about e draws on average, one host sync each). B < 2 has none: identity."""
    draw_on = generator_device(generator)
    index = torch.arange(batch_size, device=draw_on)
    while True:
        perm = torch.randperm(batch_size, generator=generator, device=draw_on)
        if not without_fixed_points or batch_size < 2 or not bool((perm == index).any()):
            return perm


def draw_window_sides(grid: tuple[int, int], batch_size: int, window: Window = None,
                      window_ratio: tuple[float, float] = (0.35, 0.75), *, alpha: float | None = None,
                      generator: torch.Generator | None = None, validate: bool = True) -> torch.Tensor:
    """[B] int64 window sides in patches (on the generator's device, CPU by default); see `text_aware_mix`.

    `validate=False` skips the range check of a tensor of sides (a host sync when it is on a GPU)."""
    shortest = min(grid)
    draw_on = generator_device(generator)
    if isinstance(window, (int, torch.Tensor)) and not isinstance(window, bool):
        if alpha is not None:
            raise InputError(f"alpha draws the window side, so window must be None, 'per_batch' or 'per_sample' "
                             f"with it, got the fixed side(s) {window!r}")
        if isinstance(window, torch.Tensor) and (window.shape != (batch_size,) or window.is_floating_point()):
            raise InputError(f"window as a tensor must hold {batch_size} integer sides, got {window.dtype} "
                             f"{tuple(window.shape)}")
        sides = torch.as_tensor(window, dtype=torch.int64).expand(batch_size).clone()
        checked = validate or not isinstance(window, torch.Tensor)  # an int is checked on the host, for free
        if checked and batch_size and bool(((sides < 0) | (sides > shortest)).any()):
            raise InputError(f"window sides must lie in [0, {shortest}] (the shorter side of the {grid[0]} x "
                             f"{grid[1]} patch grid), got {window!r}")
        return sides
    r0, r1 = window_ratio
    if not 0 < r0 <= r1 <= 1:
        raise InputError(f"window_ratio must satisfy 0 < r0 <= r1 <= 1, got {window_ratio!r}")
    if window not in (None, "per_batch", "per_sample"):
        raise InputError(f"window must be None, 'per_batch', 'per_sample', an int or a [B] tensor, got {window!r}")
    draws = batch_size if window == "per_sample" else 1
    if alpha is None:
        low = min(max(1, math.floor(r0 * shortest)), shortest)  # int(side * ratio) in the published TPMix
        high = max(low, min(shortest, math.floor(r1 * shortest)))
        sides = torch.randint(low, high + 1, (draws,), generator=generator, device=draw_on)
    else:
        cut = (1 - beta(alpha, draws, generator)) * (grid[0] * grid[1])
        sides = cut.sqrt().round().clamp(max=shortest).long().to(draw_on)
    return sides.expand(batch_size).clone()


def _window_sums(integral: torch.Tensor, sides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of every sides[b] x sides[b] window of the relevance whose integral image is `integral`
    [B, gh + 1, gw + 1], indexed by its top-left patch: (sums [B, gh, gw] float64, fits [B, gh, gw] bool:
    the window lies inside the grid). One integral image serves every window size at once."""
    B, gh, gw = integral.shape[0], integral.shape[1] - 1, integral.shape[2] - 1
    device = integral.device
    y = torch.arange(gh, device=device).view(1, gh, 1)
    x = torch.arange(gw, device=device).view(1, 1, gw)
    k = sides.to(device).view(B, 1, 1)
    b = torch.arange(B, device=device).view(B, 1, 1)
    y1, x1 = (y + k).clamp(max=gh), (x + k).clamp(max=gw)
    sums = integral[b, y1, x1] - integral[b, y, x1] - integral[b, y1, x] + integral[b, y, x]
    return sums, (y + k <= gh) & (x + k <= gw)


def find_windows(relevance: torch.Tensor, partner: torch.Tensor,
                 sides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_box, source_box) [B, 4] int64: the least relevant window of each image and the most
    relevant window of its partner, both sides[i] square; ties go to the top-most, then left-most window.
    """
    B, _, gw = relevance.shape
    integral = _integral_image(relevance)
    low, fits = _window_sums(integral, sides)
    high, _ = _window_sums(integral[partner], sides)
    target = low.masked_fill(~fits, math.inf).flatten(1).argmin(1)
    source = high.masked_fill(~fits, -math.inf).flatten(1).argmax(1)
    k = sides.to(relevance.device).view(B, 1)

    def box(flat: torch.Tensor) -> torch.Tensor:
        top_left = torch.stack([flat % gw, flat // gw], 1)
        return torch.cat([top_left, top_left + k], 1)

    return box(target), box(source)


def mix_lambda(relevance: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor,
               source_box: torch.Tensor, label_mode: Literal["area", "relevance"] = "area") -> torch.Tensor:
    """[B] float32 weight of each image's own caption in its soft target.

    "area": lam = 1 - (window area) / (grid area), the fraction of image i that is still visible.
    "relevance": with r normalized per image to sum 1 (uniform where an image's relevance sums to 0),
    kept = 1 - r_i(target window) is the share of caption i's evidence still visible and
    pasted = r_partner(source window) the share of the partner caption's evidence pasted in;
    lam = kept / (kept + pasted). Uniform relevance gives the area value; relevance must be >= 0.
    """
    gh, gw = relevance.shape[1:]
    area = ((target_box[:, 2] - target_box[:, 0]) * (target_box[:, 3] - target_box[:, 1])).double() / (gh * gw)
    if label_mode == "area":
        return (1 - area).float()
    if label_mode != "relevance":
        raise InputError(f"label_mode must be 'area' or 'relevance', got {label_mode!r}")
    integral = _integral_image(relevance)
    total = integral[:, -1, -1]
    kept = 1 - torch.where(total > 0, _box_sums(integral, target_box) / total.clamp(min=1e-300), area)
    partner_total = total[partner]
    pasted = torch.where(partner_total > 0,
                         _box_sums(integral[partner], source_box) / partner_total.clamp(min=1e-300), area)
    mass = kept + pasted
    return torch.where(mass > 0, kept / mass.clamp(min=1e-300), 1 - area).clamp(0, 1).float()


def soft_targets(p: torch.Tensor, res: MixResult) -> torch.Tensor:
    """Targets of the mixed images: lam_i * p_i + (1 - lam_i) * p_partner(i), rows of `p` mixed, no grad.

    `p` [R, T] holds the clean images' target distributions over T texts, typically
    softmax(clean image features @ text features.T / temperature), or `torch.eye` for hard labels. Rows
    follow either this rank's batch (R == B) or the batch all-gathered across ranks (R == world batch).
    """
    if p.dim() != 2:
        raise InputError(f"p must be [rows, texts], got shape {tuple(p.shape)}")
    if p.shape[0] == res.lam.numel():
        lam, partner = res.lam, res.partner
    elif p.shape[0] == res.gathered_lam.numel():
        lam, partner = res.gathered_lam, res.gathered_partner
    else:
        raise InputError(f"p has {p.shape[0]} rows; expected one per mixed image of this rank "
                         f"({res.lam.numel()}) or of all ranks ({res.gathered_lam.numel()})")
    p = p.detach().to(torch.promote_types(p.dtype, torch.float32))  # bf16 / fp16 rows mix in fp32, fp64 stays
    lam = lam.to(device=p.device, dtype=p.dtype).view(-1, 1)
    return lam * p + (1 - lam) * p[partner.to(p.device)]


def mixed_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 0.07, normalize: bool = True) -> torch.Tensor:
    """Symmetric contrastive loss of mixed-image features [R, D] against text features [T, D].

    Image->text uses `targets` [R, T] (from `soft_targets`). Text->image uses the columns of `targets`,
    each normalized to sum 1 (text j is matched by every mixed image that holds part of image j), over
    the texts that some mixed image holds.
    """
    logits = contrastive_logits(image_features, text_features, temperature, normalize)
    if targets.shape != logits.shape:
        raise InputError(f"targets must be [{logits.shape[0]}, {logits.shape[1]}] (images x texts), got "
                         f"{tuple(targets.shape)}")
    column_targets = targets.detach().float().T
    mass = column_targets.sum(1)
    held = mass > 0
    image_to_text = soft_info_nce(logits, targets)
    text_to_image = soft_info_nce(logits.T[held], column_targets[held] / mass[held, None])
    return (image_to_text + text_to_image) / 2


def _integral_image(relevance: torch.Tensor) -> torch.Tensor:
    """[B, gh + 1, gw + 1] float64 sums of relevance[b, :y, :x]: any box sum in four reads."""
    return F.pad(relevance.double().cumsum(1).cumsum(2), (1, 0, 1, 0))


def _box_sums(integral: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[B] float64 sum of the relevance inside boxes[b] = (x0, y0, x1, y1), from its integral image."""
    b = torch.arange(len(boxes), device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(1)
    return integral[b, y1, x1] - integral[b, y0, x1] - integral[b, y1, x0] + integral[b, y0, x0]


def _check_inputs(images: torch.Tensor, relevance: torch.Tensor, patch_size: int,
                  prob: float) -> tuple[int, tuple[int, int]]:
    if not 0 <= prob <= 1:
        raise InputError(f"prob (the probability that an image is mixed) must lie in [0, 1], got {prob!r}")
    if images.dim() != 4:
        raise InputError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise InputError(f"patch_size must be a positive int, got {patch_size!r}")
    B, _, H, W = images.shape
    grid = (H // patch_size, W // patch_size)
    if relevance.shape != (B, *grid):
        raise InputError(f"relevance must be [B, H // patch_size, W // patch_size] = [{B}, {grid[0]}, {grid[1]}] "
                         f"for images {tuple(images.shape)} and patch_size {patch_size}, got "
                         f"{tuple(relevance.shape)}; reshape per-patch scores [B, N] to the patch grid")
    if min(grid) < 1:
        raise InputError(f"images of {H} x {W} pixels hold no whole {patch_size}-pixel patch")
    return B, grid


def _check_relevance_values(scores: torch.Tensor, label_mode: str) -> None:
    not_finite, negative = torch.stack([~torch.isfinite(scores).all(), (scores < 0).any()]).tolist()
    if not_finite:
        raise InputError("relevance holds NaN or infinite values; check the model that produced it")
    if negative and label_mode == "relevance":
        raise InputError("label_mode='relevance' needs non-negative relevance (probabilities or attention "
                         "weights, e.g. TextAwarePatchPredictor.relevance); got negative scores, so pass "
                         "probabilities or use label_mode='area'")


def _gather_across_ranks(lam: torch.Tensor, partner: torch.Tensor,
                         group: torch.distributed.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """lam and partner of every rank's samples, in rank order, partners shifted to gathered indices."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return lam, partner
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # NCCL only moves CUDA tensors (a batch mixed on the CPU still gathers through the rank's GPU)
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else lam.device
    count = torch.tensor([lam.numel()], device=wire)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in torch.cat(counts).tolist()]
    packed = torch.zeros(max(counts), 2, dtype=torch.float64, device=wire)  # exact for any index < 2**53
    packed[: lam.numel(), 0] = lam.double()
    packed[: lam.numel(), 1] = (partner + sum(counts[:rank])).double()
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts)]).to(lam.device)
    return gathered[:, 0].float(), gathered[:, 1].long()
