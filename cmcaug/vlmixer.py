"""VLMixer's pre-training objective on unpaired text: MLM on the CMC view + the text-view / CMC-view contrast.

    objective = VLMixerObjective(cmc, model, patch_encoder, mean=MEAN, std=STD)   # model: BertForMaskedLM, ...
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    for batch in loader:                                                            # collate_fn=cmc.collate
        losses = objective(batch)                                                   # .loss, .mlm, .contrastive
        losses.loss.backward(); optimizer.step(); optimizer.zero_grad()

VLMixer (Wang et al., ICML 2022) says MLM on the mixed sentence "learns the denoising representation, which
encourages the token-level alignment", and the contrast between a caption and its CMC view gives
instance-level alignment. Its code was never released; what follows is this project's reading, chosen by
measurement on the shapes world (`examples/replicate_vlmixer.py`, README "Does it work?"):

- **Patch-slot targets** (`patch_targets`, see `cmcaug.mlm.patch_targets`): a patch row predicts the word it
  replaced ("word", the default). With targets on text rows only ("none") nothing ties a patch to its
  word and zero-shot alignment stays at chance. The target is the word the grounding tagger found, so the
  signal comes from the bank's concept labels (the detector's, on the image-only corpus, as in the paper)
  routed through the MLM head: still no image is ever paired with a caption.
- **Hard patch negatives** (`CMCTransform(negatives=N)`): the caption's own CMC view with other concepts'
  patches is an extra negative of the contrast. In-batch negatives differ from the positive in their
  words, which the text view already identifies, so they never force a patch to stand for its word.
- **No dropout in the contrast passes** (`contrast_dropout=False`): two differently dropped copies of one
  caption differ by more than a one-patch swap, so with dropout on, the noise partly hides what a hard
  negative changes (measured: in-context readout 0.88 instead of 0.98). The contrast passes run the text
  model with its modules' training flags off (gradients still flow); MLM keeps dropout.

Readouts for evaluation: `encode_text` (the text view; with a plan, the replaced words' states),
`encode_view` (a batch's CMC view, with its patch slots' states), `encode_spliced` (any plan),
`encode_patches` (patches alone, or groups of patches as an image, laid out like a CMC view): each returns
a `Readout` (pooled vector, hidden states, patch or word states).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .losses import info_nce
from .mlm import DEFAULT_PATCH_TARGETS, PATCH_TARGETS
from .plan import SplicePlan
from .text.align import align_span_arrays
from .text.tokenize import tokenize_with_offsets
from .text_encoders import text_encoder

if TYPE_CHECKING:
    from .kernels import SpliceOutput

_PLACEHOLDER = "x"  # one word per patch of `encode_patches`, replaced before the model sees it


@dataclass
class VLMixerLosses:
    """The objective's total and its terms (scalars); `as_dict` gives floats for logging."""

    loss: torch.Tensor
    mlm: torch.Tensor
    contrastive: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss.item(), "mlm": self.mlm.item(), "contrastive": self.contrastive.item()}


@dataclass
class Readout:
    """What the encoder made of a batch: `pooled` [B, D] ([CLS] / end token), `hidden` [B, L, D], the
    `attention_mask` [B, L] it read them with, the patch slots' states `patch_states` [M, K, D] (a CMC
    view), and `word_states` [M, D], the text view's states of the words the slots replace, averaged over
    each word's sub-tokens (a text view read with a plan): patch and word side by side, slot by slot."""

    pooled: torch.Tensor
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    patch_states: torch.Tensor | None = None
    word_states: torch.Tensor | None = None


