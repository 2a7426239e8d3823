"""How well a model pre-trained with the VLMixer objective aligns patches with words: three readouts.

All three score a `cmcaug.vlmixer.VLMixerObjective` (its text model and patch encoder) on a held-out
shapes world (images and captions never seen in training):

- `zero_shot_accuracy` (the [CLS] readout): every held-out patch, alone in a sequence laid out as a CMC
  view (`[CLS] patch [SEP]`), is classified by the concept name whose text view (`[CLS] name [SEP]`) is
  nearest (cosine of pooled states). Chance: 1 / concepts.
- `in_context_accuracy` (no trained probe): each grounded word of a held-out caption is replaced, in turn,
  by a held-out patch of every concept; correct when the view with the right concept's patch is the one
  nearest the caption's own text view. It reads the patch in context, as the contrast trains it to.
- `retrieval`: the paper's protocol in miniature. The model is fine-tuned for image-text retrieval on a
  few paired images (an image = the sequence of its object patches, `[CLS] p1 p2 ... [SEP]`; a caption =
  its text view; symmetric InfoNCE on pooled states), then held-out images and captions are retrieved
  (R@1 / R@5, each direction and their mean). From scratch, the same fine-tuning gives the baseline.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cmcaug import PatchBank, SplicePlan
from cmcaug.losses import info_nce
from cmcaug.text.align import align_span_arrays
from cmcaug.text.tokenize import tokenize_with_offsets
from cmcaug.vlmixer import VLMixerObjective, eval_mode

CHUNK = 512  # sequences per forward pass in evaluation


@contextlib.contextmanager
def evaluating(objective: VLMixerObjective) -> Iterator[None]:
    """Eval mode and no gradients, restoring every module's own mode after."""
    with eval_mode(objective), torch.no_grad():
        yield


def encode_captions(objective: VLMixerObjective, captions: list[str]) -> torch.Tensor:
    """Pooled text views [N, D] of `captions`."""
    tokens = tokenize_with_offsets(objective.cmc.tokenizer, captions, max_length=objective.cmc.max_length)
    return objective.encode_text(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)).pooled.cpu()


def zero_shot_accuracy(objective: VLMixerObjective, bank: PatchBank) -> dict:
    """Top-1 accuracy of every patch of `bank` against the concept names, chance and per-concept accuracy."""
    names, counts = bank.vocab.names, bank.counts
    labels = torch.from_numpy(np.repeat(np.arange(len(names)), counts))
    with evaluating(objective):
        pixels = bank.pixels(np.arange(len(labels)))
        patches = torch.cat([objective.encode_patches(p).pooled.cpu() for p in pixels.split(CHUNK)])
        text = encode_captions(objective, list(names))
    predicted = (F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).T).argmax(1)
    correct = (predicted == labels).float()
    return {"accuracy": round(correct.mean().item(), 4), "chance": round(1 / len(names), 4),
            "patches": len(labels),
            "per_concept": {n: round(correct[labels == c].mean().item(), 4) for c, n in enumerate(names) if counts[c]}}


