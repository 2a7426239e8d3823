"""Mini-replication of TiMix (AAAI 2024): does text-aware image mixing help contrastive learning most when pairs are few?

    python examples/replicate_timix.py --out benchmarks/results     # 72 runs, 2 at a time: 9-10 min on 2 cores
    python examples/replicate_timix.py --smoke --out /tmp/timix     # the whole pipeline in a few seconds
    python examples/replicate_timix.py --no-test --arms none timix-head --sizes 500   # tuning: validation only

Question. TiMix's claim is data efficiency: pasting the window of a partner image that its caption cares about
most over the window of the image that its own caption cares about least, with the soft contrastive target
lam * P_i + (1 - lam) * P_partner, should help image-text contrastive pre-training most when pairs are few.
Here a small CLIP-style dual encoder is trained from scratch on shapes-world pairs (`cmcaug.synth`: 64-pixel
images with 1-4 coloured shapes, COCO boxes, one caption naming every object with colour, size, count and
relations) at several training-set sizes, and scored by retrieval on held-out pairs.

Arms (same seeds, same steps, same batches, same initialization; they differ only in the extra mixed batch):

- `none`: the clean symmetric InfoNCE (`cmcaug.losses.info_nce`) only. The baseline.
- `cutmix`: `torchvision.transforms.v2.CutMix` (alpha 1, one random box per batch, partner = previous image
  in the batch) on the images; target of mixed image i = lam * onehot(i) + (1 - lam) * onehot(partner),
  from CutMix's own soft labels; loss `cmcaug.timix.mixed_contrastive_loss`. Text-blind mixing.
- `mixgen`: `cmcaug.mixgen.mixgen` as published (the first B/4 images blended 50/50 with image i + B/4 and
  their captions concatenated; hard targets, `info_nce` on the new pairs). A text-joining baseline.
- `timix-head`: `cmcaug.text_aware_mix` with relevance from `cmcaug.TextAwarePatchPredictor`, trained jointly
  on every batch with `patch_labels_from_boxes` + `patch_alignment_loss` (the shapes-world boxes are the
  grounding data); soft targets `soft_targets(p, res)` with p = softmax of the clean image-text logits
  (detached), loss `mixed_contrastive_loss`. TiMix as published, in miniature.
- `timix-oracle`: the same with relevance = `patch_box_coverage` of the ground-truth boxes: TiMix with a
  perfect relevance map: what a perfect head would give.
- `timix-random` (a control, not in the paper): the same window sizes, soft targets and loss with uniform
  random relevance, i.e. the windows fall anywhere. timix-head minus timix-random isolates "text-aware".

Baselines and reference lines: chance R@K = K / N_test. There is no honest ceiling for this model: a longer
run on more data is still this recipe, not a bound; instead every run also reports R@1 on pairs it trained
on (`train_r1`, 200 of them), which says how much of the held-out gap is generalization rather than fit.

Protocol. Seed s fixes everything of a run: the training pool is `make_corpus(seed=s)` (images 0..n-1 for
a training set of n pairs; image i depends only on (s, i), so the sizes are nested), the validation pairs
are the pool's next `--val` images (never trained on; used for every choice below), model initialization
(`torch.manual_seed(s)`), the batch order and the mixing draws (two `torch.Generator`s seeded from s: one
for batches, one for mixing, so every arm sees the same batches; torchvision's CutMix, which reads the global
RNG, runs under `torch.random.fork_rng` seeded from the mixing generator). The test set is `--test` pairs of
`make_corpus(seed=--eval-seed)`, a seed no run trains on, read only to report. Each run trains for `--steps`
AdamW steps (batch `--batch-size`, linear warm-up then cosine decay), one torch thread, `--jobs` runs at a
time in spawned processes, so results do not depend on `--jobs`. Retrieval: R@1 and R@5, image->text and
text->image, over the N_test x N_test cosine similarities; a retrieved caption that is the same string as
the ground truth counts as a hit (identical captions cannot be told apart). `r1` = mean of the two R@1.
Summary: mean +- standard deviation over seeds per (arm, size), and the paired difference to `none` (same
seed, same batches) mean +- std.

Our choices (the paper leaves them open, or a miniature needs them):

- Model: image tower = 8-pixel patch embedding (an 8 x 8 grid on 64-pixel images) + learned position
  embedding + `--depth` residual 3x3-conv blocks over the patch grid, mean-pooled; its per-patch features
  (layer-normed) feed the relevance head, as a ViT's patch tokens would. Text tower = word embeddings
  (vocabulary of the run's training captions; unseen words -> <unk>) + two residual 1-D convolutions
  (width 3, so "red star" binds), mean-pooled. Both projected to `--embed-dim`; fixed temperature
  `--temperature` (0.1). Width 32, 2 blocks, AdamW lr 5e-3 (chosen for `none` on the validation split:
  lr 5e-3 beat 2e-3; width 64 learns faster per step but costs 2-3x the time, which the budget does not
  allow). A CNN rather than a ViT: about 1.5x cheaper per step at equal width on one CPU thread, and its
  per-patch features play the ViT patch tokens' part for the head.
- Mixing: every step, every mixing arm adds the loss of one mixed copy of the whole batch to the clean loss,
  weight `--mix-weight` (1), as the published TiMix code does (a clean step, then a mixed step with gamma 1
  after the first epoch; here one step on the sum). The mixed batch reuses the clean text features
  (mixgen re-encodes its joined captions). So a mixing arm costs about twice a `none` step; `none` is
  not given more steps to compensate (the question is what mixing adds to the same data and schedule).
- TiMix window: `text_aware_mix` defaults: one side k per batch, uniform on floor(0.35 * 8)..floor(0.75 * 8)
  = 2..6 patches (6 % to 56 % of the image), partner "flip", lam = area kept (the published rule).
- Relevance head: detached inputs (patch features and text feature, `.detach()`), so the grounding boxes
  only train the head and never reach the encoders: the arms then differ only in how they mix (the TiMix
  authors let the patch-prediction loss train the encoder too, which would mix the effect of box
  supervision into the comparison). The head's loss uses `positive_weight` = background / box patches of the
  training pool, and is computed on every batch from step 0, so the windows of the first steps are near
  random (the published code instead ramps the mixed loss's weight up over the first epoch; here it is 1
  throughout).
- P for the soft targets: softmax(clean image-text logits / temperature) of the batch, detached, as the
  published code does (its online model's softmax(sim_i2t) on the clean batch). `--timix-targets hard`
  (P = identity) and `--label-mode relevance` are the variants tried on the validation split.

Result (the default run: 552 s on 2 cores, the first third shared with other jobs): no mixing arm beats
`none` at any size by more than the spread over seeds; the text-aware arms lose most at 1000 and 2000 pairs
(paired Δ R@1 about -0.03) and are no better than random windows except at 250 pairs for the head. TiMix's
data-efficiency claim is not reproduced at this scale. What we learned on the validation split (never the
test set), and the test numbers in words: NOTES below, copied into the markdown report.

Output: a per-run table and a per-(arm, size) summary on stdout; `timix-replication-<cpu>.json` (config,
rows, summary), `.md` (tables + notes) and `.png` (R@1 vs training-set size, std error bars, chance line)
in `--out`. `--replot JSON` re-renders the markdown and plot from a JSON without training.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmcaug import TextAwarePatchPredictor, text_aware_mix
from cmcaug.benchmarks.common import argument_parser, device_name, one_thread, print_table, slug, write_results
from cmcaug.losses import contrastive_logits, info_nce
from cmcaug.mixgen import mixgen
from cmcaug.relevance import patch_alignment_loss, patch_box_coverage, patch_labels_from_boxes
from cmcaug.timix import mixed_contrastive_loss, soft_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_timix_relevance sits next to this file
from train_timix_relevance import load_world  # noqa: E402

NAME = "timix-replication"
PATCH = 8  # pixels per patch: 64-pixel images give an 8 x 8 grid
ARMS = ("none", "cutmix", "mixgen", "timix-head", "timix-oracle", "timix-random")
MIXED = {"cutmix", "mixgen", "timix-head", "timix-oracle", "timix-random"}
TIMIX = {"timix-head", "timix-oracle", "timix-random"}
METRICS = ("r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")
NOTES = """\
Validation study (the 200 validation pairs of each seed's pool, seeds 0-2, 400 steps, never the test set;
mean ± std of r1 over the 3 seeds). At 250 pairs, `none` 0.120 ± 0.004 and:

