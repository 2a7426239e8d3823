"""Detectors: COCO annotations (matching, box policy, errors) and ultralytics YOLO on decoded arrays."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cmcaug.bank.format import sha256_file
from cmcaug.builder._classes import concept_map, read_names
from cmcaug.builder.detect import AnnotationDetector, Detector, UltralyticsDetector, clip_box
from cmcaug.builder.images import ImageDecodeError, decode_image, list_images, load_image
from cmcaug.builder.options import BuildOptions
from cmcaug.builder.pipeline import ModelSpec
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.synth import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("detect") / "corpus", 6, seed=3, image_size=128).root


@pytest.fixture(scope="module")
def images(corpus: Path) -> list[np.ndarray]:
    return [load_image(r).pixels for r in list_images([corpus / "images"])]


def coco(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    path = tmp_path / "coco.json"
    images = images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}]
    categories = [{"id": 3, "name": "dog"}, {"id": 7, "name": "hot dog"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(bbox: list[float], category_id: int = 3, image_id: int = 1, **extra) -> dict:
    return {"id": 1, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_annotations_match_keys_and_give_xyxy_boxes(corpus: Path, images: list[np.ndarray]) -> None:
    det = AnnotationDetector(corpus / "annotations.json")
    assert isinstance(det, Detector)
    data = json.loads((corpus / "annotations.json").read_text())
    assert det.names == [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    for folder, prefix in [(corpus / "images", ""), (corpus, "images/")]:  # folder or its parent: both match
        keys = [r.key for r in list_images([folder])]
        assert keys[0] == prefix + "000001.png" and det.match(keys) == {k: k.removeprefix("images/") for k in keys}
    found = det.detect(images, [r.key for r in list_images([corpus / "images"])])
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    x, y, w, h = first[0]["bbox"]
    assert len(found[0]) == len(first) and found[0].boxes[0].tolist() == [x, y, x + w, y + h]
    assert (found[0].scores == 1).all()
    assert [det.names[i] for i in found[0].labels] == [det.names[a["category_id"] - 1] for a in first]
    assert json.loads(json.dumps(det.describe()))["sha256"] == sha256_file(corpus / "annotations.json")


def test_files_are_described_by_resolved_path(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              yolo: UltralyticsDetector) -> None:
    """However a file is spelled, a detector describes it (for the build's fingerprint) by where it is."""
    monkeypatch.chdir(corpus.parent)
    spellings = ["corpus/annotations.json", "./corpus//annotations.json", str(corpus / "annotations.json")]
    assert {AnnotationDetector(s).describe()["path"] for s in spellings} == {str((corpus / "annotations.json").resolve())}
    yolo.model.save(tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    for spelling in ("./mine.pt", tmp_path / "mine.pt"):
        assert UltralyticsDetector(spelling).describe()["weights"] == str((tmp_path / "mine.pt").resolve())
    assert yolo.describe()["weights"] == "yolov8n.yaml"  # a name ultralytics looks up, not a file here


def test_box_policy_clip_partial_refuse_outside_skip_unusable(tmp_path: Path) -> None:
    det = AnnotationDetector(coco(tmp_path, [ann([-10, 40, 30, 30], score=0.4), ann([0, 0, 5, 5], iscrowd=1)]))
    found = det.detect([np.zeros((50, 100, 3), np.uint8)], ["a.png"])[0]
    assert found.boxes.tolist() == [[0, 40, 20, 50]] and found.scores.tolist() == [pytest.approx(0.4)]  # clipped; crowd skipped
    assert found.dropped == {"crowd": 1}
    with pytest.raises(InputError, match="outside its 100x50 image"):
        AnnotationDetector(coco(tmp_path, [ann([120, 10, 5, 5])]))
    undeclared = [{"id": 1, "file_name": "a.png"}]
    det = AnnotationDetector(coco(tmp_path, [ann([60, 10, 5, 5])], undeclared))  # no declared size: checked on decode
    with pytest.raises(InputError, match="outside its 40x40 image"):
        det.detect([np.zeros((40, 40, 3), np.uint8)], ["a.png"])
    with pytest.raises(InputError, match="not a box"):
        clip_box([5, 5, 5, 9], 10, 10, "x")
    nan = coco(tmp_path, [ann([1, 1, float("nan"), 2])])
    assert AnnotationDetector(nan).detect([np.zeros((50, 100, 3), np.uint8)], ["a.png"])[0].dropped == {"box_not_finite": 1}
    with pytest.raises(InputError, match="box_not_finite"):
        AnnotationDetector(nan, strict=True)


def test_annotation_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="category_id 5"):
        AnnotationDetector(coco(tmp_path, [ann([1, 1, 5, 5], category_id=5)]))
    with pytest.raises(InputError, match="image_id 9"):
        AnnotationDetector(coco(tmp_path, [ann([1, 1, 5, 5], image_id=9)]))
    with pytest.raises(InputError, match="bbox"):
        AnnotationDetector(coco(tmp_path, [ann([1, 1, 5])]))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="expected COCO JSON"):
        AnnotationDetector(tmp_path / "broken.json")
    det = AnnotationDetector(coco(tmp_path, [ann([1, 1, 5, 5])]))
    with pytest.raises(InputError, match="not among the inputs.*--ignore-unmatched-annotations"):
        det.match(["b.png", "other/c.png"])
    assert det.annotated == {"a.png"} and det.match(["b.png", "other/c.png"], ignore_unmatched=True) == {}
    with pytest.raises(InputError, match="both match"):
        det.match(["x/a.png", "y/a.png"])
    assert det.match(["x/a.png", "b.png"]) == {"x/a.png": "a.png"}