class VLMixerObjective(nn.Module):
    """MLM on the CMC view (with patch-slot targets) + InfoNCE between text view and CMC view (+ hard negatives).

    `cmc`: the `CMCTransform` that collates the batches (its `negatives` sets the hard negatives per view).
    `model`: an HF `*ForMaskedLM` or open_clip's text tower (`cmcaug.text_encoders`); `patch_encoder`: uint8
    bank patches normalized with `mean`/`std` -> `[M, K, D]` (or `[M, D]` when K = 1). `mlm_head`: for
    open_clip only. `parameters()` holds the model's, the patch encoder's and the head's: optimize them all.
    """

    def __init__(self, cmc, model: nn.Module, patch_encoder: nn.Module, *, mean: Sequence[float],
                 std: Sequence[float], mlm_probability: float = 0.15, patch_targets: str = DEFAULT_PATCH_TARGETS,
                 mlm_weight: float = 1.0, contrast_weight: float = 1.0, temperature: float = 0.1,
                 contrast_dropout: bool = False, mlm_head: nn.Module | None = None,
                 mask_token_id: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if patch_targets not in PATCH_TARGETS:
            raise InputError(f"patch_targets must be one of {PATCH_TARGETS}, got {patch_targets!r}")
        if mlm_weight < 0 or contrast_weight < 0 or mlm_weight + contrast_weight == 0:
            raise InputError(f"loss weights must be >= 0 and not both 0, got {mlm_weight} and {contrast_weight}")
        self.encoder = text_encoder(model, mlm_head)
        if mlm_weight and not self.encoder.has_mlm:
            raise InputError(f"{type(model).__name__} has no MLM head: pass mlm_head= or mlm_weight=0")
        self.patch_encoder = patch_encoder
        self.cmc = cmc
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.mlm_probability, self.patch_targets = mlm_probability, patch_targets
        self.mlm_weight, self.contrast_weight = float(mlm_weight), float(contrast_weight)
        self.temperature, self.contrast_dropout = temperature, contrast_dropout
        self.mask_token_id = getattr(cmc.tokenizer, "mask_token_id", None) if mask_token_id is None else mask_token_id

    # -- training ------------------------------------------------------------------------------------
    def forward(self, batch) -> VLMixerLosses:
        """The weighted sum of the MLM and contrastive terms for one collated `CMCBatch`."""
        patches = self._patch_embeds(batch.pixels)
        zero = patches.sum() * 0  # keeps a skipped term on the graph's device and dtype
        mlm = self._mlm(batch, patches) if self.mlm_weight else zero
        contrastive = self._contrast(batch, patches) if self.contrast_weight else zero
        return VLMixerLosses(self.mlm_weight * mlm + self.contrast_weight * contrastive, mlm, contrastive)

    def _mlm(self, batch, patches: torch.Tensor) -> torch.Tensor:
        masked = self.cmc.mask_tokens(batch, self.mlm_probability, patch_targets=self.patch_targets,
                                      mask_token_id=self.mask_token_id)
        mask_embedding = None
        if masked.patch_mask is not None:
            mask_id = torch.tensor([int(self.mask_token_id)], device=batch.input_ids.device)
            mask_embedding = self.encoder.embed(mask_id)[0]  # a hidden patch shows what a masked word shows
        words = self.encoder.embed(masked.input_ids)
        view = self.cmc.splice(words, patches.to(words.dtype), masked, mask_embedding=mask_embedding)
        return self.encoder.mlm_loss(view.embeds, view.attention_mask, view.modality_ids, view.position_ids,
                                     masked.labels)

    def _contrast(self, batch, patches: torch.Tensor) -> torch.Tensor:
        views = [patches]
        negatives = getattr(batch, "negative_pixels", None)
        count = 0 if negatives is None else negatives.shape[0]
        if count:
            views += list(self._patch_embeds(negatives.flatten(0, 1)).unflatten(0, (count, -1)))
        words, plan = self.encoder.embed(batch.input_ids), batch.plan
        # The text view (cut to its longest row: open_clip pads to 77), the CMC view and its negatives in one
        # pass, padded to one width (padding is masked).
        n = int(plan.text_lengths.max(initial=1))
        width = max(n, plan.output_length)
        mask = batch.attention_mask[:, :n]
        positions = torch.arange(n, device=words.device).expand_as(mask)
        rows = [(words[:, :n], mask, torch.zeros_like(mask), positions)]
        rows += [(self.cmc.splice(words, v.to(words.dtype), batch).embeds, plan.attention_mask, plan.modality_ids,
                  plan.position_ids) for v in views]
        embeds, mask, modality, position = (torch.cat([_pad(r[i], width) for r in rows]) for i in range(4))
        with self._dropout_off():
            hidden = self.encoder.encode(embeds, mask, modality, position)
        pooled = self.encoder.pool(hidden, mask).unflatten(0, (len(rows), -1))
        if not count:
            return info_nce(pooled[0], pooled[1], self.temperature)
        hard = pooled[2:].transpose(0, 1)  # [B, N, D]
        return info_nce(pooled[0], pooled[1], self.temperature, hard_negatives=hard,
                        hard_negative_mask=batch.negative_valid)

    @contextlib.contextmanager
    def _dropout_off(self) -> Iterator[None]:
        """The text model in eval mode (no dropout) for the contrast passes, unless `contrast_dropout`."""
        if self.contrast_dropout or not self.training:
            yield
            return
        with eval_mode(self.encoder):
            yield

    # -- readouts --------------------------------------------------------------------------------------
    def _patch_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        from .kernels import normalize_patches

        out = self.patch_encoder(normalize_patches(pixels, self.mean, self.std, dtype=self.dtype))
        return out.unsqueeze(1) if out.dim() == 2 else out

    def _encode_view(self, view: SpliceOutput, plan: SplicePlan) -> Readout:
        hidden = self.encoder.encode(view.embeds, view.attention_mask, view.modality_ids, view.position_ids)
        patch_states = hidden.flatten(0, 1)[plan.patch_destination.long().clamp(min=0)]
        return Readout(self.encoder.pool(hidden, view.attention_mask), hidden, view.attention_mask, patch_states)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: SplicePlan | None = None) -> Readout:
        """The text view: tokens as the tokenizer made them, modality 0 everywhere (moved to the model's device).

        With the `plan` of the batch's CMC view, `word_states` holds the states of the words its slots replace.
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.encoder.encode(self.encoder.embed(input_ids), attention_mask)
        words = None if plan is None else _word_states(hidden, plan)
        return Readout(self.encoder.pool(hidden, attention_mask), hidden, attention_mask, word_states=words)

    def encode_spliced(self, input_ids: torch.Tensor, plan: SplicePlan, pixels: torch.Tensor) -> Readout:
        """Any CMC view: the tokens `input_ids` [B, L] with `plan`'s slots filled by bank patches `pixels` [M, P, P, 3]."""
        if pixels.shape[0] != plan.num_slots:
            raise InputError(f"the plan has {plan.num_slots} patch slots but {pixels.shape[0]} patches were given")
        from .kernels import splice

        words, plan = self.encoder.embed(input_ids.to(self.device)), plan.to(self.device)
        pixels = pixels.to(self.device)
        return self._encode_view(splice(words, self._patch_embeds(pixels).to(words.dtype), plan), plan)

    def encode_view(self, batch) -> Readout:
        """A collated batch's CMC view (unmasked), with the states of its patch slots."""
        return self.encode_spliced(batch.input_ids, batch.plan, batch.pixels)

    def encode_patches(self, pixels: torch.Tensor, groups: Sequence[int] | None = None) -> Readout:
        """Patches [N, P, P, 3] with nothing around them but the tokenizer's special tokens, as in a CMC view.

        Each patch alone (`[CLS] patch [SEP]`), or, with `groups` (patches per sequence, summing to N), each
        group in one sequence (`[CLS] p1 p2 ... [SEP]`): an image as the set of its detected objects.
        """
        counts = np.ones(len(pixels), np.int64) if groups is None else np.asarray(groups, np.int64)
        if counts.ndim != 1 or counts.sum() != len(pixels) or (counts < 1).any():
            raise InputError(f"groups must be positive counts summing to {len(pixels)} patches, got {list(counts)}")
        texts = [" ".join([_PLACEHOLDER] * int(n)) for n in counts]
        tokens = tokenize_with_offsets(self.cmc.tokenizer, texts, max_length=self.cmc.max_length)
        row = np.repeat(np.arange(len(texts)), counts)
        start = (np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)) * (len(_PLACEHOLDER) + 1)
        first, last, ok = align_span_arrays(row, start, start + len(_PLACEHOLDER), tokens.offsets)
        if not ok.all():
            raise InputError(f"{int((~ok).sum())} patches do not fit in max_length={self.cmc.max_length} tokens")
        spans = [list(zip(first[row == b].tolist(), last[row == b].tolist())) for b in range(len(texts))]
        plan = SplicePlan.build(tokens.attention_mask.sum(1), spans, patch_tokens=self.cmc.patch_tokens,
                                text_length=tokens.input_ids.shape[1])
        return self.encode_spliced(torch.from_numpy(tokens.input_ids), plan, pixels)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` ([B, L] or [B, L, D]) right-padded with zeros to `width` tokens."""
    pad = (0, width - x.shape[1]) if x.dim() == 2 else (0, 0, 0, width - x.shape[1])
    return torch.nn.functional.pad(x, pad)


def _word_states(hidden: torch.Tensor, plan: SplicePlan) -> torch.Tensor:
    """[M, D]: the mean of `hidden` [B, L, D] over the tokens each slot of `plan` replaced."""
    if plan.slot_token_spans is None:
        raise InputError("the plan does not say which tokens its slots replaced (made by hand): "
                         "build it with SplicePlan.build")
    spans = plan.slot_token_spans
    lengths = spans[:, 1] - spans[:, 0]
    slot = np.repeat(np.arange(len(spans)), lengths)
    token = np.repeat(spans[:, 0], lengths) + np.arange(slot.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = torch.from_numpy(plan.slot_rows[slot] * hidden.shape[1] + token).to(hidden.device)
    total = hidden.new_zeros(len(spans), hidden.shape[-1])
    total.index_add_(0, torch.from_numpy(slot).to(hidden.device), hidden.flatten(0, 1)[rows])
    return total / torch.from_numpy(lengths).to(total)[:, None]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` and all its submodules in eval mode, each module's own training flag restored after."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False  # the flag itself: `.eval()` per module would walk the tree once per module
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
