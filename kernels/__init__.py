"""cmcaug.kernels: the online-stage ops (splice, patch normalization, TiMix paste).

Every op dispatches on its tensors' device (see `backend.py`): Triton kernels for CUDA tensors,
`reference.py` for CPU tensors. Importing this package does not import spaCy, ultralytics, FAISS or Ray.
"""
from __future__ import annotations

from .image_mix import paste_windows
from .patch_gather import normalize_patches
from .splice import SpliceOutput, splice
