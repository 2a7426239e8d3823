"""Where a vocabulary's forms occur in a spaCy Doc: one `spacy.matcher.PhraseMatcher` over every spelling.

A form ("teddy bear") is matched word by word. A caption word matches a form's word when its lowercase
(NFKC-normalised when not ASCII: "ＤＯＧ" is "dog") is that word, or, where no form has its lowercase at
that place, when spaCy lemmatizes it to that word: "Knifes" is a knife though `pluralize` never wrote
it. A hyphen glued between two words stands for the space of a form ("hot-dog", "t-shirt").

PhraseMatcher compares one token attribute (here LOWER) with its patterns, so the lemma route becomes
patterns too: each word of each form also matches every word spaCy lemmatizes to it, listed once from
spaCy's own tables (`lookup_inflections`, `rule_inflections`), and a form of n words is spelled with and
without a hyphen in each of its n - 1 gaps. Matching a Doc then runs in PhraseMatcher's compiled loop with
no Python per token, twice as fast as a trie walked in Python. The caller decides, per candidate, whether
the words a lemma matched may be read that way (the tagger mode lemmatizes only plural nouns).
"""
from __future__ import annotations

import itertools
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from ..concepts import ConceptVocab
from ..errors import MissingDependencyError

Inflections = Mapping[str, Iterable[str]]  # a form word -> the other words spaCy lemmatizes to it


class Pattern(NamedTuple):
    """What a match means: the concept, and the token offsets (from the match's start) that a lemma matched
    and that must be hyphens glued to both neighbours."""

    concept_id: int
    inflected: tuple[int, ...]
    hyphens: tuple[int, ...]


def form_words(form: str) -> tuple[str, ...]:
    """The words of a form; hyphens count as spaces."""
    return tuple(form.replace("-", " ").split())


def match_key(token: Any) -> str:
    """A token as forms are compared with it: lowercase, NFKC-normalised when not ASCII."""
    text = token.text
    return token.lower_ if text.isascii() else unicodedata.normalize("NFKC", text).lower()


def glued_hyphen(doc: Any, j: int) -> bool:
    """Token j is "-" with no space on either side, as in "hot-dog"."""
    return j > 0 and doc[j].text == "-" and not doc[j].whitespace_ and not doc[j - 1].whitespace_


class FormMatcher:
    """Finds the forms of `vocab` in Docs: longest acceptable form first, left to right, never overlapping.

    `inflections` maps a form word to the words spaCy lemmatizes to it (see `lookup_inflections`,
    `rule_inflections`); a form shared by two concepts goes to the first, as in `ConceptVocab.surface_forms`.
    """

    def __init__(self, nlp: Any, vocab: ConceptVocab, inflections: Inflections):
        from spacy.matcher import PhraseMatcher
        from spacy.tokens import Doc

        self._matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        self._meaning: dict[int, Pattern] = {}
        groups: dict[Pattern, list[Any]] = defaultdict(list)
        for words, pattern in _patterns(vocab, inflections).items():
            groups[pattern].append(Doc(nlp.vocab, words=list(words)))
        for pattern, docs in groups.items():
            key = f"cmcaug-form:{pattern.concept_id}:{pattern.inflected}:{pattern.hyphens}"
            self._meaning[nlp.vocab.strings.add(key)] = pattern
            self._matcher.add(key, docs)

    def find(self, doc: Any, ascii_text: bool, accept: Callable[[Any, int, int, Pattern], bool] | None = None,
             ) -> list[tuple[int, int, int]]:
        """(start char, end char, concept id) of each form found in `doc`, whose text is ASCII when `ascii_text`
        (the caller knows it at no cost; `doc.text` would rebuild it). `accept(doc, start, end, pattern)` may
        refuse a candidate (token offsets), and then the next shorter one starting there is tried."""
        target = doc
        if not ascii_text:
            from spacy.tokens import Doc

            target = Doc(doc.vocab, words=[match_key(t) for t in doc])
        matches = self._matcher(target)
        if len(matches) > 1:
            matches.sort(key=lambda m: (m[1], -m[2]))  # by start, longest first
        found: list[tuple[int, int, int]] = []
        taken = 0  # tokens before this are inside a form already found
        for match_id, start, end in matches:
            if start < taken:
                continue
            pattern = self._meaning[match_id]
            if pattern.hyphens and not all(glued_hyphen(doc, start + h) for h in pattern.hyphens):
                continue
            if accept is None or accept(doc, start, end, pattern):
                last = doc[end - 1]
                found.append((doc[start].idx, last.idx + len(last.text), pattern.concept_id))
                taken = end
        return found