| TiMix variant (oracle relevance unless said) | val r1 |
|---|---:|
| as published: soft P = softmax(clean logits), lam = area, window 0.35-0.75, weight 1 | 0.091 ± 0.006 |
| hard targets (P = identity), otherwise as published | 0.121 ± 0.008 |
| smaller windows (`--window-ratio 0.2 0.5`: 2-4 patches of 8) | 0.102 ± 0.006 |
| `--label-mode relevance` (lam from the boxes' share kept / pasted) | 0.103 ± 0.005 |
| half the mixed-loss weight (`--mix-weight 0.5`) | 0.115 ± 0.013 |
| head relevance, hard targets | 0.108 ± 0.013 |
| random relevance, hard targets | 0.103 ± 0.024 |

At 2000 pairs (`none` 0.144 ± 0.006): oracle as published 0.118 ± 0.012, oracle with hard targets
0.129 ± 0.017, random relevance with hard targets 0.122 ± 0.038. One seed at 250 pairs for 1200 steps
(every arm then fits its training pairs, train r1 0.96-0.99): `none` 0.108, oracle 0.095, oracle with hard
targets 0.100, mixgen 0.125.

What that says:
- The relevance is not the problem. The jointly trained head separates box from background patches
  (see the head columns) and its windows are almost the oracle's: the window an image loses holds about
  0.07 object coverage (oracle 0.06, random windows 0.20), the pasted one about 0.46 (oracle 0.49,
  random 0.20). TiMix's windows do what the paper says; the retrieval model just does not profit.
- The soft targets are what hurts most: P is the model's own in-batch prediction, near uniform early and
  wrong on many pairs of a tiny model (train r1 stays ~0.5 at 250 pairs), so the mixed loss distils the
  model's confusions back into it. With hard targets the harm disappears at 250 pairs (0.121 vs 0.120) but
  nothing is gained either. The paper's P comes from a large model (mPLUG) whose in-batch predictions on its
  training pairs are mostly right.
- Window size, loss weight and lam rule move r1 by about one standard deviation and never above `none`.
- At 2000 pairs and 400 steps the model is under-fitted (train r1 ≈ val r1), and every mixed loss slows
  its learning of the clean task: mixing, text-aware or not, costs more than it regularizes here.

Test results (the tables above; the default command, run once, after the validation study). No mixing arm
beats `none` at any size by more than the spread over seeds, and the miniature does not reproduce TiMix's
data-efficiency claim:
- 250 pairs: every mixing arm is below `none` (0.102 ± 0.008), with consistent paired differences from
  -0.009 ± 0.004 (timix-head) to -0.021 ± 0.009 (timix-random).
- 500 pairs: cutmix (+0.022 ± 0.037) and timix-oracle (+0.010 ± 0.031) are above `none` on average, within
  noise; timix-head -0.007 ± 0.021.
- 1000 and 2000 pairs: the text-aware arms lose most (timix-head -0.027 ± 0.010 / -0.031 ± 0.016,
  timix-oracle -0.031 ± 0.010 / -0.032 ± 0.015), random windows with the same soft targets less
  (-0.017 ± 0.001 / -0.005 ± 0.007); cutmix -0.022 ± 0.015 / -0.010 ± 0.029, mixgen -0.012 ± 0.029 /
  -0.005 ± 0.011.
- Text-aware vs random windows (same targets, same loss): better only at 250 pairs for the head (-0.009 vs
  -0.021), worse at 1000 and 2000 for head and oracle alike. A likely reason (a hypothesis, not tested on
  the test set): a text-aware paste keeps all of image i's objects and adds a whole object of the partner,
  while lam = area kept still gives caption i only 44-94 % of the target; random windows cut objects in
  proportion to area, so the area rule mislabels them less. `--label-mode relevance` (lam from the boxes)
  was better than area on validation (0.103 vs 0.091 at 250 pairs) but still below `none`.
- R@1 is not monotone in the size (`none`: 0.175 at 1000, 0.163 at 2000) because every run has the same
  400 steps: 2000 pairs get 6.4 epochs and stay under-fitted (train r1 0.19 ≈ test r1), 250 pairs get 51
  and over-fit (train r1 0.56, test 0.10). Chance is 0.005; there is no honest ceiling (see the docstring).
- What a reader should take away: at this scale (a 32-wide CNN, 400 steps, up to 2000 pairs) the
  published recipe's soft self-predicted targets cost accuracy, and text-aware windows do not make mixing
  pay off. It does not refute TiMix at its own scale, where P comes from a strong model.
"""


# ----------------------------------------------------------------------------------------------- data


def make_data(kind: str, seed: int, n_images: int, image_size: int) -> dict:
    """One shapes-world corpus as tensors: images [N, 3, S, S] uint8, boxes (list of [n, 4]), captions."""
    with tempfile.TemporaryDirectory(prefix=f"cmcaug-{kind}-") as tmp:
        images, boxes, captions = load_world(Path(tmp) / "corpus", n_images, seed, image_size=image_size)
    return {"kind": kind, "seed": seed, "images": images, "boxes": boxes, "captions": captions}


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


class Vocab:
    """Word ids from the training captions: 0 = padding, 1 = a word the training captions never used."""

    def __init__(self, captions: list[str]) -> None:
        self.ids = {w: i for i, w in enumerate(sorted({w for c in captions for w in words(c)}), start=2)}

    def __len__(self) -> int:
        return len(self.ids) + 2

    def encode(self, captions: list[str]) -> torch.Tensor:
        """[B, L] int64 word ids, zero-padded to the longest caption."""
        rows = [[self.ids.get(w, 1) for w in words(c)] or [1] for c in captions]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out


# ---------------------------------------------------------------------------------------------- model


class ImageTower(nn.Module):
    """8-pixel patch embedding + position embedding + residual 3x3 convolutions over the patch grid."""

    def __init__(self, dim: int, depth: int, grid: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(1, dim), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, H, W] -> (pooled [B, dim], patch features [B, N, dim], row-major over the grid)."""
        x = self.embed((images.float() / 255 - 0.5) / 0.25) + self.pos
        for block in self.blocks:
            x = x + block(x)
        patches = self.norm(x.flatten(2).transpose(1, 2))
        return patches.mean(1), patches


class TextTower(nn.Module):
    """Word embeddings + two residual width-3 convolutions, mean-pooled over the words."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 3, padding=1) for _ in range(2))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).float().unsqueeze(1)
        x = self.embed(ids).transpose(1, 2) * mask
        for conv in self.convs:
            x = (x + conv(F.gelu(x))) * mask
        return self.norm((x.sum(2) / mask.sum(2).clamp(min=1)))


class DualEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, embed_dim: int, depth: int, grid: int) -> None:
        super().__init__()
        self.image = ImageTower(dim, depth, grid)
        self.text = TextTower(vocab_size, dim)
        self.image_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, patches = self.image(images)
        return self.image_proj(pooled), patches

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text(ids)
        return self.text_proj(pooled), pooled


# ------------------------------------------------------------------------------------------- training


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches from a stream of random permutations of range(n) (epochs without replacement)."""
    buffer = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def cutmix_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's CutMix on the batch; returns the images and its soft labels [B, B] (rows: images,
    columns: this batch's captions). CutMix draws from the global RNG: fork it, seeded from `generator`."""
    from torchvision.transforms import v2

    b = len(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 1 << 62, (), generator=generator)))
        mixed, targets = v2.CutMix(alpha=1.0, num_classes=b)(images, torch.arange(b))
    return mixed, targets


