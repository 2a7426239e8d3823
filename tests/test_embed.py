"""Patch embedders: unit-norm, deterministic vectors; the pixel descriptor ranks similar patches closer."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cmcaug.builder.detect import AnnotationDetector, UltralyticsDetector
from cmcaug.builder.embed import DetectorEmbedder, PixelEmbedder, make_embedder
from cmcaug.errors import InputError


def solid(colour: tuple[int, int, int], p: int = 32, square: tuple[int, int, int] | None = None) -> np.ndarray:
    a = np.empty((p, p, 3), np.uint8)
    a[:] = colour
    if square is not None:
        a[p // 4 : 3 * p // 4, p // 4 : 3 * p // 4] = square
    return a


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.integers(8, 40).flatmap(
    lambda p: arrays(np.uint8, (n, p, p, 3), elements=st.integers(0, 255)))))
def test_pixel_vectors_are_unit_and_deterministic(patches: np.ndarray) -> None:
    emb = PixelEmbedder()
    v = emb.embed(patches)
    assert v.shape == (len(patches), emb.dim) == (len(patches), 256) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.array_equal(v, emb.embed(patches.copy()))
    assert np.array_equal(v[-1:], emb.embed(patches[-1:]))  # a row does not depend on its batch


def test_pixel_descriptor_ranks_similar_patches_closer() -> None:
    red_on_white = solid((250, 250, 250), square=(200, 20, 20))
    v = PixelEmbedder().embed(np.stack([
        red_on_white,
        solid((245, 245, 245), square=(210, 30, 25)),  # near-copy
        solid((250, 250, 250), square=(20, 20, 200)),  # same layout, other colour
        solid((20, 120, 20)),  # uniform green: zero layout part, still a unit vector
    ]))
    sims = v @ v[0]
    assert sims[1] > sims[2] > sims[3] and np.isfinite(v).all()
    assert PixelEmbedder().embed(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 256)
    for bad in (np.zeros((1, 16, 16, 3), np.float32), np.zeros(16, np.uint8), np.zeros((1, 4, 4, 3), np.uint8)):
        with pytest.raises(InputError, match="uint8 patches"):
            PixelEmbedder().embed(bad)


def test_detector_embedder_pools_the_backbone() -> None:
    det = UltralyticsDetector("yolov8n.yaml", imgsz=160)
    emb = make_embedder("detector", det)
    assert isinstance(emb, DetectorEmbedder) and emb.layer == 9  # yolov8's SPPF, the last backbone layer
    rng = np.random.default_rng(0)
    for p in (64, 40):  # 40 is resized up to a multiple of the stride
        patches = rng.integers(0, 256, (3, p, p, 3), dtype=np.uint8)
        v = emb.embed(patches)
        assert v.shape == (3, emb.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        assert np.array_equal(v, emb.embed(patches))
    assert emb.embed(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, emb.dim)


def test_embedder_choice_errors(tmp_path) -> None:
    (tmp_path / "c.json").write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    with pytest.raises(InputError, match="needs a YOLO detector"):
        make_embedder("detector", AnnotationDetector(tmp_path / "c.json"))
    with pytest.raises(InputError, match="needs a YOLO detector"):
        make_embedder("detector", None)
    with pytest.raises(InputError, match="unknown embedder"):
        make_embedder("clip")
    assert isinstance(make_embedder("pixels"), PixelEmbedder)
