"""`ConceptVocab`: the concepts a bank holds and every surface form that names them in text.

A concept has an id (its position), a name ("teddy bear"), and synonyms ("teddy", "stuffed animal").
`surface_forms` adds their plurals, so the vocabulary is where "men" -> person and "bikes" -> bicycle are
decided. Everything is stored lowercase with single spaces, and lookups are case-insensitive.

The plurals are written by `pluralize`, a few English rules, because spaCy lemmatizes (plural to singular)
but never inflects: the shapes world's captions (`synth`) need plurals made, readers of `surface_forms`
compare exact strings (detector class names in `build`), and grounding needs them where spaCy's
lemmatizers fail (`grounding` says where).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

from .errors import InputError

# Written out, not left to spaCy: its lookup table reads some as verbs ("calves" -> "calve", "leaves" -> "leave").
_IRREGULAR_PLURALS = {
    "person": "people", "child": "children", "mouse": "mice", "goose": "geese", "ox": "oxen",
    "foot": "feet", "tooth": "teeth", "knife": "knives", "wife": "wives", "leaf": "leaves",
    "calf": "calves", "shelf": "shelves", "wolf": "wolves", "half": "halves", "loaf": "loaves",
    "scarf": "scarves", "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
}
# Words whose plural is themselves: already plural, uncountable, or invariant.
_INVARIANT = {
    "sheep", "deer", "fish", "moose", "bison", "cattle", "luggage", "baggage", "broccoli", "scissors",
    "skis", "people", "glasses", "species", "series", "aircraft", "salmon", "trousers", "jeans",
    "pants", "shorts", "furniture", "equipment",
}
_NOT_MAN = {"human", "german", "roman", "shaman", "caiman"}


def _normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def _pluralize_word(word: str) -> str:
    if word in _INVARIANT:
        return word
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("man") and word not in _NOT_MAN:
        return word[:-3] + "men"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def pluralize(phrase: str) -> str:
    """English plural of a (multi-word) name: the last word inflects ("teddy bear" -> "teddy bears")."""
    words = _normalize(phrase).split(" ")
    if not words[-1]:
        return ""
    return " ".join([*words[:-1], _pluralize_word(words[-1])])


class ConceptVocab:
    """Concept names with ids 0..n-1 (in the given order) and their synonyms.

    >>> vocab = ConceptVocab({"dog": ["puppy"], "hot dog": []})
    >>> vocab.id("Hot Dog"), vocab.surface_forms["puppies"]
    (1, 0)
    """

    def __init__(self, concepts: Mapping[str, Iterable[str]]):
        names: list[str] = []
        synonyms: list[tuple[str, ...]] = []
        for raw_name, raw_synonyms in concepts.items():
            name = _normalize(raw_name)
            if not name:
                raise InputError(f"concept names must be non-empty strings, got {raw_name!r}")
            if name in names:
                raise InputError(f"concept {name!r} appears twice in the vocabulary")
            if isinstance(raw_synonyms, str):
                raise InputError(f"synonyms of {name!r} must be a list of strings, got the string {raw_synonyms!r}")
            seen = {name}
            kept = []
            for s in map(_normalize, raw_synonyms):
                if s and s not in seen:
                    seen.add(s)
                    kept.append(s)
            names.append(name)
            synonyms.append(tuple(kept))
        if not names:
            raise InputError("a concept vocabulary needs at least one concept")
        self._names = tuple(names)
        self._synonyms = tuple(synonyms)
        self._ids = {n: i for i, n in enumerate(names)}

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def default(cls) -> ConceptVocab:
        """The 80 COCO classes (ultralytics order) with this project's hand-curated synonyms."""
        text = resources.files("cmcaug").joinpath("data/coco80.json").read_text(encoding="utf-8")
        return cls(json.loads(text))

    @classmethod
    def from_names(cls, names: Sequence[str] | Mapping[int, str]) -> ConceptVocab:
        """A detector's class names (a list, or `{class_index: name}` taken in index order).

        Names that the default vocabulary knows borrow its synonyms, so a COCO-trained detector's bank
        grounds "bike" and "men" out of the box.
        """
        if isinstance(names, Mapping):
            names = [names[k] for k in sorted(names)]
        default = cls.default()
        return cls({n: default.synonyms(n) if n in default else () for n in names})

    @classmethod
    def from_json(cls, path: str | Path) -> ConceptVocab:
        """Read `{"name": ["synonym", ...], ...}`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read a concept vocabulary ({exc})") from exc
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise InputError(f'{path}: expected a JSON object {{"name": ["synonym", ...]}}, got {type(data).__name__}')
        return cls(data)

    @classmethod
    def load(cls, source: ConceptVocab | str | Path) -> ConceptVocab:
        """A vocabulary as users name one: an instance, "default" (COCO-80), or a JSON file's path."""
        if isinstance(source, ConceptVocab):
            return source
        return cls.default() if str(source) == "default" else cls.from_json(source)

    def to_dict(self) -> dict[str, list[str]]:
        return {n: list(s) for n, s in zip(self._names, self._synonyms)}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    # -- lookups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _normalize(name) in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConceptVocab) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self._names, self._synonyms))

    def __repr__(self) -> str:
        head = ", ".join(self._names[:5]) + (", ..." if len(self) > 5 else "")
        return f"ConceptVocab({len(self)} concepts: {head})"

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def id(self, name: str) -> int:
        """The id of a concept name (case-insensitive); synonyms are not names."""
        try:
            return self._ids[_normalize(name)]
        except KeyError:
            raise InputError(f"unknown concept {name!r}; the vocabulary has {len(self)} concepts: {self._preview()}") from None

    def name(self, concept_id: int) -> str:
        if not 0 <= int(concept_id) < len(self):
            raise InputError(f"concept id {concept_id} is out of range [0, {len(self)})")
        return self._names[int(concept_id)]

    def synonyms(self, concept: str | int) -> tuple[str, ...]:
        return self._synonyms[self.resolve(concept)]

    def forms(self, concept: str | int) -> tuple[str, ...]:
        """Every lowercase form naming `concept`: its name, synonyms, and their plurals."""
        i = self.resolve(concept)
        out: dict[str, None] = {}
        for base in (self._names[i], *self._synonyms[i]):
            out[base] = None
            out[pluralize(base)] = None
        return tuple(out)

    @cached_property
    def surface_forms(self) -> dict[str, int]:
        """Form -> concept id for all forms of all concepts; a form two concepts share goes to the first."""
        table: dict[str, int] = {}
        for i in range(len(self)):
            for form in self.forms(i):
                table.setdefault(form, i)
        return table

    @cached_property
    def max_words(self) -> int:
        """Words in the longest surface form (how far a multi-word matcher must look ahead)."""
        return max(len(f.split(" ")) for f in self.surface_forms)

    def resolve(self, concept: str | int) -> int:
        """The id of a concept given by name (case-insensitive) or id, checked either way."""
        if isinstance(concept, str):
            return self.id(concept)
        self.name(concept)
        return int(concept)

    def _preview(self) -> str:
        return ", ".join(self._names[:8]) + (", ..." if len(self) > 8 else "")