def window_mean(maps: torch.Tensor, boxes: torch.Tensor) -> float:
    """Mean over the batch of each map's mean inside its box (x0, y0, x1, y1 in patch units, end-exclusive)."""
    y = torch.arange(maps.shape[1]).view(1, -1, 1)
    x = torch.arange(maps.shape[2]).view(1, 1, -1)
    x0, y0, x1, y1 = (v.view(-1, 1, 1) for v in boxes.unbind(1))
    inside = ((y >= y0) & (y < y1) & (x >= x0) & (x < x1)).float()
    return ((maps * inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1)).mean().item()


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, same: torch.Tensor) -> dict[str, float]:
    """R@1 / R@5 both ways; `same[i, j]`: caption j is the same string as caption i (counts as a hit)."""
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        top = s.topk(min(5, s.shape[1]), dim=1).indices
        hits = same.gather(1, top)
        out[f"{name}_r1"] = hits[:, 0].float().mean().item()
        out[f"{name}_r5"] = hits.any(1).float().mean().item()
    out["r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def evaluate(model: DualEncoder, vocab: Vocab, data: dict) -> dict[str, float]:
    model.eval()
    image_emb = torch.cat([model.encode_image(x)[0] for x in data["images"].split(256)])
    text_emb = model.encode_text(vocab.encode(data["captions"]))[0]
    model.train()
    caps = data["captions"]
    same = torch.tensor([[a == b for b in caps] for a in caps])
    return retrieval(image_emb, text_emb, same)


@torch.no_grad()
def head_quality(model: DualEncoder, head: TextAwarePatchPredictor, vocab: Vocab, data: dict, grid: tuple) -> dict:
    """Mean head relevance on box patches and on background patches of the validation pairs."""
    model.eval()
    patches = model.encode_image(data["images"])[1]
    text = model.encode_text(vocab.encode(data["captions"]))[1]
    model.train()
    relevance = head.relevance(patches, text, grid)
    labels = patch_labels_from_boxes(data["boxes"], grid, image_size=tuple(data["images"].shape[2:]))
    return {"head_rel_box": round(relevance[labels].mean().item(), 3),
            "head_rel_bg": round(relevance[~labels].mean().item(), 3)}


def train_run(arm: str, size: int, seed: int, args: Any, pool: dict, val: dict, test: dict | None) -> dict:
    """One arm at one training-set size from one seed: a table row."""
    start, cpu_start = time.perf_counter(), time.process_time()
    images, boxes, captions = pool["images"][:size], pool["boxes"][:size], pool["captions"][:size]
    image_size = tuple(images.shape[2:])
    grid = (image_size[0] // PATCH, image_size[1] // PATCH)
    vocab = Vocab(captions)
    ids = vocab.encode(captions)
    torch.manual_seed(seed)
    model = DualEncoder(len(vocab), args.dim, args.embed_dim, args.depth, grid[0])
    params = list(model.parameters())
    head = None
    if arm == "timix-head":
        head = TextAwarePatchPredictor(dim=args.dim, text_dim=args.dim)
        params += list(head.parameters())
    labels = patch_labels_from_boxes(boxes, grid, image_size=image_size)
    coverage = patch_box_coverage(boxes, grid, image_size=image_size).float()
    positive_weight = float((~labels).sum() / labels.sum().clamp(min=1))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    batch_gen = torch.Generator().manual_seed(seed)
    mix_gen = torch.Generator().manual_seed(10_000 + seed)
    log: dict[str, list[float]] = {"clean": [], "mix": [], "head": [], "lam": [], "lost_obj": [], "pasted_obj": []}
    for index in batches(size, args.batch_size, args.steps, batch_gen):
        x, t = images[index], ids[index]
        t = t[:, : int((t != 0).sum(1).max())]
        zi, patches = model.encode_image(x)
        zt, text_cls = model.encode_text(t)
        logits = contrastive_logits(zi, zt, args.temperature)
        loss = info_nce(zi, zt, args.temperature)
        log["clean"].append(loss.item())
        if head is not None:
            head_loss = patch_alignment_loss(head(patches.detach(), text_cls.detach()), labels[index], positive_weight)
            loss = loss + head_loss
            log["head"].append(head_loss.item())
        if arm in MIXED:
            if arm == "cutmix":
                mixed, targets = cutmix_batch(x, mix_gen)
                mix_loss = mixed_contrastive_loss(model.encode_image(mixed)[0], zt, targets, args.temperature)
                log["lam"].append(targets.max(1).values.mean().item())
            elif arm == "mixgen":
                mixed, joined = mixgen(x, [captions[i] for i in index.tolist()])
                mix_loss = info_nce(model.encode_image(mixed)[0], model.encode_text(vocab.encode(joined))[0],
                                    args.temperature)
            else:
                if arm == "timix-head":
                    relevance = head.relevance(patches.detach(), text_cls.detach(), grid)
                elif arm == "timix-oracle":
                    relevance = coverage[index]
                else:
                    relevance = torch.rand(len(index), *grid, generator=mix_gen)
                res = text_aware_mix(x, relevance, patch_size=PATCH, window_ratio=tuple(args.window_ratio),
                                     label_mode=args.label_mode, generator=mix_gen)
                p = logits.detach().softmax(1) if args.timix_targets == "soft" else torch.eye(len(index))
                mix_loss = mixed_contrastive_loss(model.encode_image(res.images)[0], zt, soft_targets(p, res),
                                                  args.temperature)
                cov = coverage[index]
                log["lam"].append(res.lam.mean().item())
                log["lost_obj"].append(window_mean(cov, res.target_box))
                log["pasted_obj"].append(window_mean(cov[res.partner], res.source_box))
            loss = loss + args.mix_weight * mix_loss
            log["mix"].append(mix_loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    row: dict[str, Any] = {"arm": arm, "size": size, "seed": seed}
    if test is not None:
        row.update(evaluate(model, vocab, test))
    row.update({f"val_{k}": v for k, v in evaluate(model, vocab, val).items()})
    fit = {k: pool[k][: min(size, args.val)] for k in ("images", "boxes", "captions")}
    row["train_r1"] = evaluate(model, vocab, fit)["r1"]
    tail = max(1, args.steps // 10)
    for key, values in log.items():
        if values:
            row[f"{key}_loss" if key in ("clean", "mix", "head") else key] = round(statistics.fmean(values[-tail:]), 4)
    for key in ("lost_obj", "pasted_obj", "lam"):
        if log[key]:
            row[f"{key}_all"] = round(statistics.fmean(log[key]), 4)  # mean over the whole run, not the tail
    if head is not None:
        row.update(head_quality(model, head, vocab, val, grid))
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    return row


# -------------------------------------------------------------------------------------------- running

_DATA: dict[str, Any] = {}


def _load(path: str) -> dict:
    if path not in _DATA:
        _DATA[path] = torch.load(path, weights_only=False)
    return _DATA[path]


def run(arm: str, size: int, seed: int, args: Any, data_dir: str) -> dict:
    """A worker's task: the corpora come from the files `prepare` wrote (read once per process)."""
    with one_thread():
        pool = _load(f"{data_dir}/pool-{seed}.pt")
        val = {k: pool[k][args.max_size: args.max_size + args.val] for k in ("images", "boxes", "captions")}
        test = None if args.no_test else _load(f"{data_dir}/test.pt")
        return train_run(arm, size, seed, args, pool, val, test)


def _make(kind: str, seed: int, n: int, image_size: int, path: str) -> str:
    with one_thread():
        torch.save(make_data(kind, seed, n, image_size), path)
    return path


def run_all(args: Any) -> list[dict]:
    """Make the corpora, then every (arm, size, seed) run, `args.jobs` at a time; rows reported as they come."""
    tasks = [(arm, size, seed) for size in sorted(args.sizes, reverse=True) for arm in args.arms
             for seed in args.seeds]
    tasks.sort(key=lambda t: (t[0] not in MIXED, -t[1]))  # longest first: better packing on the workers
    with tempfile.TemporaryDirectory(prefix="cmcaug-timix-rep-") as tmp:
        corpora = [("pool", s, args.max_size + args.val, f"{tmp}/pool-{s}.pt") for s in args.seeds]
        if not args.no_test:
            corpora.append(("test", args.eval_seed, args.test, f"{tmp}/test.pt"))
        if args.jobs == 1:
            for kind, s, n, path in corpora:
                _make(kind, s, n, args.image_size, path)
            return [_reported(run(*task, args, tmp)) for task in tasks]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in [pool.submit(_make, kind, s, n, args.image_size, path) for kind, s, n, path in corpora]:
                f.result()
            futures = [pool.submit(run, *task, args, tmp) for task in tasks]
            return [_reported(f.result()) for f in futures]


def _reported(row: dict) -> dict:
    shown = f"test r1 {row['r1']:.3f}" if "r1" in row else f"val r1 {row['val_r1']:.3f}"
    print(f"{row['arm']:>12} size {row['size']:5d} seed {row['seed']}: {shown} ({row['seconds']} s)",
          flush=True)
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0


def summarize(rows: list[dict], prefix: str = "") -> list[dict]:
    """Mean and std over seeds per (arm, size), and the paired (same seed) difference of r1 to `none`."""
    out = []
    keys = [prefix + m for m in METRICS]
    base = {(r["size"], r["seed"]): r for r in rows if r["arm"] == "none"}
    for size in sorted({r["size"] for r in rows}):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            group = [r for r in rows if r["arm"] == arm and r["size"] == size]
            if not group:
                continue
            entry: dict[str, Any] = {"arm": arm, "size": size, "runs": len(group)}
            for k in keys:
                entry[k], entry[k + "_std"] = _mean_std([r[k] for r in group])
            paired = [r[prefix + "r1"] - base[(size, r["seed"])][prefix + "r1"] for r in group
                      if (size, r["seed"]) in base]
            if arm != "none" and paired:
                entry["d_r1"], entry["d_r1_std"] = _mean_std(paired)
            for k in ("train_r1", "lost_obj_all", "pasted_obj_all", "head_rel_box", "head_rel_bg"):
                if k in group[0]:
                    entry[k] = round(statistics.fmean(r[k] for r in group), 4)
            out.append(entry)
    return out


def _pm(entry: dict, key: str) -> str:
    return f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}" if key in entry else ""


def markdown(payload: dict) -> str:
    cfg, summary, prefix = payload["config"], payload["summary"], payload["prefix"]
    split = "held-out test" if prefix == "" else "validation"
    lines = [f"# TiMix mini-replication ({payload['device']})", "",
             f"Command: `{payload['command']}`  ", f"Wall time: {payload['wall_seconds']} s on "
             f"{cfg['jobs']} worker process(es), one torch thread each; torch {payload['torch']}.", "",
             f"Retrieval on {payload['n_eval']} {split} pairs (chance R@1 = {payload['chance_r1']:.4f}, "
             f"R@5 = {payload['chance_r5']:.4f}); {cfg['steps']} steps of batch {cfg['batch_size']} per run; "
             f"seeds {cfg['seeds']}; mean ± std over seeds. r1 = mean of image->text and text->image R@1; "
             "Δr1 = paired difference to `none` (same seed, same batches). train r1: R@1 on (up to) "
             f"{cfg['val']} of the run's own training pairs.", "",
             "| size | arm | r1 | Δr1 vs none | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 | train r1 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['size']} | {e['arm']} | {_pm(e, prefix + 'r1')} | {_pm(e, 'd_r1')} | "
                     f"{_pm(e, prefix + 'i2t_r1')} | {_pm(e, prefix + 't2i_r1')} | {_pm(e, prefix + 'i2t_r5')} | "
                     f"{_pm(e, prefix + 't2i_r5')} | {e.get('train_r1', float('nan')):.3f} |")
    timix = [e for e in summary if "lost_obj_all" in e]
    if timix:
        lines += ["", "TiMix windows, averaged over training (object share = mean box coverage of the window's "
                  "patches; relevance of the head on validation box / background patches at the end):", "",
                  "| size | arm | object in lost window | object in pasted window | head relevance box / bg |",
                  "|---:|---|---:|---:|---:|"]
        for e in timix:
            rel = f"{e['head_rel_box']:.2f} / {e['head_rel_bg']:.2f}" if "head_rel_box" in e else ""
            lines.append(f"| {e['size']} | {e['arm']} | {e['lost_obj_all']:.3f} | {e['pasted_obj_all']:.3f} | {rel} |")
    lines += ["", "## Notes", "", payload.get("notes", NOTES).rstrip(), ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipped the plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    prefix, summary = payload["prefix"], payload["summary"]
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 4.8))
    arms = list(dict.fromkeys(e["arm"] for e in summary))
    sizes = sorted({e["size"] for e in summary})
    for k, arm in enumerate(arms):
        color = f"C{k}"
        shift = 1 + 0.025 * (k - (len(arms) - 1) / 2)  # spread the error bars apart on the log axis
        pts = sorted((e["size"], e[prefix + "r1"], e[prefix + "r1_std"]) for e in summary if e["arm"] == arm)
        ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=arm, color=color)
        diff = sorted((e["size"], e["d_r1"], e["d_r1_std"]) for e in summary if e["arm"] == arm and "d_r1" in e)
        if diff:
            dax.errorbar([p[0] * shift for p in diff], [p[1] for p in diff], yerr=[p[2] for p in diff], marker="o",
                         capsize=3, label=arm, color=color)
    ax.axhline(payload["chance_r1"], color="grey", linestyle="--", linewidth=1, label="chance")
    dax.axhline(0, color="C0", linestyle="--", linewidth=1, label="none (reference)")
    split = "held-out test" if prefix == "" else "validation"
    ax.set_title(f"R@1 on {payload['n_eval']} {split} pairs, mean ± std over {len(payload['config']['seeds'])} seeds",
                 fontsize=10)
    dax.set_title("paired difference to none (same seed and batches), mean ± std", fontsize=10)
    ax.set_ylabel("R@1 (mean of image->text, text->image)")
    dax.set_ylabel("Δ R@1 vs none")
    for a in (ax, dax):
        a.set_xscale("log")
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_xticks(sizes, [str(s) for s in sizes])
        a.set_xlabel(f"training pairs ({payload['config']['steps']} steps each)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("TiMix mini-replication (shapes world, from scratch)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(payload: dict, out: Path) -> Path:
    path = write_results(NAME, payload, out=out, device=payload["device"])
    stem = path.with_suffix("")
    Path(f"{stem}.md").write_text(markdown(payload))
    plot(payload, Path(f"{stem}.png"))
    print(f"wrote {stem}.md and {stem}.png")
    return path


SMOKE = {"sizes": [24, 48], "seeds": [0, 1], "steps": 4, "batch_size": 8, "val": 16, "test": 16, "dim": 16,
         "embed_dim": 16, "depth": 1}


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser("replicate_timix", __doc__)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000],
                        help="training-set sizes (pairs), nested prefixes of each seed's pool")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--mix-weight", type=float, default=1.0, help="weight of the mixed-batch loss")
    parser.add_argument("--window-ratio", type=float, nargs=2, default=[0.35, 0.75],
                        help="TiMix window side range as fractions of the grid side (text_aware_mix)")
    parser.add_argument("--timix-targets", choices=["soft", "hard"], default="soft",
                        help="TiMix arms' P: softmax of the clean logits (the paper) or the identity (hard labels)")
    parser.add_argument("--label-mode", choices=["area", "relevance"], default="area",
                        help="TiMix lam: area kept (the paper) or cmcaug's relevance-weighted variant")
    parser.add_argument("--dim", type=int, default=32, help="tower width")
    parser.add_argument("--embed-dim", type=int, default=32, help="shared embedding width")
    parser.add_argument("--depth", type=int, default=2, help="residual conv blocks of the image tower")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--val", type=int, default=200, help="validation pairs after the largest training set")
    parser.add_argument("--test", type=int, default=200, help="held-out test pairs")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the test corpus (never trained on)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one thread each")
    parser.add_argument("--no-test", action="store_true",
                        help="do not make or score the test set: report validation only (for tuning)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny defaults, the pipeline in seconds: {SMOKE}, --jobs 1")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="re-render the .md and .png of a results JSON")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE, jobs=1)  # tiny defaults; options given explicitly still win
    args = parser.parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        payload["notes"] = NOTES
        args.replot.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")  # as write_results writes
        stem = args.replot.with_suffix("")
        Path(f"{stem}.md").write_text(markdown(payload))
        plot(payload, Path(f"{stem}.png"))
        print(f"wrote {stem}.md and {stem}.png")
        return payload
    if args.eval_seed in args.seeds:
        parser.error(f"--eval-seed {args.eval_seed} is also a training seed: the test corpus would be trained on")
    if args.steps < 1 or args.batch_size < 2:
        parser.error("need --steps >= 1 and --batch-size >= 2")
    if args.jobs < 1 or min(args.sizes) < 2 or args.val < 2 or args.test < 2:
        parser.error("need --jobs >= 1 and at least 2 pairs per training set, validation and test set")
    args.max_size = max(args.sizes)
    start = time.perf_counter()
    rows = run_all(args)
    wall = round(time.perf_counter() - start, 1)
    rows.sort(key=lambda r: (r["size"], ARMS.index(r["arm"]), r["seed"]))
    prefix = "val_" if args.no_test else ""
    n_eval = args.val if args.no_test else args.test
    columns = ["arm", "size", "seed", *(prefix + m for m in METRICS), "train_r1", "clean_loss", "mix_loss",
               "head_loss", "lost_obj_all", "pasted_obj_all", "seconds"]
    if not args.no_test:
        columns.insert(8, "val_r1")
    print_table(rows, columns, f"per run: retrieval on {n_eval} {'validation' if args.no_test else 'test'} pairs, "
                f"{args.steps} steps of batch {args.batch_size}")
    summary = summarize(rows, prefix)
    print_table([{k: (_pm(e, k) if k + "_std" in e else e.get(k, "")) for k in
                  ("arm", "size", "runs", prefix + "r1", "d_r1", prefix + "i2t_r1", prefix + "t2i_r1", "train_r1")}
                 for e in summary], ["arm", "size", "runs", prefix + "r1", "d_r1", prefix + "i2t_r1", prefix + "t2i_r1",
                                     "train_r1"], "per (arm, size), mean ± std over seeds")
    print(f"\nwall time {wall} s")
    device = device_name("cpu")
    payload = {"device": device, "torch": torch.__version__, "threads_per_run": 1,
               "command": "python examples/replicate_timix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("out", "replot")},
               "wall_seconds": wall, "prefix": prefix, "n_eval": n_eval,
               "chance_r1": round(1 / n_eval, 4), "chance_r5": round(min(5, n_eval) / n_eval, 4),
               "notes": NOTES, "summary": summary, "rows": rows}
    write_reports(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