@pytest.fixture(scope="module")
def yolo() -> UltralyticsDetector:
    return UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=4)


def test_yolo_yaml_detects_in_source_pixels_deterministically(yolo: UltralyticsDetector, images: list[np.ndarray]) -> None:
    wide = [np.ascontiguousarray(images[0][:64]), *images[1:]]  # mixed shapes in one batch
    found = yolo.detect(wide, [f"k{i}" for i in range(len(wide))])
    assert isinstance(yolo, Detector) and len(found) == len(wide)
    for im, d in zip(wide, found):
        assert 0 < len(d) <= 3 and d.boxes.dtype == np.float32 and d.labels.dtype == np.int64
        h, w = im.shape[:2]
        assert (d.boxes >= 0).all() and (d.boxes[:, [0, 2]] <= w).all() and (d.boxes[:, [1, 3]] <= h).all()
    again = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=4).detect(wide, [])
    assert all(np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores) for a, b in zip(found, again))
    described = json.loads(json.dumps(yolo.describe()))
    assert described["weights"] == "yolov8n.yaml" and described["sha256"] is None and described["imgsz"] == 160
    assert described["batch_size"] == 4  # it decides how a batch is letterboxed, so it is part of the provenance


def test_decoding_ignores_ultralytics_pil_patch(yolo: UltralyticsDetector) -> None:
    """ultralytics wraps PIL.Image.open to pip-install a HEIF plugin on unknown files; decoding must not."""
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"plain text, not an image")
    assert info.value.reason == "not_image"


def test_yolo_class_filter_and_errors(tmp_path: Path, images: list[np.ndarray]) -> None:
    det = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=4, classes=["16", 0])  # digits: an index
    assert det.classes == [0, 16] == UltralyticsDetector("yolov8n.yaml", classes=["Dog", "person"]).classes  # or names
    assert set(np.concatenate([d.labels for d in det.detect(images[:2], [])]).tolist()) <= {0, 16}
    with pytest.raises(InputError, match="not one of the model"):
        UltralyticsDetector("yolov8n.yaml", classes=["unicorn"])
    with pytest.raises(InputError, match="never downloads"):
        UltralyticsDetector(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="conf"):
        UltralyticsDetector("yolov8n.yaml", conf=2.0)


def test_yolo_device_is_checked_and_not_described(yolo: UltralyticsDetector, images: list[np.ndarray]) -> None:
    """A device runs the model, it does not change which model: `describe` (the build's fingerprint) leaves it out."""
    on_cpu = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=4, device="cpu")
    assert on_cpu.device == "cpu" and on_cpu.describe() == yolo.describe()
    assert [0 < len(d) <= 3 for d in on_cpu.detect(images[:2])] == [True, True]
    for bad in ("cuda:99", "gpu"):
        with pytest.raises(InputError, match=rf"device '{bad}' is not usable on this machine .*torch sees \d+ CUDA device"):
            UltralyticsDetector("yolov8n.yaml", device=bad)


def test_local_pt_weights_load_offline(yolo: UltralyticsDetector, images: list[np.ndarray], tmp_path: Path) -> None:
    yolo.model.save(tmp_path / "mine.pt")  # what a user's trained weights look like on disk
    det = UltralyticsDetector(tmp_path / "mine.pt", conf=0.0, imgsz=160, max_det=3)
    assert det.names == yolo.names and det.describe()["sha256"] == sha256_file(tmp_path / "mine.pt")
    found = det.detect(images[:2], [])  # fp16 weights: boxes close to, not equal to, the in-memory model's
    assert len(found) == 2 and all(0 < len(d) <= 3 for d in found)


