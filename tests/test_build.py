"""`build_bank` end to end in-process: contents, determinism, drop reasons, corrupt inputs, output rules."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bank_helpers import file_hashes, stop_after
from hypothesis import given, settings
from hypothesis import strategies as st
from image_zoo import write_shard, write_zoo
from import_helpers import assert_loads_none_of

from cmcaug.bank.reader import PatchBank
from cmcaug.builder.detect import UltralyticsDetector
from cmcaug.builder.images import FAILURE_REASONS
from cmcaug.builder.pipeline import build_bank, run_local, select_per_concept
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.synth import is_foreground, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("build") / "corpus", 16, seed=1, image_size=128).root


def build(corpus: Path, out: Path, inputs: Path | None = None, **kwargs):
    kwargs.setdefault("annotations", corpus / "annotations.json")
    kwargs.setdefault("vocab", corpus / "vocab.json")
    return build_bank(inputs or corpus / "images", out, batch_size=5, progress=False, **{"min_box": 4, **kwargs})


def first_images(corpus: Path, folder: Path, n: int) -> Path:
    """A folder with the corpus's first `n` images: inputs that the corpus's annotation file over-covers."""
    folder.mkdir()
    for image in sorted((corpus / "images").iterdir())[:n]:
        shutil.copy(image, folder / image.name)
    return folder


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
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    other = build(corpus, tmp_path / "c", workers=1, max_per_concept=2, seed=7)
    assert file_hashes(tmp_path / "c")["patches.parquet"] != file_hashes(tmp_path / "a")["patches.parquet"]
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


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_drop_reasons_and_the_corrupt_image_zoo(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = tmp_path / "images"
    shutil.copytree(corpus / "images", images)
    zoo = write_zoo(images / "zoo")  # every kind of good and broken file, none annotated: none stops the build
    coco = json.loads((corpus / "annotations.json").read_text())
    for a in coco["annotations"][:3]:
        a["score"] = 0.1
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    vocab = ConceptVocab({n: s for n, s in json.loads((corpus / "vocab.json").read_text()).items() if n != "circle"})
    with caplog.at_level(logging.WARNING, logger="cmcaug.builder.pipeline"):
        result = build_bank(images, tmp_path / "bank", annotations=tmp_path / "coco.json", vocab=vocab, min_box=24,
                            batch_size=4, progress=False)
    assert "not in the vocabulary, so their boxes are dropped as unknown_concept: circle" in caplog.text
    stats = result.stats
    assert stats["images"]["read"] == 16 + len(zoo)
    assert stats["images"]["decoded"] == 16 + sum(reason is None for reason in zoo.values())
    assert stats["images"]["failed"] == {r: sum(v == r for v in zoo.values()) for r in FAILURE_REASONS}
    circle = next(c["id"] for c in coco["categories"] if c["name"] == "circle")
    unknown = [a for a in coco["annotations"] if a["category_id"] == circle]
    low = [a for a in coco["annotations"] if a["category_id"] != circle and a.get("score", 1) < 0.25]
    small = [a for a in coco["annotations"] if a["category_id"] != circle and a.get("score", 1) >= 0.25 and max(a["bbox"][2:]) < 24]
    assert stats["boxes"]["dropped"] == {"unknown_concept": len(unknown), "low_score": len(low), "small": len(small), "max_per_concept": 0}
    assert stats["boxes"]["found"] == len(coco["annotations"]) == stats["boxes"]["kept"] + sum(stats["boxes"]["dropped"].values())
    assert "circle" not in stats["patches_per_concept"] and len(PatchBank.open(tmp_path / "bank")) == stats["boxes"]["kept"]


def test_img2dataset_shards_give_the_same_patches(corpus: Path, tmp_path: Path) -> None:
    folder = build(corpus, tmp_path / "folder").manifest
    shards = tmp_path / "img2dataset"  # the corpus as img2dataset shards, in img2dataset's output folder
    shards.mkdir()
    files = sorted((corpus / "images").iterdir())
    for n, part in enumerate((files[:7], files[7:])):
        write_shard(shards / f"{n:05d}.tar", {f.stem: f.read_bytes() for f in part}, suffix=".png")
    tarred = build_bank(shards, tmp_path / "tar", annotations=corpus / "annotations.json", vocab=corpus / "vocab.json",
                        batch_size=5, min_box=4, progress=False)
    for name in ("pixels.npy", "embeddings.npy", "index.faiss", "concepts.parquet"):  # same patches, same order
        assert tarred.manifest["files"][name] == folder["files"][name]
    images = {r["image"] for r in PatchBank.open(tmp_path / "tar").records(np.arange(folder["num_patches"]))}
    assert images <= {f"{n:05d}.tar/{f.name}" for n, part in enumerate((files[:7], files[7:])) for f in part}


def test_yolo_build_with_detector_features(corpus: Path, tmp_path: Path) -> None:
    detector = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=8)
    result = build_bank(corpus / "images", tmp_path / "bank", detector=detector, embedder="detector",  # conf: the detector's
                        max_per_concept=4, batch_size=8, progress=False)
    bank = PatchBank.open(tmp_path / "bank")
    assert bank.manifest["provenance"]["options"]["conf"] == 0.0
    assert len(bank) == result.stats["boxes"]["kept"] > 0 and bank.vocab.names[:2] == ["person", "bicycle"]  # COCO's, not "0", "1"
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
    for bad, message in [({"patch_size": 4}, "patch_size must be >= 8, got 4"), ({"workers": -1}, "workers must be >= 0, got -1"),
                         ({"conf": float("nan")}, r"conf must lie in \[0, 1\], got nan"), ({"max_per_concept": 0}, "max_per_concept must be >= 1")]:
        with pytest.raises(InputError, match=message):
            build(corpus, tmp_path / "b8", **bad)
    for flag, value in (("device", "cpu"), ("imgsz", 320), ("iou", 0.5), ("max_det", 5), ("classes", ["dog"]), ("names", ["a"])):
        with pytest.raises(InputError, match=re.escape(f"{flag}={tuple(value) if flag in ('classes', 'names') else value!r} "
                                                       "is for a YOLO detector given as weights or a yaml")):
            build(corpus, tmp_path / "b9", **{flag: value})
    detector = UltralyticsDetector("yolov8n.yaml", imgsz=160)
    kept = "a Detector object keeps the settings it was made with (UltralyticsDetector(..., imgsz=...))"
    with pytest.raises(InputError, match=re.escape(kept)):
        build_bank(corpus / "images", tmp_path / "b9", detector=detector, imgsz=320, progress=False)
    with pytest.raises(InputError, match="ignore_unmatched_annotations .* is for annotations"):
        build_bank(corpus / "images", tmp_path / "b10", detector="yolov8n.yaml", ignore_unmatched_annotations=True, progress=False)
    assert not any((tmp_path / f"b{n}").exists() for n in range(2, 11))


def test_a_subset_of_an_annotation_file(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Inputs that are part of what an annotation file covers: refused (naming the flag) unless
    ignore_unmatched_annotations, which builds the bank of a file cut down to the inputs and counts the rest."""
    images = first_images(corpus, tmp_path / "images", 6)
    coco = json.loads((corpus / "annotations.json").read_text())
    inside = {im["id"] for im in coco["images"] if (images / im["file_name"]).exists()}
    outside = {a["image_id"] for a in coco["annotations"]} - inside
    refused = rf"annotates {len(outside)} image\(s\) that are not among the inputs.*--ignore-unmatched-annotations"
    with pytest.raises(InputError, match=refused):
        build(corpus, tmp_path / "refused", inputs=images)
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.INFO, logger="cmcaug.builder.pipeline"):
        subset = build(corpus, tmp_path / "bank", inputs=images, ignore_unmatched_annotations=True)
    assert subset.stats["images"]["annotated_not_among_inputs"] == len(outside) > 0
    assert f"annotates {len(outside)} image(s) that are not among the inputs" in caplog.text
    cut = {**coco, "images": [im for im in coco["images"] if im["id"] in inside],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in inside]}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    reference = build(corpus, tmp_path / "cut", inputs=images, annotations=tmp_path / "cut.json")
    for name in ("patches.parquet", "pixels.npy", "embeddings.npy", "concepts.parquet"):
        assert subset.manifest["files"][name] == reference.manifest["files"][name]
    assert subset.stats["boxes"] == reference.stats["boxes"] and "annotated_not_among_inputs" not in reference.stats["images"]

    with pytest.raises(KeyboardInterrupt):  # a subset build resumes only with the flag, into the same bank
        build(corpus, tmp_path / "resumed", inputs=images, ignore_unmatched_annotations=True, runner=stop_after(1, run_local))
    with pytest.raises(InputError, match="--ignore-unmatched-annotations"):
        build(corpus, tmp_path / "resumed", inputs=images, resume=True)
    resumed = build(corpus, tmp_path / "resumed", inputs=images, resume=True, ignore_unmatched_annotations=True)
    assert resumed.resumed_batches == 1 and file_hashes(tmp_path / "resumed") == file_hashes(tmp_path / "bank")


