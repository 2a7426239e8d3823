"""cmcaug.kernels: the online-stage ops (splice, patch normalization, TiMix paste).

Every op dispatches on its tensors' device (see `backend.py`): Triton kernels for CUDA tensors,
`reference.py` for CPU tensors. Importing this package does not import spaCy, ultralytics, FAISS or Ray.
"""
from __future__ import annotations

if __name__ == "cmcaug.kernels":
    from .image_mix import paste_windows
    from .patch_gather import normalize_patches
    from .splice import SpliceOutput, splice
else:  # found as `kernels` through a checkout root on sys.path: that name is Hugging Face's (cmcaug/_checkout.py)
    from cmcaug._checkout import give_back

    give_back(__name__, __file__)
