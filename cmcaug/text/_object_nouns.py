"""Tagger mode's judgement of a matched form: does it name a thing in this caption, or something else?

A match is refused when its last word is tagged as a verb or an adjective *and* the pipeline's lexicon
(its lemmatizer's word lists) agrees the word can be one: that refuses "he will *bat* next" and "an
*orange* shirt", while the small model's habit of tagging rare nouns as adjectives ("a fire hydrant/JJ",
"the catcher/JJ") costs nothing. A singular noun directly followed by another singular noun modifies it
and names nothing visible ("a *dog* bed", "a *bus* stop"), unless the second is a part of it, something
done with it, or a gerund ("the *car* door", "a *horse* race", "a *zebra* grazing", which the tagger often
reads as a noun); so does the first part of a hyphenated word ("a *dog*-friendly cafe"). A capitalised
proper noun inside a caption that is not in title case is a name, not an object ("an *Apple* store").
A word matched through its lemma must be tagged as a plural noun.
"""
from __future__ import annotations

from typing import Any

from ..concepts import ConceptVocab
from ._form_matcher import Pattern, glued_hyphen, match_key, rule_lemmas, vocab_words

_NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_PLURAL_TAGS = frozenset({"NNS", "NNPS"})
_VERB_TAGS = frozenset({"VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "MD"})
_ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
# Heads of noun compounds whose modifier is there to be seen: parts, pieces, and rides or races on it.
_PRESENT_HEADS = frozenset({
    "door", "window", "seat", "wing", "tail", "wheel", "tire", "tyre", "engine", "roof", "hood", "handle", "screen",
    "keyboard", "tower", "face", "head", "nose", "ear", "leg", "paw", "trunk", "horn", "mirror", "lid", "crust",
    "slice", "piece", "ride", "race", "rider", "driver", "owner",
})


class ObjectNounFilter:
    """`accepts` is a `FormMatcher.find` filter for Docs tagged with Penn Treebank tags."""

    def __init__(self, nlp: Any, lemmatizer: Any, vocab: ConceptVocab):
        self._lexicon = _pos_lexicon(nlp, lemmatizer, vocab)

    def accepts(self, doc: Any, start: int, end: int, pattern: Pattern) -> bool:
        """Whether tokens [start, end), matched as `pattern`, name a thing; a whole multi-word name is never a verb."""
        if any(doc[start + k].tag_ not in _PLURAL_TAGS for k in pattern.inflected):
            return False  # the tagger mode lemmatizes plural nouns only
        k = end - 1
        token = doc[k]
        tag = token.tag_
        if tag not in _NOUN_TAGS and k > start:
            tag = "NN"  # "Teddy bears/VBZ on a shelf": the name is the better reading
        elif tag not in _NOUN_TAGS:
            can_be_adj, can_be_verb = self._lexicon.get(match_key(token), (True, True))
            fits = can_be_verb if tag in _VERB_TAGS else can_be_adj if tag in _ADJ_TAGS else can_be_adj or can_be_verb
            if fits:
                return False  # "he will bat/VB next", "an orange/JJ shirt", "they skateboard/RB"
            tag = "NN"  # a word that cannot be what it was tagged, so a mis-tagged noun: "a fire hydrant/JJ"
        nxt = k + 1
        if nxt + 1 < len(doc) and glued_hyphen(doc, nxt) and doc[nxt + 1].text[:1].isalnum():
            return False  # "a dog-friendly cafe", "man-made": the first part of a hyphenated word modifies it
        if tag == "NN" and nxt < len(doc) and doc[nxt].tag_ == "NN" and doc[nxt].text[:1].isalpha():
            head = match_key(doc[nxt])
            if head not in _PRESENT_HEADS and not head.endswith("ing"):
                return False  # "a dog bed": the first noun modifies the second
        if tag in ("NNP", "NNPS") and token.text[:1].isupper() and not token.text.isupper():
            return _headline(doc) or _sentence_start(doc, k)  # "an Apple store" is a name
        return True


def _headline(doc: Any) -> bool:
    """Title case: most content words after the first capitalised ("A Dog in the Park"), so capitals say nothing."""
    from spacy.lang.en.stop_words import STOP_WORDS

    words = [t.text for t in doc if t.text[:1].isalpha()][1:]
    words = [w for w in words if w.lower() not in STOP_WORDS]
    return sum(w[:1].isupper() for w in words) * 2 > len(words) > 0


def _sentence_start(doc: Any, k: int) -> bool:
    """Token k starts the caption or follows punctuation or a symbol ('"Dog', '> Cat'): a capital there is no name."""
    return k == 0 or not any(c.isalnum() for c in doc[k - 1].text)


def _pos_lexicon(nlp: Any, lemmatizer: Any, vocab: ConceptVocab) -> dict[str, tuple[bool, bool]]:
    """(can be an adjective, can be a verb) for every word of the vocabulary's forms, from the lemmatizer's
    word lists; empty (trust the tagger) when the pipeline has none."""
    index = lemmatizer.lookups.get_table("lemma_index", {}) if lemmatizer is not None else {}
    adjectives, verbs = set(index.get("adj", ())), set(index.get("verb", ()))
    if not adjectives or not verbs:
        return {}

    def can_be(word: str, pos: str, words: set[str]) -> bool:
        return word in words or any(form in words for form in rule_lemmas(nlp, lemmatizer, word, pos))

    return {w: (can_be(w, "ADJ", adjectives), can_be(w, "VERB", verbs)) for w in sorted(vocab_words(vocab))}