def test_the_flag_changes_no_bank(corpus: Path, tmp_path: Path) -> None:
    """Where every annotated image is an input, ignore_unmatched_annotations has nothing to skip: the same
    bytes, and either build resumes the other's."""
    build(corpus, tmp_path / "plain")
    with pytest.raises(KeyboardInterrupt):
        build(corpus, tmp_path / "flag", ignore_unmatched_annotations=True, runner=stop_after(2, run_local))
    assert build(corpus, tmp_path / "flag", resume=True).resumed_batches == 2
    assert file_hashes(tmp_path / "flag") == file_hashes(tmp_path / "plain")
    assert build(corpus, tmp_path / "flag", resume=True, ignore_unmatched_annotations=True).already_built


def test_device_runs_yolo_without_entering_the_fingerprint(corpus: Path, tmp_path: Path) -> None:
    images = first_images(corpus, tmp_path / "images", 3)
    yolo = {"detector": "yolov8n.yaml", "conf": 0.0, "min_box": 4, "batch_size": 2, "progress": False}
    reference = build_bank(images, tmp_path / "reference", device="cpu", **yolo)
    provenance = reference.manifest["provenance"]
    assert reference.stats["boxes"]["kept"] > 0 and "device" not in provenance["detector"] and "device" not in provenance["options"]
    with pytest.raises(KeyboardInterrupt):
        build_bank(images, tmp_path / "bank", runner=stop_after(1, run_local), **yolo)  # device None: ultralytics' choice
    assert build_bank(images, tmp_path / "bank", resume=True, device="cpu", **yolo).resumed_batches == 1
    if not torch.cuda.is_available():  # with a GPU, None ran batch 0 there: boxes equal up to float rounding only
        assert file_hashes(tmp_path / "bank") == file_hashes(tmp_path / "reference")


