"""TiMix under torch.distributed: targets built from all-gathered features pair each mixed image with the
clean image that was really pasted into it. Two CPU processes (gloo), with unequal and odd batch sizes."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmcaug.timix import mixed_contrastive_loss, soft_targets, text_aware_mix

SIZES = (3, 2)  # rank 0 holds an odd batch, rank 1 a smaller one: gathers must pad and trim
GRID, PATCH = 4, 4


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order (the usual feature all-gather), for the unequal SIZES."""
    padded = torch.zeros(max(SIZES), *tensor.shape[1:], dtype=tensor.dtype)
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in SIZES]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, SIZES)])


def clean_batch(total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (total, 3, GRID * PATCH, GRID * PATCH), generator=g, dtype=torch.uint8)
    return images, torch.rand(total, GRID, GRID, generator=g), torch.randn(total, 6, generator=g)


def encode(images: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in image encoder: per-channel means of each image quadrant."""
    quadrants = images.float().unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))
    return quadrants.flatten(1)[:, :6]


def check_rank(rank: int, partner: str) -> None:
    images, relevance, text = clean_batch(sum(SIZES))
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    res = text_aware_mix(images[mine], relevance[mine], patch_size=PATCH, partner=partner,
                         generator=torch.Generator().manual_seed(100 + rank))
    assert torch.equal(res.lam, res.gathered_lam[mine])
    assert torch.equal(res.partner + start, res.gathered_partner[mine])

    # Every mixed image, gathered, really holds the clean image its gathered partner names, in its window.
    mixed = gather_rows(res.images)
    target, source = gather_rows(res.target_box), gather_rows(res.source_box)
    for g, j in enumerate(res.gathered_partner.tolist()):
        tx0, ty0, tx1, ty1 = (v * PATCH for v in target[g].tolist())
        sx0, sy0, sx1, sy1 = (v * PATCH for v in source[g].tolist())
        expected = images[g].clone()
        expected[:, ty0:ty1, tx0:tx1] = images[j, :, sy0:sy1, sx0:sx1]
        assert torch.equal(mixed[g], expected), f"gathered image {g} does not hold partner {j}"
        area = (tx1 - tx0) * (ty1 - ty0) / (GRID * PATCH) ** 2
        assert abs(res.gathered_lam[g].item() - (1 - area)) < 1e-6

    # Soft targets from all-gathered clean features pair rows the same way, on every rank.
    features = gather_rows(encode(images[mine]))
    p = torch.softmax(features @ text.T / 10, dim=1)
    targets = soft_targets(p, res)
    lam = res.gathered_lam[:, None]
    assert torch.allclose(targets, lam * p + (1 - lam) * p[res.gathered_partner])
    assert torch.allclose(soft_targets(p[mine], res), targets[mine])  # local rows of the same matrix

    loss = mixed_contrastive_loss(gather_rows(encode(res.images)), text, targets)
    losses = [torch.zeros(1) for _ in SIZES]
    dist.all_gather(losses, loss.detach().view(1))
    assert torch.equal(losses[0], losses[1]), "ranks disagree on the loss"


def worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SIZES),
                            timeout=datetime.timedelta(seconds=60))
    try:
        for partner in ("flip", "derangement", "random"):
            check_rank(rank, partner)
    finally:
        dist.destroy_process_group()


def test_partners_and_targets_agree_with_gathered_features(tmp_path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=len(SIZES), join=True)