def vocab_words(vocab: ConceptVocab) -> set[str]:
    """Every word of every form of `vocab`."""
    return {w for form in vocab.surface_forms for w in form_words(form)}


def _patterns(vocab: ConceptVocab, inflections: Inflections) -> dict[tuple[str, ...], Pattern]:
    """Token sequence -> meaning, for every spelling of every form.

    A word takes the lemma route only where no form has it at that place after the same words (a lowercase
    match is preferred), which also keeps every sequence's meaning unique.
    """
    forms: dict[tuple[str, ...], int] = {}
    for form, concept_id in vocab.surface_forms.items():
        forms.setdefault(form_words(form), concept_id)
    following: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for words in forms:
        for p, word in enumerate(words):
            following[words[:p]].add(word)
    out: dict[tuple[str, ...], Pattern] = {}
    for words, concept_id in forms.items():
        choices = [[(word, False)] + [(w, True) for w in inflections.get(word, ()) if w not in following[words[:p]]]
                   for p, word in enumerate(words)]
        for spelled in itertools.product(*choices):
            for glued in itertools.product((False, True), repeat=len(words) - 1):
                tokens: list[str] = []
                inflected: list[int] = []
                hyphens: list[int] = []
                for p, (word, lemma_route) in enumerate(spelled):
                    if p and glued[p - 1]:
                        hyphens.append(len(tokens))
                        tokens.append("-")
                    if lemma_route:
                        inflected.append(len(tokens))
                    tokens.append(word)
                out.setdefault(tuple(tokens), Pattern(concept_id, tuple(inflected), tuple(hyphens)))
    return out


# -- what spaCy lemmatizes to a form word -----------------------------------------------------------


def lookup_inflections(words: set[str]) -> dict[str, list[str]]:
    """Lookup mode: every lowercase word that spacy-lookups-data's English lookup table lemmatizes to one of
    `words` (case-folded), read once from the table the lookup lemmatizer uses."""
    from spacy.util import load_language_data, registry

    try:
        table = load_language_data(registry.lookups.get("en")["lemma_lookup"])
    except (ValueError, KeyError, ImportError, OSError) as exc:
        raise MissingDependencyError(f"mode='lookup' needs the lemma tables of spacy-lookups-data ({exc}): "
                                     "pip install spacy-lookups-data") from exc
    out: dict[str, list[str]] = defaultdict(list)
    for word, lemma in table.items():
        lemma = lemma.lower()
        if word and lemma in words and lemma != word and word == word.lower():
            out[lemma].append(word)
    return dict(out)


def rule_inflections(nlp: Any, lemmatizer: Any, words: set[str]) -> dict[str, list[str]]:
    """Tagger mode: every word that the pipeline's rule lemmatizer, reading it as a noun, lemmatizes to one
    of `words`: its noun rules and exceptions run backwards give the candidates, and the lemmatizer itself
    keeps those it maps back (it maps "vases" to "vas", so "vases" is no inflection of "vase")."""
    rules = lemmatizer.lookups.get_table("lemma_rules", {}).get("noun", [])
    exceptions = lemmatizer.lookups.get_table("lemma_exc", {}).get("noun", {})
    candidates: dict[str, set[str]] = defaultdict(set)
    for inflected, lemmas in exceptions.items():
        for lemma in lemmas:
            candidates[lemma.lower()].add(inflected)
    out: dict[str, list[str]] = {}
    for word in sorted(words):
        found = candidates[word] | {word[:len(word) - len(new)] + old for old, new in rules if word.endswith(new)}
        kept = sorted(w for w in found
                      if w and w != word and w == w.lower() and _noun_lemma(nlp, lemmatizer, w) == word)
        if kept:
            out[word] = kept
    return out


def _noun_lemma(nlp: Any, lemmatizer: Any, word: str) -> str:
    """The rule lemmatizer's lemma of `word` read as a noun, lowercase."""
    return next(iter(rule_lemmas(nlp, lemmatizer, word, "NOUN")), word).lower()


def rule_lemmas(nlp: Any, lemmatizer: Any, word: str, pos: str) -> list[str]:
    """The rule lemmatizer's lemmas of `word` read as part of speech `pos` ("NOUN", "VERB", "ADJ")."""
    token = nlp.make_doc(word)[0]
    token.pos_ = pos
    return lemmatizer.rule_lemmatize(token)
