"""COCO annotation files with faults: what is refused (naming the file and the annotation), what is skipped
and counted by reason (`Detections.dropped`), and what `strict=True` refuses instead of skipping."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmcaug.builder.detect import AnnotationDetector, Detections
from cmcaug.cli.main import main
from cmcaug.errors import InputError
from cmcaug.synth import make_corpus

IMAGE = np.zeros((50, 100, 3), np.uint8)
NAN, INF = float("nan"), float("inf")


def coco(tmp_path: Path, annotations: Any, *, images: list[dict] | None = None, categories: list[dict] | None = None) -> Path:
    """A COCO file of two 100x50 images (a.png, b.png) and two categories (3 dog, 7 cat), as json.dumps writes
    it (NaN and Infinity as Python's json writes and reads them)."""
    images = images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
                        {"id": 2, "file_name": "b.png", "width": 100, "height": 50}]
    categories = categories or [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(bbox: Any = (1, 1, 20, 20), image_id: int = 1, category_id: int = 3, **extra: Any) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


def detect(det: AnnotationDetector, key: str = "a.png") -> Detections:
    return det.detect([IMAGE], [key])[0]


# -- refused: the file cannot mean one thing -------------------------------------------------------
def test_duplicate_image_ids_are_refused(tmp_path: Path) -> None:
    """Two images with id 1: their boxes would be cut from whichever image the dict kept."""
    images = [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}, {"id": 4, "file_name": "c.png"},
              {"id": 4, "file_name": "d.png"}, {"id": 5, "file_name": "e.png"}, {"id": 5, "file_name": "e.png"}]
    path = coco(tmp_path, [ann()], images=images)
    with pytest.raises(InputError, match=r"coco\.json: 2 image id\(s\) name more than one image in 'images', e\.g\. \[1, 4\]"):
        AnnotationDetector(path)
    assert AnnotationDetector(coco(tmp_path, [ann()], images=images[4:] + images[:1])).annotated == {"a.png"}  # a repeat is fine


def test_duplicate_category_ids_are_refused(tmp_path: Path) -> None:
    """Two categories with id 1: every circle would be named "square"."""
    path = coco(tmp_path, [ann(category_id=1)], categories=[{"id": 1, "name": "circle"}, {"id": 1, "name": "square"}])
    with pytest.raises(InputError, match=r"coco\.json: 1 category id\(s\) name more than one category in 'categories', e\.g\. \[1\]"):
        AnnotationDetector(path)