def test_a_yaml_model_of_80_numbered_classes_gets_cocos_names(yolo: UltralyticsDetector) -> None:
    """ultralytics numbers a yaml model's classes "0".."79"; named so, no class is a concept of --vocab default."""
    assert yolo.model.names[0] == "0" and yolo.names == ConceptVocab.default().names  # ultralytics' coco.yaml, in order
    assert yolo.describe()["names"] == yolo.names  # not the model's own: recorded
    assert (concept_map(yolo.names, ConceptVocab.default()) == np.arange(80)).all()


def test_names_given_or_declared_in_the_yaml(tmp_path: Path, yolo: UltralyticsDetector) -> None:
    from ultralytics.utils import ROOT

    three = (ROOT / "cfg/models/v8/yolov8.yaml").read_text().replace("nc: 80", "nc: 3")
    (tmp_path / "yolov8n-3.yaml").write_text(three)
    numbered = UltralyticsDetector(tmp_path / "yolov8n-3.yaml", imgsz=64)
    assert numbered.names == ["0", "1", "2"] and "names" not in numbered.describe()  # 3 classes: not COCO's
    with pytest.raises(InputError, match="the model numbers its classes: name them with --names FILE"):
        concept_map(numbered.names, ConceptVocab.default())
    (tmp_path / "named-yolov8n.yaml").write_text(three + "names: [cat, dog, bird]\n")
    assert UltralyticsDetector(tmp_path / "named-yolov8n.yaml", imgsz=64).names == ["cat", "dog", "bird"]
    given = UltralyticsDetector(tmp_path / "yolov8n-3.yaml", names=["kite", "Dog", "cat"], classes=["dog"])
    assert given.names == ["kite", "Dog", "cat"] and given.classes == [1] and given.describe()["names"] == given.names
    with pytest.raises(InputError, match="2 class names given for the 3 classes"):
        UltralyticsDetector(tmp_path / "yolov8n-3.yaml", names=["a", "b"])
    assert UltralyticsDetector("yolov8n.yaml", names=yolo.model.names.values()).names[:2] == ["0", "1"]  # names given win


def test_read_names(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("path: x\nnames:\n  0: cat\n  1: hot dog\n")
    (tmp_path / "list.yml").write_text("names: [cat, hot dog]\n")
    (tmp_path / "names.txt").write_text("cat\n\n hot dog \n")
    for name in ("data.yaml", "list.yml", "names.txt"):
        assert read_names(tmp_path / name) == ("cat", "hot dog")
    for text, message in [("nc: 2\n", "expected a yaml file with a names: list"), ("names:\n  1: cat\n", "class indices 0 .. 0"),
                          ("names: [\n", "not valid yaml"), ("names: []\n", "non-empty list of class names")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(InputError, match=message):
            read_names(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="cannot read the class names"):
        read_names(tmp_path / "missing.txt")


def test_a_build_passes_the_yolo_settings_to_predict(images: list[np.ndarray]) -> None:
    """Options made into a detector reach ultralytics' predict; left unset, they are ultralytics' own defaults,
    so the detector describes itself (and a build fingerprints it) as before these options existed."""
    options = BuildOptions(conf=0.0, batch_size=2, imgsz=96, iou=0.5, max_det=2, classes=["person", "16"])
    det, _ = ModelSpec("yolov8n.yaml", None, options).make()
    calls = []
    predict = det.model.predict
    det.model.predict = lambda *args, **kwargs: calls.append(kwargs) or predict(*args, **kwargs)
    found = det.detect(images[:2], [])
    assert {k: calls[0][k] for k in ("imgsz", "iou", "max_det", "classes", "conf")} == {"imgsz": 96, "iou": 0.5, "max_det": 2,
                                                                                       "classes": [0, 16], "conf": 0.0}
    assert all(len(d) <= 2 and set(d.labels.tolist()) <= {0, 16} for d in found)
    default, _ = ModelSpec("yolov8n.yaml", None, BuildOptions()).make()
    assert {k: default.describe()[k] for k in ("imgsz", "iou", "max_det", "classes", "conf")} == {
        "imgsz": 640, "iou": 0.7, "max_det": 300, "classes": None, "conf": 0.25}


@pytest.mark.skipif(not os.environ.get("CMCAUG_YOLO_WEIGHTS"), reason="set CMCAUG_YOLO_WEIGHTS to a local YOLO .pt file")
def test_real_weights_find_objects(images: list[np.ndarray]) -> None:
    det = UltralyticsDetector(os.environ["CMCAUG_YOLO_WEIGHTS"], conf=0.05)
    found = det.detect(images, [])
    assert len(found) == len(images) and det.describe()["sha256"]
