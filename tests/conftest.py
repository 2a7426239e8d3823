"""Test-wide environment, set before anything imports Triton or ultralytics.

- Without a usable GPU, Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1 must be set
  before the kernel modules are imported, hence here).
- ultralytics is kept offline and writes its settings into a temporary folder, not ~/.config; Hugging Face
  libraries are kept offline and cache into a temporary folder, not ~/.cache.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="cmcaug-yolo-"))
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="cmcaug-hf-"))

# Where the Triton kernels run in this session: real CUDA when present, else the interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