@pytest.mark.parametrize("annotations, message", [
    ([1, 2, 3], r"annotation 0 is a int \(1\), expected an object"),
    ([ann(), "a dog"], r"annotation 1 is a str \('a dog'\), expected an object"),
    ([ann(), ann(score="high", id=7)], r"annotation 1 \(id 7\): score must be a number, got 'high'"),
    ([ann(score=None)], r"annotation 0: score must be a number, got None"),
    ([ann(bbox=["a", 1, 2, 3])], r"annotation 0: bbox must be \[x, y, width, height\] \(four numbers\)"),
    ([ann(iscrowd="yes")], r"annotation 0: iscrowd must be 0 or 1 .*got 'yes'"),
    ([ann(iscrowd=[0])], r"annotation 0: iscrowd must be 0 or 1"),
    ([ann(category_id=[3])], r"annotation 0 has category_id \[3\], which is not among the file's categories \[3, 7\]"),
    ([ann(image_id={"id": 1})], r"annotation 0 refers to image_id \{'id': 1\}"),
    ("not a list", r"expected COCO JSON .*'annotations' is a str, not a list"),
])
def test_unreadable_annotations_name_the_file_and_the_annotation(tmp_path: Path, annotations: Any, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        AnnotationDetector(coco(tmp_path, annotations))
    assert str(tmp_path / "coco.json") in str(info.value)


@pytest.mark.parametrize("images", [[{"id": 1, "file_name": "a.png", "width": "wide", "height": 5}],
                                    [{"id": 1, "file_name": "a.png", "width": INF, "height": 5}], ["a.png"]])
def test_unreadable_images_are_refused(tmp_path: Path, images: list[Any]) -> None:
    with pytest.raises(InputError, match="expected COCO JSON"):
        AnnotationDetector(coco(tmp_path, [ann()], images=images))


def test_cli_exits_3_naming_the_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = make_corpus(tmp_path / "corpus", 2, seed=0, image_size=48)
    data = json.loads((corpus.root / "annotations.json").read_text())
    faults = {"duplicate.json": {**data, "images": data["images"] + [{**data["images"][0], "file_name": "other.png"}]},
              "numbers.json": {**data, "annotations": [5, 6]},
              "score.json": {**data, "annotations": [{**data["annotations"][0], "score": "0.9x"}]}}
    for name, content in faults.items():
        (tmp_path / name).write_text(json.dumps(content))
        code = main(["build-bank", str(corpus.root / "images"), "-o", str(tmp_path / "bank"), "--annotations",
                     str(tmp_path / name), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 3 and name in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "bank").exists()


# -- skipped and counted: one bad value in a good file ----------------------------------------------
def test_unusable_boxes_are_skipped_and_counted_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    annotations = [
        ann((1, 1, 20, 20), id=10),
        ann((NAN, 1, 20, 20), id=11), ann((1, 1, INF, 20), id=12), ann(("nan", 1, 5, 5), id=13),  # box_not_finite
        ann((1, 1, -5, 20), id=14), ann((1, 1, 20, 0), id=15),  # box_empty
        ann((2, 2, 9, 9), score=NAN, id=16),  # score_not_finite
        ann((0, 0, 9, 9), iscrowd=1, id=17), ann((0, 0, 9, 9), iscrowd="1", id=18),  # crowd
        ann((1, 1, NAN, NAN), image_id=2, id=19), ann((3, 3, 9, 9), image_id=2, iscrowd=1),
    ]
    with caplog.at_level(logging.WARNING, "cmcaug.builder.detect"):
        det = AnnotationDetector(coco(tmp_path, annotations))
    found = detect(det)
    assert found.boxes.tolist() == [[1, 1, 21, 21]] and found.scores.tolist() == [1.0]
    assert found.dropped == {"box_not_finite": 3, "box_empty": 2, "score_not_finite": 1, "crowd": 2}
    only_bad = detect(det, "b.png")
    assert len(only_bad) == 0 and only_bad.dropped == {"box_not_finite": 1, "crowd": 1}
    assert detect(det, "elsewhere.png").dropped == {}
    assert det.annotated == {"a.png", "b.png"}  # an image whose boxes were all skipped is still annotated
    assert str(tmp_path / "coco.json") in caplog.text
    for part in ("4 annotation(s) as box_not_finite (the first: annotation 1)", "2 annotation(s) as box_empty (the first: "
                 "annotation 4)", "1 annotation(s) as score_not_finite (the first: annotation 6)", "--strict"):
        assert part in caplog.text
    assert "crowd" not in caplog.text  # crowd regions are COCO's own, not a fault


def test_a_crowd_only_image_is_not_required_among_the_inputs(tmp_path: Path) -> None:
    det = AnnotationDetector(coco(tmp_path, [ann(), ann(image_id=2, iscrowd=1)]))
    assert det.annotated == {"a.png"} and det.match(["a.png"]) == {"a.png": "a.png"}


@pytest.mark.parametrize("flag, crowd", [(0, False), ("0", False), (None, False), (False, False), (0.0, False),
                                         (1, True), ("1", True), (True, True)])
def test_iscrowd_numbers_strings_and_booleans(tmp_path: Path, flag: Any, crowd: bool) -> None:
    """COCO writes 0/1; converters write "0"/"1", true/false or null: "0" is not a crowd region."""
    found = detect(AnnotationDetector(coco(tmp_path, [ann(iscrowd=flag)])))
    assert (len(found), found.dropped) == ((0, {"crowd": 1}) if crowd else (1, {}))


@pytest.mark.parametrize("bad, reason", [(ann((NAN, 1, 5, 5), id=5), "box_not_finite"), (ann((1, 1, 5, -1), id=5), "box_empty"),
                                         (ann(score=NAN, id=5), "score_not_finite")])
def test_strict_refuses_what_is_otherwise_skipped(tmp_path: Path, bad: dict, reason: str) -> None:
    path = coco(tmp_path, [ann(), bad])
    assert detect(AnnotationDetector(path)).dropped == {reason: 1}
    with pytest.raises(InputError, match=rf"coco\.json: annotation 1 \(id 5\): .* is unusable \({reason}\).*--strict"):
        AnnotationDetector(path, strict=True)


def test_strict_keeps_crowd_regions_skipped(tmp_path: Path) -> None:
    assert detect(AnnotationDetector(coco(tmp_path, [ann(), ann(iscrowd=1)]), strict=True)).dropped == {"crowd": 1}


def test_a_build_counts_skipped_annotations_and_strict_refuses_them(tmp_path, capsys):
    """End to end: skipped annotations reach the build's summary (found == kept + dropped); --strict refuses."""
    from cmcaug.builder.pipeline import build_bank

    corpus = make_corpus(tmp_path / "corpus", 4, seed=0, image_size=64)
    data = json.loads((corpus.root / "annotations.json").read_text())
    first, second = data["annotations"][:2]
    faulty = [{**first, "id": 900, "bbox": [NAN, 1, 5, 5]}, {**first, "id": 901, "bbox": [1, 1, 0, 5]},
              {**first, "id": 902, "score": NAN}, {**second, "id": 903, "iscrowd": "1"}, {**second, "id": 904, "iscrowd": "0"}]
    path = tmp_path / "faulty.json"
    path.write_text(json.dumps({**data, "annotations": data["annotations"] + faulty}))
    boxes = build_bank(corpus.root / "images", tmp_path / "bank", annotations=path, progress=False).stats["boxes"]
    reasons = ("box_not_finite", "box_empty", "score_not_finite", "crowd")
    assert {r: boxes["dropped"][r] for r in reasons} == dict.fromkeys(reasons, 1)
    assert boxes["found"] == len(data["annotations"]) + 5 == boxes["kept"] + sum(boxes["dropped"].values())
    args = ["build-bank", str(corpus.root / "images"), "-o", str(tmp_path / "strict"), "--no-progress"]
    assert main([*args, "--annotations", str(path), "--strict"]) == 3
    assert main([*args, "--detector", "yolov8n.yaml", "--strict"]) == 2
    assert main([*args, "--annotations", str(path)]) == 0
    assert "dropped: box_not_finite" in capsys.readouterr().out
