"""Patch embedders: one L2-normalized vector per bank patch, for the bank's FAISS index.

- `PixelEmbedder` (`"pixels"`, the default) needs no model: a fixed low-resolution colour layout
  (an area-averaged `grid` x `grid` thumbnail, mean colour removed) next to a coarse colour histogram
  (square-rooted, so inner products are Bhattacharyya coefficients). Numpy only, deterministic, fast.
- `DetectorEmbedder` (`"detector"`) runs a YOLO model's backbone on each patch and average-pools the
  last backbone layer (captured with a forward hook), so neighbours share what the detector sees.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import InputError
from .options import EMBEDDERS

if TYPE_CHECKING:
    from .detect import Detector


class Embedder(Protocol):
    dim: int

    def embed(self, patches: np.ndarray) -> np.ndarray:
        """uint8 [n, P, P, 3] -> float32 [n, dim], rows of unit L2 norm."""
        ...

    def describe(self) -> dict[str, Any]:
        ...


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _area_average(x: np.ndarray, grid: int) -> np.ndarray:
    """[n, H, W, C] -> [n, grid, grid, C]: mean over `grid` x `grid` near-equal cells."""
    edges_y = (np.arange(grid) * x.shape[1]) // grid
    edges_x = (np.arange(grid) * x.shape[2]) // grid
    sums = np.add.reduceat(np.add.reduceat(x, edges_y, axis=1), edges_x, axis=2)
    rows = np.diff(np.append(edges_y, x.shape[1]))
    cols = np.diff(np.append(edges_x, x.shape[2]))
    return sums / (rows[:, None] * cols[None, :])[None, :, :, None]


class PixelEmbedder:
    """Colour layout (`grid`^2 * 3 values) + colour histogram (`levels`^3 bins); dim 256 by default."""

    def __init__(self, grid: int = 8, levels: int = 4):
        if grid < 1 or levels not in (2, 4, 8, 16):
            raise InputError(f"PixelEmbedder: need grid >= 1 and levels in (2, 4, 8, 16), got grid={grid}, levels={levels}")
        self.grid, self.levels = grid, levels
        self.dim = grid * grid * 3 + levels**3

    def embed(self, patches: np.ndarray) -> np.ndarray:
        if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[3] != 3 or patches.shape[1] < self.grid:
            raise InputError(f"expected uint8 patches [n, P, P, 3] with P >= {self.grid}, got {patches.dtype} {patches.shape}")
        n = patches.shape[0]
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        thumb = _area_average(patches.astype(np.float32) / 255.0, self.grid)
        layout = (thumb - thumb.mean(axis=(1, 2), keepdims=True)).reshape(n, -1)
        shift = 8 - int(np.log2(self.levels))
        q = (patches >> shift).astype(np.int64)
        bins = (q[..., 0] * self.levels + q[..., 1]) * self.levels + q[..., 2]
        bins = bins.reshape(n, -1) + (np.arange(n) * self.levels**3)[:, None]
        hist = np.bincount(bins.ravel(), minlength=n * self.levels**3).reshape(n, -1)
        colour = np.sqrt(hist / hist.sum(axis=1, keepdims=True))
        return _unit_rows(np.concatenate([_unit_rows(layout), colour], axis=1)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"type": "pixels", "grid": self.grid, "levels": self.levels, "dim": self.dim}


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the pooled layer has run."""


class DetectorEmbedder:
    """Global-average-pooled features of a YOLO layer (default: the backbone's last) on each patch.

    Patches are resized to the next multiple of the model's stride if needed. The model is a fused
    eval-mode copy, the same arithmetic ultralytics' predictor uses.
    """

    def __init__(self, detector: Detector, layer: int | None = None, batch_size: int = 64):
        import copy

        import torch

        model = getattr(getattr(detector, "model", None), "model", None)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "model"):
            raise InputError("the 'detector' embedder needs a YOLO detector (--detector WEIGHTS_OR_YAML), not annotations")
        self.layer = len(model.yaml["backbone"]) - 1 if layer is None else int(layer)
        if not 0 <= self.layer < len(model.model):
            raise InputError(f"layer {layer} is out of range for a model of {len(model.model)} layers")
        self._net = copy.deepcopy(model).float().eval()
        self._net = self._net.fuse(verbose=False) if hasattr(self._net, "fuse") else self._net
        from ultralytics.utils.torch_utils import select_device

        self._device = select_device(getattr(detector, "device", None) or "", verbose=False)
        self._net.to(self._device)
        self._stride = int(max(getattr(self._net, "stride", torch.tensor([32])).max().item(), 1))
        self.batch_size = batch_size
        self._features: list[torch.Tensor] = []
        self._net.model[self.layer].register_forward_hook(self._hook)
        with torch.no_grad():
            self.dim = self._forward(torch.zeros(1, 3, self._stride, self._stride, device=self._device)).shape[1]

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        self._features.append(output.mean(dim=(2, 3)))
        raise _Captured

    def _forward(self, x: Any) -> Any:
        self._features.clear()
        try:
            self._net(x)
        except _Captured:
            pass
        return self._features.pop()

    def embed(self, patches: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = [np.zeros((0, self.dim), np.float32)]
        side = -(-patches.shape[1] // self._stride) * self._stride
        with torch.no_grad():
            for start in range(0, len(patches), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(patches[start:start + self.batch_size])).to(self._device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0)
                if side != x.shape[-1]:
                    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
                out.append(self._forward(x).float().cpu().numpy())
        return _unit_rows(np.concatenate(out)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"type": "detector", "layer": self.layer, "dim": self.dim}


def make_embedder(name: str, detector: Detector | None = None) -> Embedder:
    """The embedder named `name` (`EMBEDDERS`); `"detector"` needs a YOLO `detector`."""
    if name == "pixels":
        return PixelEmbedder()
    if name == "detector":
        if detector is None:
            raise InputError("the 'detector' embedder needs a YOLO detector (--detector WEIGHTS_OR_YAML)")
        return DetectorEmbedder(detector)
    raise InputError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
