"""`CMCTransform`: cross-modal CutMix (VLMixer) as a DataLoader collate function plus a GPU splice.

    cmc = CMCTransform(bank, tokenizer, tagger=tagger, ratio=0.5)
    loader = DataLoader(cmc.dataset(texts), batch_size=256, num_workers=4, collate_fn=cmc.collate)
    for batch in loader:                                   # CMCBatch
        batch = batch.to(device, non_blocking=True)
        text_emb = model.word_embeddings(batch.input_ids)
        patch_emb = patch_encoder(batch.patch_pixels(mean, std, dtype))       # [M, K, D]
        view = cmc.splice(text_emb, patch_emb, batch)      # SpliceOutput -> model(inputs_embeds=view.embeds)

Everything integer-sized is decided in `collate`, on the CPU, in the loader's workers: tokenize, align
each grounded word's characters to tokens, choose the words to replace, pick one bank patch per word
from its concept, build the `SplicePlan`, gather the patches' uint8 pixels (and, with `negatives=N`,
those of N hard-negative views: `cmcaug.negatives`). The GPU then only moves bytes (`cmc.splice`).
VLMixer published no code: choosing each grounded word independently with probability `ratio`, capping a caption at `max_replacements` (a uniformly random subset of the chosen),
and one bank patch of `patch_tokens` tokens per replaced word are this project's reading of the paper.

Reproducibility: every draw for sample i is a pure function of (seed, epoch, i) (`cmcaug.draws`), so views
do not depend on `num_workers`, on batch composition, or on the run, and `set_epoch` works with
`persistent_workers=True` (the epoch lives in shared memory). Items carry their dataset index through
`cmc.dataset(source)` (their position in a file, list, HF dataset or stream), as `{"index": i, ...}` dicts or
tag-text rows (`row_id`), or as `(i, item)` pairs (`cmcaug.inputs`); an item without one is keyed by a hash
of its caption instead (still deterministic; duplicate captions then share a view).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import draws, mlm
from ._generator import generator_seed
from .bank.reader import PatchBank
from .batch import CMCBatch, CMCStats
from .errors import InputError
from .inputs import IndexedItems, IndexedStream, Item, indexed, item_fields, item_spans, parse_item
from .negatives import draw_negatives
from .plan import SplicePlan
from .text.align import align_span_arrays
from .text.tokenize import tokenize_with_offsets

if TYPE_CHECKING:
    from .kernels import SpliceOutput

_IGNORE = -100


def _tokenizer_facts(tokenizer: Any) -> tuple[int | None, int | None, int | None]:
    """(mask token id, vocabulary size, longest input) of an HF or open_clip tokenizer."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if getattr(tokenizer, "is_fast", False):
        limit = getattr(tokenizer, "model_max_length", None)
        return mask_id, len(tokenizer), limit if isinstance(limit, int) and limit < 1_000_000 else None
    return mask_id, getattr(tokenizer, "vocab_size", None), getattr(tokenizer, "context_length", None)