def test_crop_modes_cut_the_same_boxes_differently(corpus: Path, tmp_path: Path) -> None:
    """Each mode keeps the same boxes in the same rows and changes only the pixels (and so the embeddings);
    "square", the crop of every earlier bank, is not recorded, so their fingerprints hold."""
    square = build(corpus, tmp_path / "square")
    assert "crop" not in square.manifest["provenance"]["options"]
    pixels = {"square": PatchBank.open(tmp_path / "square").pixels(np.arange(square.stats["boxes"]["kept"])).numpy()}
    for mode in ("tight", "pad-mean"):
        other = build(corpus, tmp_path / mode, crop=mode)
        assert other.manifest["provenance"]["options"]["crop"] == mode
        assert other.manifest["files"]["patches.parquet"] == square.manifest["files"]["patches.parquet"]
        assert other.manifest["files"]["pixels.npy"] != square.manifest["files"]["pixels.npy"]
        pixels[mode] = PatchBank.open(tmp_path / mode).pixels(np.arange(other.stats["boxes"]["kept"])).numpy()
    assert is_foreground(pixels["tight"]).mean() > is_foreground(pixels["square"]).mean()  # the box alone, no margin
    with pytest.raises(InputError, match=r"differs in: options\.crop \(not recorded: the default before, 'tight' now\)"):
        build(corpus, tmp_path / "square", resume=True, crop="tight")


def test_heavy_dependencies_load_lazily() -> None:
    """Importing the package, its offline-stage exports and modules and the CLI (parser included) loads none
    of spaCy, ultralytics, FAISS or Ray: each is imported by the call that needs it."""
    assert_loads_none_of(("spacy", "ultralytics", "faiss", "ray"), (
        "import cmcaug, cmcaug.kernels, cmcaug.builder.pipeline, cmcaug.bank.reader, cmcaug.builder.detect, "
        "cmcaug.builder.embed, cmcaug.bank.index, cmcaug.builder.distributed, cmcaug.synth, cmcaug.viz.patch_grids, "
        "cmcaug.viz.mixes, cmcaug.viz.cmc_views, cmcaug.viz.crops, cmcaug.crops, cmcaug.cli.main as cli; cli.build_parser(); "
        "from cmcaug import PatchBank, ConceptVocab, build_bank"))


def test_empty_bank_is_built_with_a_warning(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cmcaug.builder.pipeline"):
        result = build(corpus, tmp_path / "bank", min_box=10_000)
    assert result.stats["boxes"]["kept"] == 0 and len(PatchBank.open(tmp_path / "bank")) == 0
    assert "holds 0 patches" in caplog.text and f"{result.stats['boxes']['found']} dropped small" in caplog.text
