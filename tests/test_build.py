"""`build_bank` end to end in-process: contents, determinism, drop reasons, corrupt inputs, output rules."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cmcaug.bank import PatchBank
from cmcaug.build import build_bank, crop_patch, select_per_concept
from cmcaug.concepts import ConceptVocab
from cmcaug.detect import UltralyticsDetector
from cmcaug.errors import InputError
from cmcaug.synth import is_foreground, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("build") / "corpus", 16, seed=1, image_size=128).root


def build(corpus: Path, out: Path, **kwargs):
    kwargs.setdefault("annotations", corpus / "annotations.json")
    kwargs.setdefault("vocab", corpus / "vocab.json")
    return build_bank(corpus / "images", out, batch_size=5, progress=False, **{"min_box": 4, **kwargs})


def digests(bank: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bank.iterdir())}


def test_annotation_bank_holds_every_box(corpus: Path, tmp_path: Path) -> None:
    result = build(corpus, tmp_path / "bank", workers=2)
    coco = json.loads((corpus / "annotations.json").read_text())
    bank = PatchBank.open(tmp_path / "bank")
    assert len(bank) == len(coco["annotations"]) == result.stats["boxes"]["kept"] == result.stats["boxes"]["found"]
    assert result.stats["images"] == {"read": 16, "decoded": 16, "failed": dict.fromkeys(result.stats["images"]["failed"], 0)}
    assert bank.manifest["stats"] == result.stats and not (tmp_path / "bank" / ".build").exists()
    per_concept = {c["name"]: sum(a["category_id"] == c["id"] for a in coco["annotations"]) for c in coco["categories"]}
    assert result.stats["patches_per_concept"] == per_concept == {n: bank.count(n) for n in bank.vocab.names}
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    expected = sorted((names[a["image_id"]], tuple(np.float32([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                                a["bbox"][1] + a["bbox"][3]]).tolist())) for a in coco["annotations"])
    records = bank.records(np.arange(len(bank)))
    assert sorted((r["image"], r["box"]) for r in records) == expected
    pixels = bank.pixels(np.arange(len(bank))).numpy()
    assert pixels.shape == (len(bank), 64, 64, 3)
    assert all(is_foreground(p).mean() > 0.15 for p in pixels)  # each patch is centred on its shape
    assert result.images_per_s > 0 and bank.manifest["provenance"]["detector"]["type"] == "annotations"


def test_bytes_do_not_depend_on_workers(corpus: Path, tmp_path: Path) -> None:
    build(corpus, tmp_path / "a", workers=0, max_per_concept=2)
    build(corpus, tmp_path / "b", workers=3, max_per_concept=2)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    other = build(corpus, tmp_path / "c", workers=1, max_per_concept=2, seed=7)
    assert digests(tmp_path / "c")["patches.parquet"] != digests(tmp_path / "a")["patches.parquet"]
    assert max(other.stats["patches_per_concept"].values()) <= 2
    dropped = other.stats["boxes"]["dropped"]["max_per_concept"]
    assert dropped == other.stats["boxes"]["found"] - other.stats["boxes"]["kept"] > 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 50)), min_size=1, max_size=40, unique=True),
       st.integers(1, 4), st.integers(0, 3), st.randoms(use_true_random=False))
def test_per_concept_draw_ignores_row_order(rows, limit, seed, rnd) -> None:
    def kept(rows):
        a = np.array(rows)
        box = np.repeat(a[:, 2:3], 4, axis=1).astype(np.float32)
        mask = select_per_concept(a[:, 0], a[:, 1], box, limit, seed)
        return {r for r, k in zip(rows, mask) if k}

    shuffled = list(rows)
    rnd.shuffle(shuffled)
    chosen = kept(rows)
    assert chosen == kept(shuffled)
    for c in {r[0] for r in rows}:
        assert sum(r[0] == c for r in chosen) == min(limit, sum(r[0] == c for r in rows))


def test_drop_reasons_and_corrupt_images(corpus: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(corpus / "images", images)
    (images / "zero.png").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    good = (images / "000002.png").read_bytes()
    (images / "cut.png").write_bytes(good[: len(good) // 2])
    coco = json.loads((corpus / "annotations.json").read_text())
    for a in coco["annotations"][:3]:
        a["score"] = 0.1
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    vocab = ConceptVocab({n: s for n, s in json.loads((corpus / "vocab.json").read_text()).items() if n != "circle"})
    result = build_bank(images, tmp_path / "bank", annotations=tmp_path / "coco.json", vocab=vocab, min_box=24,
                        batch_size=4, progress=False)
    stats = result.stats
    assert stats["images"]["read"] == 19 and stats["images"]["decoded"] == 16
    assert {k: v for k, v in stats["images"]["failed"].items() if v} == {"empty": 1, "not_image": 1, "truncated": 1}
    circle = next(c["id"] for c in coco["categories"] if c["name"] == "circle")
    unknown = [a for a in coco["annotations"] if a["category_id"] == circle]
    low = [a for a in coco["annotations"] if a["category_id"] != circle and a.get("score", 1) < 0.25]
    small = [a for a in coco["annotations"] if a["category_id"] != circle and a.get("score", 1) >= 0.25 and max(a["bbox"][2:]) < 24]
    assert stats["boxes"]["dropped"] == {"unknown_concept": len(unknown), "low_score": len(low), "small": len(small), "max_per_concept": 0}
    assert stats["boxes"]["found"] == len(coco["annotations"]) == stats["boxes"]["kept"] + sum(stats["boxes"]["dropped"].values())
    assert "circle" not in stats["patches_per_concept"] and len(PatchBank.open(tmp_path / "bank")) == stats["boxes"]["kept"]


def test_yolo_build_with_detector_features(corpus: Path, tmp_path: Path) -> None:
    detector = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=8)
    result = build_bank(corpus / "images", tmp_path / "bank", detector=detector, embedder="detector", conf=0.0,
                        max_per_concept=4, batch_size=8, progress=False)
    bank = PatchBank.open(tmp_path / "bank")
    assert len(bank) == result.stats["boxes"]["kept"] > 0 and bank.vocab.names[:2] == ["0", "1"]
    assert bank.manifest["provenance"]["embedder"]["type"] == "detector" and bank.embedding_dim == 256
    assert result.stats["boxes"]["found"] <= 16 * 3


def test_output_and_option_errors(corpus: Path, tmp_path: Path) -> None:
    build(corpus, tmp_path / "bank")
    with pytest.raises(InputError, match="already holds a bank: pass --overwrite"):
        build(corpus, tmp_path / "bank")
    assert build(corpus, tmp_path / "bank", overwrite=True).stats["boxes"]["kept"] > 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(InputError, match="not part of a cmcaug bank"):
            build(corpus, tmp_path / "mine", **flags)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        build_bank(tmp_path / "empty", tmp_path / "b2", annotations=corpus / "annotations.json", progress=False)
    with pytest.raises(InputError, match="exactly one box source"):
        build(corpus, tmp_path / "b3", detector="yolov8n.yaml")
    with pytest.raises(InputError, match="exactly one box source"):
        build_bank(corpus / "images", tmp_path / "b4", progress=False)
    with pytest.raises(InputError, match="exclude each other"):
        build(corpus, tmp_path / "b5", resume=True, overwrite=True)
    with pytest.raises(InputError, match="pass a matching --vocab"):
        build(corpus, tmp_path / "b6", vocab=ConceptVocab({"giraffe": []}))
    with pytest.raises(InputError, match="needs a YOLO detector"):
        build(corpus, tmp_path / "b7", embedder="detector")


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 60), st.integers(20, 60), st.floats(-30, 70), st.floats(-30, 70), st.floats(1, 40), st.floats(1, 40),
       st.sampled_from([8, 12, 20]))
def test_crop_is_a_centred_square(width, height, x0, y0, w, h, size) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # no black pixel: black means padding
    image = Image.fromarray(pixels)
    patch = crop_patch(image, (x0, y0, x0 + w, y0 + h), size)
    assert patch.shape == (size, size, 3) and patch.dtype == np.uint8
    left, top = int(np.clip(round(x0), 0, width - size)), int(np.clip(round(y0), 0, height - size))
    assert np.array_equal(crop_patch(image, (left, top, left + size, top + size), size), pixels[top:top + size, left:left + size])
    assert (crop_patch(image, (-size, -size, 0.0, 0.0), size)[: size // 2, : size // 2] == 0).all()  # outside: black
