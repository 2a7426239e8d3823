import json

import pytest

from cmcaug.concepts import ConceptVocab, pluralize
from cmcaug.errors import InputError


@pytest.mark.parametrize(
    ("singular", "plural"),
    [
        ("dog", "dogs"), ("bus", "buses"), ("couch", "couches"), ("pony", "ponies"), ("toy", "toys"),
        ("person", "people"), ("man", "men"), ("woman", "women"), ("policeman", "policemen"), ("human", "humans"),
        ("child", "children"), ("knife", "knives"), ("mouse", "mice"), ("sheep", "sheep"), ("skis", "skis"),
        ("teddy bear", "teddy bears"), ("hot dog", "hot dogs"), ("Traffic  Light", "traffic lights"),
        ("wine glass", "wine glasses"), ("giraffe", "giraffes"), ("potato", "potatoes"),
    ],
)
def test_pluralize(singular, plural):
    assert pluralize(singular) == plural


def test_default_is_coco80_with_synonyms():
    vocab = ConceptVocab.default()
    assert len(vocab) == 80
    assert vocab.names[0] == "person" and vocab.names[-1] == "toothbrush"
    assert vocab.id("traffic light") == 9 and vocab.name(79) == "toothbrush"
    forms = vocab.surface_forms
    expected = {
        "man": "person", "women": "person", "children": "person", "people": "person", "surfers": "person",
        "bike": "bicycle", "sofa": "couch", "television": "tv", "motorbike": "motorcycle",
        "bat": "baseball bat", "ball": "sports ball", "hot dogs": "hot dog", "teddy bears": "teddy bear",
        "dogs": "dog", "knives": "knife", "fridge": "refrigerator", "ski": "skis",
    }
    for form, concept in expected.items():
        assert vocab.name(forms[form]) == concept, form
    assert vocab.max_words == 3  # "double decker bus"


def test_lookups_are_case_insensitive_and_checked():
    vocab = ConceptVocab({"Dog": ["Puppy", "puppy", "dog"], "hot  dog": []})
    assert vocab.names == ["dog", "hot dog"]
    assert vocab.synonyms("DOG") == ("puppy",)
    assert vocab.id("Hot Dog") == 1 and "HOT DOG" in vocab and "puppy" not in vocab
    assert vocab.forms(0) == ("dog", "dogs", "puppy", "puppies")
    with pytest.raises(InputError, match="unknown concept 'cat'"):
        vocab.id("cat")
    with pytest.raises(InputError, match="out of range"):
        vocab.name(2)


@pytest.mark.parametrize("bad", [{}, {"": []}, {"a": "not a list"}])
def test_invalid_vocabularies_are_refused(bad):
    with pytest.raises(InputError):
        ConceptVocab(bad)


def test_from_names_borrows_default_synonyms():
    vocab = ConceptVocab.from_names({0: "person", 1: "widget"})
    assert vocab.names == ["person", "widget"]
    assert "man" in vocab.synonyms("person") and vocab.synonyms("widget") == ()


def test_json_round_trip(tmp_path):
    vocab = ConceptVocab({"circle": ["disc"], "square": []})
    path = vocab.to_json(tmp_path / "vocab.json")
    assert ConceptVocab.from_json(path) == vocab
    (tmp_path / "bad.json").write_text(json.dumps(["circle"]))
    with pytest.raises(InputError, match="bad.json"):
        ConceptVocab.from_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="missing.json"):
        ConceptVocab.from_json(tmp_path / "missing.json")


def test_resolve_takes_names_or_ids():
    vocab = ConceptVocab({"dog": [], "hot dog": []})
    assert vocab.resolve("HOT DOG") == 1 and vocab.resolve(0) == 0
    with pytest.raises(InputError, match="out of range"):
        vocab.resolve(5)


def test_load_takes_an_instance_default_or_a_path(tmp_path):
    vocab = ConceptVocab({"circle": []})
    assert ConceptVocab.load(vocab) is vocab
    assert ConceptVocab.load("default") == ConceptVocab.default()
    assert ConceptVocab.load(vocab.to_json(tmp_path / "v.json")) == vocab