def in_context_accuracy(objective: VLMixerObjective, bank: PatchBank, rows: list[dict], seed: int) -> dict:
    """Each grounded word of `rows` swapped for one patch of every concept: is the right one nearest the text?"""
    cmc, concepts = objective.cmc, np.flatnonzero(bank.counts > 0)
    tokens = tokenize_with_offsets(cmc.tokenizer, [r["caption"] for r in rows], max_length=cmc.max_length)
    spans = [(b, s["start"], s["end"], s["concept_id"]) for b, r in enumerate(rows) for s in r["spans"]]
    row, start, end, truth = (np.asarray(v, np.int64) for v in zip(*spans))
    first, last, ok = align_span_arrays(row, start, end, tokens.offsets)
    row, first, last, truth = row[ok], first[ok], last[ok], truth[ok]
    generator = torch.Generator().manual_seed(seed)
    # one patch per (word, candidate concept), the words' rows repeated once per candidate
    candidates = np.tile(concepts, row.size)
    patch_ids = bank.sample(candidates, generator=generator)
    view_row, view_first, view_last = (np.repeat(v, concepts.size) for v in (row, first, last))
    lengths = tokens.attention_mask.sum(1)
    ids = torch.from_numpy(tokens.input_ids)
    with evaluating(objective):
        text = F.normalize(encode_captions(objective, [r["caption"] for r in rows]), dim=-1)
        pooled = []
        for chunk in np.array_split(np.arange(view_row.size), max(1, view_row.size // CHUNK)):
            plan = SplicePlan.build(lengths[view_row[chunk]], [[(int(view_first[i]), int(view_last[i]))] for i in chunk],
                                    patch_tokens=cmc.patch_tokens, text_length=ids.shape[1])
            pooled.append(objective.encode_spliced(ids[view_row[chunk]], plan, bank.pixels(patch_ids[chunk])).pooled.cpu())
    views = F.normalize(torch.cat(pooled), dim=-1).reshape(row.size, concepts.size, -1)
    scores = (views * text[torch.from_numpy(row)][:, None]).sum(-1)
    predicted = torch.from_numpy(concepts)[scores.argmax(1)]
    correct = (predicted == torch.from_numpy(truth)).float()
    return {"accuracy": round(correct.mean().item(), 4), "chance": round(1 / concepts.size, 4), "words": int(row.size)}


def image_groups(bank: PatchBank, rows: list[dict]) -> tuple[list[np.ndarray], list[str]]:
    """The patch ids of every image of `bank` that kept an object, and that image's caption (rows in image order)."""
    records = bank.records(np.arange(len(bank)))
    by_image: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_image.setdefault(r["image"], []).append(i)
    names = sorted(by_image)
    return [np.asarray(by_image[n]) for n in names], [rows[int(n.split(".")[0]) - 1]["caption"] for n in names]


def encode_images(objective: VLMixerObjective, bank: PatchBank, groups: list[np.ndarray]) -> torch.Tensor:
    """Pooled [N, D]: each image as the sequence of its object patches."""
    ids = np.concatenate(groups)
    return objective.encode_patches(bank.pixels(ids), [len(g) for g in groups]).pooled.cpu()


def recall(image: torch.Tensor, text: torch.Tensor) -> dict:
    """R@1 / R@5 of image->text and text->image retrieval (pair i is image i and caption i), and their means."""
    sims = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        rank = (s > s.diagonal()[:, None]).sum(1)  # how many beat the right one
        for k in (1, 5):
            out[f"{name}_r{k}"] = round((rank < k).float().mean().item(), 4)
    for k in (1, 5):
        out[f"r{k}"] = round((out[f"i2t_r{k}"] + out[f"t2i_r{k}"]) / 2, 4)
    return out


def retrieval(objective: VLMixerObjective, train: tuple[PatchBank, list[dict]], test: tuple[PatchBank, list[dict]],
              fraction: float, *, steps: int, batch_size: int, lr: float, temperature: float, seed: int) -> dict:
    """Fine-tune a copy of `objective`'s model on `fraction` of the training pairs, then R@k on the test pairs."""
    model = copy.deepcopy(objective)
    train_groups, train_captions = image_groups(*train)
    order = torch.randperm(len(train_groups), generator=torch.Generator().manual_seed(seed)).tolist()
    pairs = order[:max(2, round(fraction * len(order)))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        pick = [pairs[i] for i in torch.randperm(len(pairs), generator=generator)[:batch_size].tolist()]
        image = encode_images(model, train[0], [train_groups[i] for i in pick])
        loss = info_nce(image, encode_captions(model, [train_captions[i] for i in pick]), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    test_groups, test_captions = image_groups(*test)
    with evaluating(model):
        result = recall(encode_images(model, test[0], test_groups), encode_captions(model, test_captions))
    return {"pairs": len(pairs), "test_pairs": len(test_groups), "chance_r1": round(1 / len(test_groups), 4), **result}
