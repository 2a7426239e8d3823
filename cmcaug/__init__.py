"""cmcaug: mix-based data augmentation for vision-language pre-training.

Cross-modal CutMix (VLMixer, ICML 2022) and text-aware image mixing (TiMix, AAAI 2024) as fast,
tested parts that drop into any training loop. Public names load lazily, so `import cmcaug` stays
light: spaCy, ultralytics, FAISS and Ray are imported only by the parts that use them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._checkout import find_subpackages_beside
from ._version import __version__
from .errors import BankFormatError, BankLockedError, CMCAugError, InputError, MissingDependencyError, StorageError

find_subpackages_beside(__path__[0])  # a source checkout: kernels/, cli/, benchmarks/ from this same tree


_EXPORTS = {
    "ConceptVocab": "cmcaug.concepts",
    "PatchBank": "cmcaug.bank.reader",
    "build_bank": "cmcaug.builder.pipeline",
    "GroundingTagger": "cmcaug.text.grounding",
    "GroundedSpan": "cmcaug.text.grounding",
    "align_spans": "cmcaug.text.align",
    "SplicePlan": "cmcaug.plan",
    "SpliceOutput": "cmcaug.kernels",
    "splice": "cmcaug.kernels",
    "normalize_patches": "cmcaug.kernels",
    "CMCTransform": "cmcaug.transform",
    "CMCBatch": "cmcaug.transform",
    "MixResult": "cmcaug.timix",
    "text_aware_mix": "cmcaug.timix",
    "soft_targets": "cmcaug.timix",
    "mixed_contrastive_loss": "cmcaug.timix",
    "TextAwarePatchPredictor": "cmcaug.timix",
    "VLMixerObjective": "cmcaug.vlmixer",
}

__all__ = ["BankFormatError", "BankLockedError", "CMCAugError", "InputError", "MissingDependencyError", "StorageError",
           *_EXPORTS]

if TYPE_CHECKING:
    from .bank.reader import PatchBank
    from .builder.pipeline import build_bank
    from .concepts import ConceptVocab
    from .kernels import SpliceOutput, normalize_patches, splice
    from .plan import SplicePlan
    from .text.align import align_spans
    from .text.grounding import GroundedSpan, GroundingTagger
    from .timix import MixResult, TextAwarePatchPredictor, mixed_contrastive_loss, soft_targets, text_aware_mix
    from .transform import CMCBatch, CMCTransform
    from .vlmixer import VLMixerObjective


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmcaug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
