"""Lazy imports of heavy dependencies, with a message that says how to install what is missing.

`import cmcaug` must not import spaCy, ultralytics, FAISS or Ray: each part imports what it uses,
when it is used, through `require`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

_INSTALL_HINTS = {
    "spacy": "pip install spacy",
    "ultralytics": "pip install ultralytics",
    "faiss": "pip install faiss-gpu (Linux x86_64) or pip install faiss-cpu",
    "ray": 'pip install "cmcaug[distributed]"',
    "transformers": "pip install transformers",
    "open_clip": "pip install open_clip_torch",
    "triton": "pip install triton (Linux only)",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise `MissingDependencyError` saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = _INSTALL_HINTS.get(top, f"pip install {top}")
        raise MissingDependencyError(f"{purpose} needs the '{top}' package, which is not installed: {hint}") from exc