class CMCTransform:
    """Cross-modal CutMix views of captions against a `PatchBank`; see the module docstring for the loop.

    `bank`: a `PatchBank`, or its folder, opened with `PatchBank.open(bank, validate=False)`: the structural
    checks, without the sha256 pass over every file or the FAISS index, which CMC never searches (open it
    yourself for those). `tokenizer`: an HF fast tokenizer, open_clip's tokenizer, or a callable `texts ->
    (ids, offsets)` (`cmcaug.text.tokenize.tokenize_with_offsets`). `tagger`: a `GroundingTagger` over the
    bank's vocabulary, used for items that arrive without spans. `ratio`: probability that each grounded
    word (whose concept has patches) is replaced; `max_replacements`: cap per caption. `max_length`: tokens
    per caption and per spliced row (default: the tokenizer's limit); a patch that would push a row past it
    is not spliced in. `patch_tokens` (K): tokens per patch from your patch encoder. `seed`: an int, or a
    `torch.Generator` from which one number is drawn now to serve as the seed. `negatives` (N): hard-negative
    views per caption, the same plan with other concepts' patches (`cmcaug.negatives`; `CMCBatch.negative_*`).
    """

    def __init__(self, bank: Any, tokenizer: Any, *, tagger: Any = None, ratio: float = 0.5,
                 max_replacements: int | None = None, max_length: int | None = None, patch_tokens: int = 1,
                 seed: int | torch.Generator = 0, negatives: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)) or not 0.0 <= ratio <= 1.0:
            raise InputError(f"ratio must be a number in [0, 1], got {ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, torch.Generator)):
            raise InputError(f"seed must be an int or a torch.Generator, got {seed!r}")
        for name, value, low in (("max_replacements", max_replacements, 0), ("max_length", max_length, 2),
                                 ("patch_tokens", patch_tokens, 1), ("negatives", negatives, 0)):
            optional = name in ("max_replacements", "max_length")
            if (value is not None or not optional) and (
                    isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low):
                raise InputError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")
        bank = _open_bank(bank)
        if tagger is not None and getattr(tagger, "vocab", bank.vocab) != bank.vocab:
            raise InputError("the tagger's vocabulary differs from the bank's, so concept ids would not match: "
                             "build the tagger with GroundingTagger(bank.vocab)")
        self.bank = bank
        self.tokenizer = tokenizer
        self.tagger = tagger
        self.ratio = float(ratio)
        self.max_replacements = max_replacements
        self.patch_tokens = int(patch_tokens)
        self.negatives = int(negatives)
        self._mask_token_id, self._vocab_size, limit = _tokenizer_facts(tokenizer)
        self.max_length = int(max_length) if max_length is not None else limit
        self.seed = generator_seed(seed) if isinstance(seed, torch.Generator) else int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with (persistent) workers
        self._counts = np.asarray(bank.counts, np.int64)
        self.stats = CMCStats()

    def __repr__(self) -> str:
        return (f"CMCTransform({self.bank!r}, tokenizer={type(self.tokenizer).__name__}, "
                f"tagger={'yes' if self.tagger is not None else 'no'}, ratio={self.ratio}, "
                f"max_replacements={self.max_replacements}, max_length={self.max_length}, "
                f"patch_tokens={self.patch_tokens}, negatives={self.negatives}, seed={self.seed}, epoch={self.epoch})")

    # -- epochs, datasets, stats -------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the views are drawn for (`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw new views from now on; DataLoader workers (persistent ones included) see it at once.

        Call it before iterating the loader for that epoch, as with `DistributedSampler.set_epoch`.
        """
        self._epoch.fill_(int(epoch))

    def dataset(self, source: Any, *, field: str = "caption", keep: Sequence[str] = (),
                streaming: bool = False) -> IndexedItems | IndexedStream:
        """`source` as a dataset whose items carry their position in it as their index (`cmcaug.inputs.indexed`).

        Map-style (`shuffle=True` works): a caption file (.txt, .jsonl, .json, .parquet, gzipped; tagged on the
        fly), a `cmcaug tag-text` file, a list, an HF `datasets.Dataset`. Streaming: an iterable, or any source
        with `streaming=True`; worker w of W takes positions w, w + W, ..., so views do not depend on
        `num_workers`. `field`: the caption column or key; `keep`: a caption file's fields to keep (as
        `tag-text --keep`). Fields reach `CMCBatch.fields`.
        """
        return indexed(source, self.bank.vocab, tagger=self.tagger, field=field, keep=keep, streaming=streaming)

    def reset_stats(self) -> CMCStats:
        """Return the stats gathered so far and start counting afresh."""
        stats, self.stats = self.stats, CMCStats()
        return stats

    # -- the CPU side ----------------------------------------------------------------------------
    def collate(self, items: Sequence[Any], generator: torch.Generator | None = None) -> CMCBatch:
        """Tokenize, ground, choose, sample and plan one batch (the DataLoader `collate_fn`).

        Each item is a caption, a `{"caption", "spans", "index"}` dict (spans as written by `cmcaug
        tag-text`: `{"start", "end", "concept_id"}` character spans; items without "spans" are tagged
        here), or an `(index, item)` pair. Without `generator`, sample i's draws depend on (seed, epoch,
        index) only. With one, a single number drawn from it replaces (seed, epoch) for this call, so the
        batch depends on the generator's state (and advances it) rather than on the epoch.
        """
        if isinstance(items, (str, bytes, Mapping)) or len(items) == 0:
            raise InputError("collate needs a non-empty list of items (captions, tag rows or (index, item) pairs)")
        rows = [parse_item(item, i) for i, item in enumerate(items)]
        captions = [r.caption for r in rows]
        keys = self._keys(rows, generator)
        spans = item_spans(rows, self.tagger)
        tokens = tokenize_with_offsets(self.tokenizer, captions, max_length=self.max_length)
        input_ids, offsets = tokens.input_ids, tokens.offsets
        lengths = tokens.attention_mask.sum(axis=1)
        last_char = offsets[..., 1].max(axis=1, initial=0)  # where the tokens stop reading the caption
        caption_end = np.fromiter((len(c.rstrip()) for c in captions), np.int64, len(rows))
        stats = CMCStats(
            captions=len(rows),
            empty_captions=sum(not c.strip() for c in captions),
            truncated_captions=int((last_char < caption_end).sum()),
            ungrounded_captions=sum(not s for s in spans),
        )
        row, start, end, concept, ordinal = self._choose(spans, offsets, lengths, keys, stats)
        per_row: list[list[tuple[int, int]]] = [[] for _ in rows]
        for b, s, e in zip(row.tolist(), start.tolist(), end.tolist()):
            per_row[b].append((s, e))
        plan = SplicePlan.build(lengths, per_row, patch_tokens=self.patch_tokens, text_length=input_ids.shape[1])
        patch_ids = self.bank.sample(concept, uniforms=draws.uniform(keys[row], draws.STREAM_PATCH, ordinal))
        attention_mask = torch.from_numpy(tokens.attention_mask)
        return CMCBatch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=attention_mask,
            special_tokens_mask=torch.from_numpy(tokens.special_tokens_mask),
            # built without max_length (`_choose` made every patch fit), the plan drops only replaced tokens
            replaced_mask=attention_mask.bool() & (plan.text_destination < 0),
            plan=plan,
            patch_ids=torch.from_numpy(patch_ids),
            concept_ids=torch.from_numpy(concept),
            pixels=self.bank.pixels(patch_ids),
            indices=torch.tensor([-1 if r.index is None else r.index for r in rows], dtype=torch.int64),
            captions=captions,
            sample_keys=keys,
            stats=stats,
            fields=item_fields(rows),
            **(draw_negatives(self.bank, concept, patch_ids, keys[row], ordinal, row, len(rows), self.negatives)
               if self.negatives else {}),  # no negatives: the fields stay None, nothing gathered
        )

    # -- the GPU side -----------------------------------------------------------------------------
    def splice(self, text_embeds: torch.Tensor, patch_embeds: torch.Tensor, batch: CMCBatch,
               backend: str = "auto", *, mask_embedding: torch.Tensor | None = None) -> SpliceOutput:
        """The CMC view: `patch_embeds` ([M, K, D], or [M, D] when K = 1) spliced into `text_embeds` [B, L, D].

        Returns the kernel's `SpliceOutput` (embeds, attention_mask, modality_ids, position_ids,
        source_index), differentiable in both inputs. Patch rows that `batch.patch_mask` hides
        (`mask_tokens(patch_targets="masked")`) show `mask_embedding` [D] instead (the [MASK] word embedding,
        differentiable too). The first splice of a batch (or of its copies) adds its counts to `cmc.stats`,
        here in the training process, whichever worker collated it.
        """
        from .kernels import splice

        if patch_embeds.dim() == 2 and self.patch_tokens == 1:
            patch_embeds = patch_embeds.unsqueeze(1)
        if batch.patch_mask is not None:
            patch_embeds = _show_masked(patch_embeds, batch.patch_mask, mask_embedding)
        out = splice(text_embeds, patch_embeds, batch.plan, backend=backend)
        if not getattr(batch.stats, "_recorded", False):  # once per collated batch, however many views
            self.stats.add(batch.stats)
            batch.stats._recorded = True  # shared by the batch's copies (.to, mask_tokens)
        return out

    def mask_tokens(self, batch: CMCBatch, mlm_probability: float = 0.15, *, patch_targets: str = mlm.DEFAULT_PATCH_TARGETS,
                    mask_token_id: int | None = None, vocab_size: int | None = None, mask_fraction: float = 0.8,
                    random_fraction: float = 0.1, ignore_index: int = _IGNORE,
                    generator: torch.Generator | None = None) -> CMCBatch:
        """BERT-style MLM on the CMC view: a new batch with masked `input_ids`, `labels` ([B, L_out], aligned
        with the spliced view) and `patch_mask`; see `cmcaug.mlm.mask_tokens` and `cmcaug.mlm.patch_targets`.

        `patch_targets` (one of `cmcaug.mlm.PATCH_TARGETS`) sets the patch rows' labels: "word" (the
        default), each patch predicts the word it replaced; "masked", slots are chosen and hidden like text
        tokens (at `mlm_probability`, `mask_fraction`; `patch_mask` marks the hidden rows for `splice`);
        "none", patch rows predict nothing. A replaced sub-token the tokenizer marks special ([UNK]) is
        never a target. `mask_token_id` and `vocab_size` default to the tokenizer's (open_clip's has no mask
        token: pass one). Works on a batch on any device, in a worker or in the training loop.
        """
        if patch_targets not in mlm.PATCH_TARGETS:
            raise InputError(f"patch_targets must be one of {mlm.PATCH_TARGETS}, got {patch_targets!r}")
        mask_token_id = self._mask_token_id if mask_token_id is None else mask_token_id
        vocab_size = self._vocab_size if vocab_size is None else vocab_size
        if mask_token_id is None or vocab_size is None:
            raise InputError(f"{type(self.tokenizer).__name__} has no mask token: pass mask_token_id= (and vocab_size=) "
                             "to mask_tokens, e.g. an id you reserve for [MASK]")
        keys = mlm.draw_keys(batch.sample_keys, len(batch), generator)  # one draw of generator serves both
        words = torch.where(batch.special_tokens_mask, ignore_index, batch.input_ids)
        patch_labels, patch_mask = mlm.patch_targets(
            words, batch.plan, keys, mode=patch_targets, mlm_probability=mlm_probability,
            mask_fraction=mask_fraction, ignore_index=ignore_index)
        maskable = ~(batch.special_tokens_mask | batch.replaced_mask)
        input_ids, labels = mlm.mask_tokens(
            batch.input_ids, maskable, batch.plan, keys, mlm_probability=mlm_probability,
            mask_token_id=int(mask_token_id), vocab_size=int(vocab_size), mask_fraction=mask_fraction,
            random_fraction=random_fraction, ignore_index=ignore_index, patch_labels=patch_labels)
        return dataclasses.replace(batch, input_ids=input_ids, labels=labels,
                                   patch_mask=patch_mask if patch_targets == "masked" else None)

    def _keys(self, rows: list[Item], generator: torch.Generator | None) -> np.ndarray:
        no_index = np.asarray([r.index is None for r in rows])
        ids = [draws.content_id(r.caption) if r.index is None else r.index for r in rows]
        if generator is not None:
            return draws.sample_keys(generator_seed(generator), 0, ids, no_index)
        return draws.sample_keys(self.seed, self.epoch, ids, no_index)

    def _choose(self, spans: list[list[tuple[int, int, int]]], offsets: np.ndarray, lengths: np.ndarray,
                keys: np.ndarray, stats: CMCStats) -> tuple[np.ndarray, ...]:
        """(row, token_start, token_end, concept_id, span ordinal) of the spans to replace, in slot order.

        Span j of sample i is a candidate when it aligns to whole tokens, overlaps no earlier span and its
        concept has patches; it is chosen when u(i, j) < ratio. Of a row's chosen spans the `max_replacements`
        with the smallest u stay (a uniform subset), then, in order of u, those whose patch fits max_length.
        """
        counts = np.fromiter(map(len, spans), np.int64, len(spans))
        flat = np.asarray([s for row in spans for s in row], dtype=np.int64).reshape(-1, 3)
        row = np.repeat(np.arange(len(spans)), counts)
        ordinal = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        outside = (flat[:, 2] < 0) | (flat[:, 2] >= len(self._counts))
        if outside.any():
            i = int(outside.argmax())
            raise InputError(f"batch item {int(row[i])}: concept id {int(flat[i, 2])} is outside the bank's vocabulary "
                             f"[0, {len(self._counts)}); tag the text with the bank's vocabulary (cmcaug tag-text --bank BANK)")
        start, end, ok = align_span_arrays(row, flat[:, 0], flat[:, 1], offsets)
        overlap = _overlapping(row, start, end, ok)
        absent = ok & ~overlap & (self._counts[flat[:, 2]] == 0)
        stats.spans = int(row.size)
        stats.spans_truncated = int((~ok).sum())
        stats.spans_overlapping = int(overlap.sum())
        stats.spans_absent = int(absent.sum())
        for c, n in zip(*np.unique(flat[absent, 2], return_counts=True)):
            stats.absent_concepts[self.bank.vocab.name(c)] = int(n)
        u = draws.uniform(keys[row], draws.STREAM_SELECT, ordinal)
        picked = np.flatnonzero(ok & ~overlap & ~absent & (u < self.ratio))
        picked = picked[np.lexsort((u[picked], row[picked]))]  # by row, then by u
        if self.max_replacements is not None:
            rank = np.arange(picked.size) - np.searchsorted(row[picked], row[picked])  # 0, 1, ... within a row
            picked = picked[rank < self.max_replacements]
        if self.max_length is not None and picked.size:
            picked = self._fit(picked, row, end - start, lengths, stats)
        stats.spans_replaced = int(picked.size)
        picked = picked[np.lexsort((start[picked], row[picked]))]  # slot order: row by row, left to right
        return row[picked], start[picked], end[picked], flat[picked, 2], ordinal[picked]

    def _fit(self, picked: np.ndarray, row: np.ndarray, width: np.ndarray, lengths: np.ndarray,
             stats: CMCStats) -> np.ndarray:
        """Drop chosen spans whose K-token patch would push their row past max_length (in order of u)."""
        extra = self.patch_tokens - width[picked]  # tokens a replacement adds: <= 0 when K <= span width
        if (extra <= 0).all():  # always so for one-token patches
            return picked
        free = self.max_length - lengths
        keep = np.ones(picked.size, bool)
        for i, (b, grow) in enumerate(zip(row[picked].tolist(), extra.tolist())):  # by row, then by u
            if grow > free[b]:
                keep[i] = False
                stats.spans_no_room += 1
            else:
                free[b] -= grow
        return picked[keep]


def _open_bank(bank: Any) -> Any:
    """`bank`, or the bank in the folder `bank` names (see `CMCTransform`)."""
    if isinstance(bank, (str, os.PathLike)):
        return PatchBank.open(bank, validate=False)
    if not (hasattr(bank, "counts") and hasattr(bank, "vocab")):
        raise InputError(f"bank must be a PatchBank or the path of a bank folder, got {type(bank).__name__}")
    return bank


def _show_masked(patch_embeds: torch.Tensor, patch_mask: torch.Tensor, mask_embedding: torch.Tensor | None) -> torch.Tensor:
    """`patch_embeds` [M, K, D] with the rows `patch_mask` [M, K] marks replaced by `mask_embedding` [D]."""
    if mask_embedding is None:
        if not bool(patch_mask.any()):  # a host sync, only when no mask_embedding came
            return patch_embeds
        raise InputError("batch.patch_mask hides some patches (mask_tokens(patch_targets='masked')): pass "
                         "mask_embedding=model.get_input_embeddings().weight[tokenizer.mask_token_id] to splice")
    if not isinstance(mask_embedding, torch.Tensor) or tuple(mask_embedding.shape) != patch_embeds.shape[-1:]:
        found = list(mask_embedding.shape) if isinstance(mask_embedding, torch.Tensor) else type(mask_embedding).__name__
        raise InputError(f"mask_embedding must be a tensor [D] = [{patch_embeds.shape[-1]}], got {found}")
    if tuple(patch_mask.shape) != tuple(patch_embeds.shape[:2]):
        raise InputError(f"batch.patch_mask is {list(patch_mask.shape)} but patch_embeds are "
                         f"{list(patch_embeds.shape)}: they must share [M, K]")
    return torch.where(patch_mask[..., None], mask_embedding.to(patch_embeds.dtype), patch_embeds)


def _overlapping(row: np.ndarray, start: np.ndarray, end: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Aligned spans that share a token with any earlier aligned span of their row (ordered by start)."""
    idx = np.flatnonzero(ok)
    idx = idx[np.lexsort((idx, start[idx], row[idx]))]
    scale = int(end.max(initial=0)) + 1
    reach = np.maximum.accumulate(row[idx] * scale + end[idx])  # furthest end so far, rows kept apart
    overlap = np.zeros(row.size, bool)
    overlap[idx[1:]] = row[idx[1:]] * scale + start[idx[1:]] < reach[:-1]
    return overlap
