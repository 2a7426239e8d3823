"""The shapes world with context (`make_corpus(context=p)`): shape-specific words in the captions, and nothing
else changed: the images, boxes and vocabulary stay those of the default world, and the grounded spans too."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from cmcaug import GroundingTagger
from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab, pluralize
from cmcaug.errors import InputError
from cmcaug.synth import _SIZE_WORDS, COLORS, CONTEXT, SHAPES, CorpusInfo, make_corpus

# Words any phrase may share: they say nothing about the shape.
FUNCTION_WORDS = {"a", "an", "the", "in", "of", "on", "with", "like"}
# Caption words that are not about one object: counts, positions, templates.
CAPTION_WORDS = {"two", "three", "four", "above", "below", "left", "right", "and", "there", "is", "are", "picture",
                 "image", "background", "plain", "light", "pale", "shaded", "gradient", "soft", "drawing", "simple"}
ENTRY_SHAPE = {entry: shape for shape, (before, after) in CONTEXT.items() for entry in before + after}
ENTRIES = re.compile(r"\b(" + "|".join(map(re.escape, sorted(ENTRY_SHAPE, key=len, reverse=True))) + r")\b")


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def captions(info: CorpusInfo) -> list[str]:
    return [json.loads(line)["caption"] for line in info.captions.read_text().splitlines()]


def groups(info: CorpusInfo) -> list[Counter]:
    """Per image, how many (shape, colour) groups of each shape it has: one phrase each in its caption."""
    coco = json.loads(info.annotations.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[int, set] = {img["id"]: set() for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].add((names[ann["category_id"]], ann["color"]))
    return [Counter(shape for shape, _ in found) for found in per_image.values()]


def context_shapes(caption: str) -> list[str]:
    """The shape of each context word or phrase in `caption`, each checked to sit next to its own shape's name:
    before the colour and name ("twinkling red star") or right after the name ("red stars twinkling")."""
    vocab = ConceptVocab(SHAPES)
    forms = "|".join(map(re.escape, sorted(vocab.surface_forms, key=len, reverse=True)))
    text = caption.lower()
    found = []
    for match in ENTRIES.finditer(text):
        shape = ENTRY_SHAPE[match.group(1)]
        after = re.match(rf" (?:{'|'.join(COLORS)}) ({forms})\b", text[match.end():])
        before = re.search(rf"\b({forms}) $", text[: match.start()])
        assert (after is None) != (before is None), (caption, match.group(1))
        named = vocab.names[vocab.surface_forms[(after or before).group(1)]]
        assert named == shape, (caption, match.group(1), named)
        found.append(shape)
    return found


def without_context(caption: str) -> str:
    return re.sub(r"\ban\b", "a", ENTRIES.sub("", caption.lower()).replace("  ", " ").replace(" .", ".").replace(" ,", ","))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[float, CorpusInfo]:
    root = tmp_path_factory.mktemp("context")
    return {p: make_corpus(root / str(p), 300, seed=7, image_size=32, context=p) for p in (0.0, 0.3, 1.0)}


def test_table_has_several_words_per_shape_each_naming_one_shape() -> None:
    assert list(CONTEXT) == list(SHAPES)
    owners: dict[str, set[str]] = {}
    for shape, (before, after) in CONTEXT.items():
        assert len(set(before)) >= 3 and len(set(after)) >= 3, shape
        assert all(len(word.split()) == 1 for word in before), shape  # "a twinkling red star": one word before
        for entry in before + after:
            for word in entry.split():
                owners.setdefault(word, set()).add(shape)
    shared = {word: shapes for word, shapes in owners.items() if len(shapes) > 1 and word not in FUNCTION_WORDS}
    assert not shared


def test_no_context_word_names_a_shape_a_colour_a_size_or_a_coco_object() -> None:
    words = {word for entry in ENTRY_SHAPE for word in entry.split()}
    vocab = ConceptVocab(SHAPES)
    form_words = {w for form in vocab.surface_forms for w in form.split()}
    size_words = set(SHAPES) | {w for options in _SIZE_WORDS.values() for w in options} | {"medium"}
    assert not words & (form_words | set(COLORS) | size_words | CAPTION_WORDS)
    assert not {w for w in words if w.rstrip("s") in form_words or pluralize(w) in form_words}
    # Inflections the lemma tables know ("circling", "tiled", "starring") are grounded too: none may be one.
    entries = sorted(ENTRY_SHAPE)
    assert GroundingTagger(vocab, mode="lookup").tag(entries) == [[] for _ in entries]
    assert GroundingTagger(ConceptVocab.default(), mode="lookup").tag(entries) == [[] for _ in entries]


def test_only_the_captions_change(worlds: dict[float, CorpusInfo]) -> None:
    default = corpus_files(worlds[0.0].root)
    for p in (0.3, 1.0):
        files = corpus_files(worlds[p].root)
        assert files.keys() == default.keys()
        assert [k for k in files if files[k] != default[k]] == ["captions.jsonl"]
        assert worlds[p].context == p and worlds[p].stats()["context"] == p
        assert (worlds[p].num_objects, worlds[p].objects_per_concept) == (worlds[0.0].num_objects, worlds[0.0].objects_per_concept)
    assert "context" not in worlds[0.0].stats() and worlds[0.0].context == 0.0


def test_removing_the_context_words_gives_the_default_caption(worlds: dict[float, CorpusInfo]) -> None:
    default = [re.sub(r"\ban\b", "a", c.lower()) for c in captions(worlds[0.0])]
    assert not any(ENTRIES.search(c) for c in default)
    for p in (0.3, 1.0):
        assert [without_context(c) for c in captions(worlds[p])] == default


def test_context_one_gives_every_group_a_word_of_its_shape(worlds: dict[float, CorpusInfo]) -> None:
    positions = Counter()
    for caption, expected in zip(captions(worlds[1.0]), groups(worlds[1.0]), strict=True):
        assert Counter(context_shapes(caption)) == expected, caption
        positions.update(ENTRIES.findall(caption.lower()))
    used = set(positions)
    assert used == set(ENTRY_SHAPE)  # 300 images use every entry of the table


def test_context_share_is_about_p(worlds: dict[float, CorpusInfo]) -> None:
    with_context = total = 0
    for caption, expected in zip(captions(worlds[0.3]), groups(worlds[0.3]), strict=True):
        found = Counter(context_shapes(caption))
        assert not found - expected, caption  # only shapes of the image, at most one word per group
        with_context += sum(found.values())
        total += sum(expected.values())
    assert total > 400 and 0.22 <= with_context / total <= 0.38


def test_grounded_spans_are_those_of_the_default_world(worlds: dict[float, CorpusInfo]) -> None:
    tagger = GroundingTagger(ConceptVocab.from_json(worlds[0.0].vocab), mode="lookup")
    default = [[(s.concept, s.text) for s in spans] for spans in tagger.tag(captions(worlds[0.0]))]
    assert sum(map(len, default)) >= worlds[0.0].num_objects * 0.7
    for p in (0.3, 1.0):
        assert [[(s.concept, s.text) for s in spans] for spans in tagger.tag(captions(worlds[p]))] == default


def test_deterministic_and_independent_of_corpus_size(tmp_path: Path) -> None:
    first = make_corpus(tmp_path / "a", 9, seed=5, image_size=48, context=0.5)
    assert corpus_files(first.root) == corpus_files(make_corpus(tmp_path / "b", 9, seed=5, image_size=48, context=0.5).root)
    small = make_corpus(tmp_path / "c", 4, seed=5, image_size=48, context=0.5)
    assert first.captions.read_text().startswith(small.captions.read_text())
    other = make_corpus(tmp_path / "d", 9, seed=5, image_size=48, context=1.0)
    assert other.captions.read_bytes() != first.captions.read_bytes()


def test_context_zero_writes_the_default_world(tmp_path: Path) -> None:
    default = corpus_files(make_corpus(tmp_path / "a", 6, seed=2, image_size=48).root)
    assert corpus_files(make_corpus(tmp_path / "b", 6, seed=2, image_size=48, context=0).root) == default
    assert corpus_files(make_corpus(tmp_path / "c", 6, seed=2, image_size=48, context=0.0).root) == default


@pytest.mark.parametrize("context", [-0.1, 1.01, math.nan, math.inf, "0.5", True, None])
def test_bad_context(tmp_path: Path, context: object) -> None:
    with pytest.raises(InputError, match="context must lie in"):
        make_corpus(tmp_path, 2, seed=0, image_size=32, context=context)
    assert not (tmp_path / "images").exists()


def test_cli_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--images", "4", "--seed", "2", "--image-size", "48", "--no-progress"]
    assert main(["synth", str(tmp_path / "cli"), *args, "--context", "0.5"]) == 0
    assert "context: 0.5" in capsys.readouterr().out
    expected = corpus_files(make_corpus(tmp_path / "api", 4, seed=2, image_size=48, context=0.5).root)
    assert corpus_files(tmp_path / "cli") == expected


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "half"])
def test_cli_context_out_of_range_is_bad_usage(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse's own usage error, exit 2
        main(["synth", str(tmp_path / "corpus"), "--context", value])
    assert refused.value.code == 2 and "argument --context: " in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()
