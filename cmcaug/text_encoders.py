"""One interface over the text towers a CMC view is fed to: HF masked-LM models and open_clip's text tower.

The VLMixer objective (`cmcaug.vlmixer`) needs four things of a text model, whatever its family: token
embeddings (`embed`), hidden states from embeddings (`encode`, so a spliced view goes in where the token
embeddings would), one vector per sequence (`pool`), and MLM logits or loss (`mlm_loss`). An adapter maps
them onto the model's own modules; the model's weights stay the user's.

- `MaskedLMEncoder`: any HF `*ForMaskedLM` (BERT, RoBERTa, DistilBERT, ...). `encode` runs the base model
  (`model.base_model`) with `inputs_embeds`; modality ids go in as token type ids when the model has two
  types (BERT does; RoBERTa's single type cannot tell patches from words, so it sees position only);
  `pool` is the first token ([CLS]); `mlm_loss` runs the whole model with `labels`.
- `OpenCLIPTextEncoder`: open_clip's `TextTransformer` (or a CLIP model's text half): causal attention,
  pooled at each row's last real token (the end-of-text token) and projected by `text_projection`, as
  open_clip's own forward does. It has no token types, so a patch is told from a word by its content
  alone (`modality_ids` are not used). It has no MLM head; pass `mlm_head` (e.g. `nn.Linear(width, vocab)`) to
  train the denoising target, otherwise the objective is the contrast alone.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


class MaskedLMEncoder(nn.Module):
    """A Hugging Face masked-LM model (`BertForMaskedLM`, ...) behind the interface the objective uses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "base_model") or not hasattr(model, "get_input_embeddings"):
            raise InputError(f"{type(model).__name__} is not a Hugging Face model (no base_model / get_input_embeddings)")
        self.model = model
        self._token_types = getattr(model.config, "type_vocab_size", 0) >= 2
        # RoBERTa-style embeddings number positions from padding_idx + 1 and keep padding_idx for padding
        self._padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)

    @property
    def has_mlm(self) -> bool:
        """A `*ForMaskedLM` model has an output (vocabulary) layer; a bare `BertModel` has none."""
        return self.model.get_output_embeddings() is not None

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _inputs(self, embeds: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> dict[str, Any]:
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
        if self._padding_idx is not None:
            position_ids = torch.where(attention_mask.bool(), position_ids + self._padding_idx + 1, self._padding_idx)
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        if self._token_types:
            inputs["token_type_ids"] = torch.zeros_like(attention_mask) if modality_ids is None else modality_ids
        return inputs

    def encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, L, D] of the base model fed `embeds` [B, L, D]."""
        return self.model.base_model(**self._inputs(embeds, attention_mask, modality_ids, position_ids)).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [CLS] state: BERT-style models summarize a sequence in its first token."""
        return hidden[:, 0]

    def mlm_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor | None,
                 position_ids: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy of the model's MLM logits at the labelled rows (`labels` != -100; 0 when there are none)."""
        return masked_lm_loss(self.model(**self._inputs(embeds, attention_mask, modality_ids, position_ids)).logits, labels)


class OpenCLIPTextEncoder(nn.Module):
    """open_clip's text tower (`TextTransformer`, or a `CLIP` model's text half) behind the objective's interface."""

    def __init__(self, model: nn.Module, mlm_head: nn.Module | None = None):
        super().__init__()
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(model, name):
                raise InputError(f"{type(model).__name__} has no {name}: pass open_clip's TextTransformer or CLIP model")
        unsupported = {"a class token (cls_emb)": getattr(model, "cls_emb", None) is not None,
                       "bidirectional attention (no_causal_mask)": getattr(model, "attn_mask", 0) is None,
                       f"pool_type={getattr(model, 'pool_type', 'argmax')!r}":
                           getattr(model, "pool_type", "argmax") not in ("argmax", "last", "eos")}
        if any(unsupported.values()):
            raise InputError(f"{type(model).__name__} uses {', '.join(k for k, v in unsupported.items() if v)}: "
                             "the adapter reads the standard CLIP text tower (causal, pooled at the end token)")
        self.model = model
        self.mlm_head = mlm_head

    @property
    def width(self) -> int:
        return self.model.token_embedding.embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(input_ids)

    def encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """States [B, L, D] after `ln_final`; causal attention, so padding after a row's end changes nothing."""
        model, length = self.model, embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device).expand(embeds.shape[0], length)
        x = embeds.to(model.transformer.get_cast_dtype()) + model.positional_embedding[position_ids]
        causal = torch.full((length, length), float("-inf"), device=embeds.device).triu(1)
        return model.ln_final(model.transformer(x, attn_mask=causal))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The end-of-text state (each row's last real token), projected: open_clip's text feature."""
        last = attention_mask.sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        projection = self.model.text_projection
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection

    def mlm_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor | None,
                 position_ids: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy of `mlm_head` over the states at labelled rows (needs an `mlm_head`)."""
        if self.mlm_head is None:
            raise InputError("open_clip's text tower has no MLM head: pass mlm_head= (e.g. nn.Linear(width, vocab_size)) "
                             "or set mlm_weight=0")
        return masked_lm_loss(self.mlm_head(self.encode(embeds, attention_mask, modality_ids, position_ids)), labels)

    @property
    def has_mlm(self) -> bool:
        return self.mlm_head is not None


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy over the labelled rows; 0 (not NaN) for a batch with no label, e.g. no slot and nothing masked."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return losses / (labels != ignore_index).sum().clamp(min=1)


def text_encoder(model: nn.Module, mlm_head: nn.Module | None = None) -> MaskedLMEncoder | OpenCLIPTextEncoder:
    """The adapter for `model`: an HF masked-LM model, or open_clip's text tower (with an optional `mlm_head`)."""
    if isinstance(model, (MaskedLMEncoder, OpenCLIPTextEncoder)):
        return model
    if hasattr(model, "base_model") and hasattr(model, "get_input_embeddings"):
        if mlm_head is not None:
            raise InputError("mlm_head is for open_clip's text tower; an HF masked-LM model has its own")
        return MaskedLMEncoder(model)
    if hasattr(model, "token_embedding") and hasattr(model, "text_projection"):
        return OpenCLIPTextEncoder(model, mlm_head)
    raise InputError(f"cannot read {type(model).__name__} as a text tower: pass an HF *ForMaskedLM model or "
                     "open_clip's TextTransformer / CLIP model")
