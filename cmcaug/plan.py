"""`SplicePlan`: the drawn part of cross-modal CutMix, as integer index maps built with NumPy on the CPU.

A plan says, for every row of the spliced output, where its embedding comes from. It is built in the
DataLoader workers from token counts and the token spans chosen for replacement, so the GPU only has to
move bytes (`cmcaug.kernels.splice`). Each replaced span becomes one patch *slot* of `patch_tokens` (K)
tokens; slots are numbered row by row, left to right, and `patches[m]` fills slot m.

Index maps (int32, so that they are small to ship and cheap to read in a kernel):

- `source_index [B, L_out]`, the signed source map: `s >= 0` is row `s = b*L + j` of the text viewed as
  `[B*L, D]`; `s < 0` (and not the sentinel) is row `-s - 1 = m*K + k` of the patches viewed as
  `[M*K, D]`; `PAD_SOURCE` (the kernels' sentinel, `cmcaug.kernels.index_maps`) marks padding.
- `text_destination [B, L]` and `patch_destination [M, K]`, the inverse maps: the flat output row
  `b*L_out + t` that each text / patch row is copied to, or -1 (replaced, truncated or padding). Every
  source row has at most one destination, so the backward pass is a gather: no atomics, deterministic.

`L` is the width of the padded text tensor the plan applies to (`text_length`, by default the longest
row) and `L_out` the width of the spliced output: the longest spliced row, capped at `max_length`.

`slot_token_spans [M, 2]` keeps the text-token range each slot replaced, so a patch row can be given the word
it stands for as its MLM target (`replaced_token_values`, placed by `remap_labels(patch_labels=...)`).
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field, replace

import numpy as np
import torch

from cmcaug.kernels.index_maps import PAD_SOURCE

from .errors import InputError
from .plan_checks import INDEX_MAPS as _INDEX_MAPS
from .plan_checks import TOKEN_MAPS as _TOKEN_MAPS
from .plan_checks import check_plan as _check_plan

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, repr=False, eq=False)
class SplicePlan:
    """Where every row of a spliced batch comes from; build it with `SplicePlan.build`.

    The index maps are tensors that follow the plan to a device (`to`, `pin_memory`); the per-row
    counts are NumPy arrays for the CPU side (choosing which bank patches fill the slots). A plan made
    by hand (this constructor, `dataclasses.replace`) is checked first and refused with `InputError` if
    the kernels could misread it; `validate=False` skips that for maps valid by construction, as `build` does.
    """

    source_index: torch.Tensor       # int32 [B, L_out]
    text_destination: torch.Tensor   # int32 [B, L]
    patch_destination: torch.Tensor  # int32 [M, K]
    text_lengths: np.ndarray         # int64 [B]: tokens of each text row
    output_lengths: np.ndarray       # int64 [B]: tokens of each spliced row
    slots_per_row: np.ndarray        # int64 [B]: the first slots_per_row[b] spans of row b were replaced
    # Per-token maps a transformer takes beside the embeddings, derived from `source_index` when the plan is
    # made (in the DataLoader workers) and moved with it: a splice then launches nothing but its gather, and
    # `torch.compile` sees plain tensor attributes. Treat them as read-only.
    attention_mask: torch.Tensor = field(default=None)  # int64 [B, L_out]: 1 text and patch tokens, 0 padding
    modality_ids: torch.Tensor = field(default=None)    # int64 [B, L_out]: 0 text tokens and padding, 1 patches
    position_ids: torch.Tensor = field(default=None)    # int64 [B, L_out]: 0, 1, 2, ... per row, 0 on padding
    # NumPy int64 [M, 2]: the (start, end) text-token range each slot replaced, in slot order; None on a plan
    # made by hand without it (then `replaced_token_values` has nothing to read).
    slot_token_spans: np.ndarray | None = None

    _: KW_ONLY
    validate: InitVar[bool] = True  # see `cmcaug.plan_checks`; `build`, `to` and `pin_memory` pass False

    def __post_init__(self, validate: bool) -> None:
        if validate:
            _check_plan(self)
        missing = [name for name in _TOKEN_MAPS if getattr(self, name) is None]
        if missing:
            derived = _token_maps(self.source_index)
            for name in missing:
                object.__setattr__(self, name, derived[name])

    @classmethod
    def build(
        cls,
        text_lengths: Sequence[int] | np.ndarray,
        spans: Sequence[Sequence[tuple[int, int]]],
        patch_tokens: int = 1,
        max_length: int | None = None,
        *,
        text_length: int | None = None,
    ) -> SplicePlan:
        """Plan a batch: replace each token range in `spans[b]` by one patch of `patch_tokens` tokens.

        `spans[b]` holds sorted, non-overlapping, non-empty `(start, end)` token ranges of row b. With
        `max_length`, spliced rows are truncated to it and a span whose patch would not fit entirely is
        left as text (then so are the spans after it). `text_length` is the width L of the padded text
        tensor the plan will be applied to (default: the longest row).
        """
        lengths = _int_array(text_lengths, "text_lengths")
        if lengths.ndim != 1 or lengths.size == 0:
            raise InputError(f"text_lengths must be a non-empty 1-D list of token counts, got shape {lengths.shape}")
        if lengths.min() < 0:
            raise InputError(f"text_lengths must be >= 0, got {int(lengths.min())} in row {int(lengths.argmin())}")
        batch = lengths.size
        k = _positive_int(patch_tokens, "patch_tokens")
        cap = None if max_length is None else _positive_int(max_length, "max_length")
        width = int(lengths.max()) if text_length is None else _positive_int(text_length, "text_length", minimum=0)
        if width < lengths.max():
            raise InputError(
                f"text_length={width} is shorter than the longest row ({int(lengths.max())} tokens, row "
                f"{int(lengths.argmax())}); pass the padded width of the text tensor, or leave it unset"
            )
        _check_int32(batch * width, "text rows B*L")
        starts, ends, span_row, counts = _flatten_spans(spans, batch)
        _check_spans(starts, ends, span_row, lengths)

        # Output position of each span's patch if every span of its row is replaced; a span that does not
        # fit is dropped, and since positions grow by at least K per span, so are all later spans of its row.
        first_span = np.cumsum(counts) - counts
        nth_in_row = np.arange(starts.size) - first_span[span_row]
        removed = np.concatenate(([0], np.cumsum(ends - starts)))
        removed_before = removed[:-1] - removed[first_span[span_row]]
        out_start = starts - removed_before + k * nth_in_row
        kept = np.ones(starts.size, bool) if cap is None else out_start + k <= cap
        starts, ends, span_row, out_start = starts[kept], ends[kept], span_row[kept], out_start[kept]
        slots_per_row = np.bincount(span_row, minlength=batch).astype(np.int64)

        # Text token j of row b moves by K - (end - start) for every kept span ending at or before j.
        shift = np.zeros((batch, width + 1), np.int64)
        shift[span_row, ends] = k - (ends - starts)
        inside = np.zeros((batch, width + 1), np.int64)
        inside[span_row, starts] += 1
        np.subtract.at(inside, (span_row, ends), 1)  # an end may share a cell with the next span's start
        position = np.arange(width) + np.cumsum(shift, axis=1)[:, :width]
        is_text = (np.arange(width) < lengths[:, None]) & (np.cumsum(inside, axis=1)[:, :width] == 0)
        out_lengths = lengths + np.bincount(span_row, weights=k - (ends - starts), minlength=batch).astype(np.int64)
        if cap is not None:
            is_text &= position < cap
            out_lengths = np.minimum(out_lengths, cap)
        out_width = int(out_lengths.max())
        _check_int32(batch * out_width, "output rows B*L_out")
        _check_int32(span_row.size * k, "patch rows M*K")

        text_b, text_j = np.nonzero(is_text)
        text_t = position[text_b, text_j]
        source = np.full((batch, out_width), PAD_SOURCE, np.int32)
        source[text_b, text_t] = text_b * width + text_j
        text_destination = np.full((batch, width), -1, np.int32)
        text_destination[text_b, text_j] = text_b * out_width + text_t

        patch_t = out_start[:, None] + np.arange(k)
        source[span_row[:, None], patch_t] = -1 - np.arange(span_row.size * k).reshape(-1, k)
        patch_destination = (span_row[:, None] * out_width + patch_t).astype(np.int32)
        return cls(
            source_index=torch.from_numpy(source),
            text_destination=torch.from_numpy(text_destination),
            patch_destination=torch.from_numpy(patch_destination),
            text_lengths=lengths,
            output_lengths=out_lengths,
            slots_per_row=slots_per_row,
            slot_token_spans=np.stack([starts, ends], axis=1),
            validate=False,
        )

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.source_index.shape[0]

    @property
    def text_length(self) -> int:
        """L: the width of the padded text tensor this plan applies to."""
        return self.text_destination.shape[1]

    @property
    def output_length(self) -> int:
        """L_out: the width of the spliced output."""
        return self.source_index.shape[1]

    @property
    def num_slots(self) -> int:
        """M: patch slots in the batch (one per replaced span); `patches` must have M rows."""
        return self.patch_destination.shape[0]

    @property
    def patch_tokens(self) -> int:
        """K: tokens per patch."""
        return self.patch_destination.shape[1]

    @property
    def device(self) -> torch.device:
        return self.source_index.device

    # -- slots, derived from slots_per_row (the replaced spans of a row are always its first ones) -----------
    @functools.cached_property
    def slot_rows(self) -> np.ndarray:
        """int64 [M]: the row of each patch slot."""
        return np.repeat(np.arange(self.slots_per_row.size), self.slots_per_row)

    @functools.cached_property
    def slot_span_index(self) -> np.ndarray:
        """int64 [M]: which of `spans[row]` each slot replaced."""
        first_slot = np.cumsum(self.slots_per_row) - self.slots_per_row
        return np.arange(self.slot_rows.size) - first_slot[self.slot_rows]

    def remap_labels(self, labels: torch.Tensor, ignore_index: int = -100,
                     patch_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values of the text ([B, L], e.g. MLM labels or token ids) laid out like the output.

        Text positions take the value of their source token, padding `ignore_index`. Patch positions take
        `patch_labels` ([M, K], e.g. `replaced_token_values`), each row where `patch_destination` puts it,
        or `ignore_index` without them.
        """
        self._check_text_values(labels, "labels")
        if labels.device != self.device:
            raise InputError(
                f"labels are on {labels.device} but the plan is on {self.device}; use plan.to(labels.device)"
            )
        source = self.source_index.long()
        gathered = labels.reshape(-1)[source.clamp(min=0)]
        out = torch.where(source >= 0, gathered, torch.full_like(gathered, ignore_index))
        if patch_labels is None:
            return out
        expected = (self.num_slots, self.patch_tokens)
        if not isinstance(patch_labels, torch.Tensor) or tuple(patch_labels.shape) != expected:
            found = list(patch_labels.shape) if isinstance(patch_labels, torch.Tensor) else type(patch_labels).__name__
            raise InputError(f"patch_labels must be a tensor [M, K] = {list(expected)}, one value per patch row, got {found}")
        if patch_labels.device != labels.device:
            raise InputError(f"patch_labels are on {patch_labels.device} but labels on {labels.device}; move one of them")
        if not self.num_slots:
            return out
        # The patch row each output row reads (the inverse of patch_destination), gathered: no scatter.
        is_patch = (source < 0) & (source != PAD_SOURCE)
        placed = patch_labels.reshape(-1).to(out.dtype)[torch.where(is_patch, -1 - source, 0)]
        return torch.where(is_patch, placed, out)

    def replaced_token_values(self, values: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The text values ([B, L], e.g. token ids) under each slot's replaced span, per patch row: [M, K].

        Patch row k predicts the word's k-th sub-token; rows past the word's last sub-token predict nothing
        (`ignore_index`); sub-tokens past K are not predicted (with K = 1: the first sub-token). These are
        the MLM targets that make a patch stand for the word it replaced, and any device's `values` will do.
        """
        if self.slot_token_spans is None:
            raise InputError("this plan has no slot_token_spans (a plan made by hand without them), so the tokens "
                             "each slot replaced are unknown: build it with SplicePlan.build, or pass slot_token_spans")
        self._check_text_values(values, "values")
        rows = torch.from_numpy(self._replaced_rows).to(values.device, non_blocking=True)
        gathered = values.reshape(-1)[rows.clamp(min=0)]
        return torch.where(rows >= 0, gathered, torch.full_like(gathered, ignore_index))

    @functools.cached_property
    def _replaced_rows(self) -> np.ndarray:
        """int64 [M, K]: the flat text row b*L + start + k that patch row k of each slot predicts, or -1."""
        start, end = self.slot_token_spans.astype(np.int64).T
        k = np.arange(self.patch_tokens)
        rows = self.slot_rows[:, None] * self.text_length + start[:, None] + k
        return np.where(k < (end - start)[:, None], rows, -1)

    def _check_text_values(self, values: torch.Tensor, name: str) -> None:
        if not isinstance(values, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor [B, L], got {type(values).__name__}")
        expected = (self.batch_size, self.text_length)
        if tuple(values.shape) != expected:
            raise InputError(
                f"{name} must have shape [B, L] = {list(expected)} like the text the plan was built for, "
                f"got {list(values.shape)}"
            )

    # -- placement -------------------------------------------------------------------------------------
    def to(self, device: torch.device | str, non_blocking: bool = False) -> SplicePlan:
        """The plan with its index maps on `device` (non_blocking copies need a pinned plan)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SplicePlan:
        """The plan with its index maps in pinned memory (a DataLoader with pin_memory=True calls this)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> SplicePlan:
        return replace(
            self,
            **{name: fn(getattr(self, name)) for name in _INDEX_MAPS + _TOKEN_MAPS},
            validate=False,
        )

    def __repr__(self) -> str:
        return (
            f"SplicePlan(batch_size={self.batch_size}, text_length={self.text_length}, "
            f"output_length={self.output_length}, num_slots={self.num_slots}, "
            f"patch_tokens={self.patch_tokens}, device={self.device})"
        )


def _token_maps(source_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """attention_mask, modality_ids and position_ids of a signed source map (see the fields' comments)."""
    attention_mask = (source_index != PAD_SOURCE).long()
    return {
        "attention_mask": attention_mask,
        "modality_ids": ((source_index < 0) & attention_mask.bool()).long(),
        "position_ids": torch.arange(source_index.shape[1], device=source_index.device) * attention_mask,
    }


def _int_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)  # a copy: the plan must not change when the caller reuses its array


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _flatten_spans(spans, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All rows' spans as flat (starts, ends, row) arrays, plus the number of spans per row."""
    if isinstance(spans, (str, bytes)) or len(spans) != batch:
        found = type(spans).__name__ if isinstance(spans, (str, bytes)) else f"{len(spans)} rows"
        raise InputError(f"spans must hold one list of (start, end) pairs per row ({batch} rows), got {found}")
    counts = np.fromiter((len(row) for row in spans), np.int64, count=batch)
    flat = _int_array(list(itertools.chain.from_iterable(spans)), "spans")
    if flat.size == 0:
        flat = flat.reshape(0, 2)
    if flat.ndim != 2 or flat.shape[1] != 2:
        raise InputError("spans[b] must be a list of (start, end) pairs of token indices")
    return flat[:, 0], flat[:, 1], np.repeat(np.arange(batch), counts), counts


def _check_spans(starts: np.ndarray, ends: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
    bad = (starts < 0) | (ends <= starts) | (ends > lengths[rows])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"span ({int(starts[i])}, {int(ends[i])}) of row {int(rows[i])} is not a non-empty token range "
            f"inside the row's {int(lengths[rows[i]])} tokens (need 0 <= start < end <= length)"
        )
    overlap = (rows[1:] == rows[:-1]) & (starts[1:] < ends[:-1])
    if overlap.any():
        i = int(np.flatnonzero(overlap)[0])
        raise InputError(
            f"spans of row {int(rows[i])} must be sorted and non-overlapping, got ({int(starts[i])}, "
            f"{int(ends[i])}) before ({int(starts[i + 1])}, {int(ends[i + 1])})"
        )


def _check_int32(count: int, what: str) -> None:
    if count > _INT32_MAX:
        raise InputError(f"{what} = {count} does not fit the plan's int32 index maps; split the batch")
