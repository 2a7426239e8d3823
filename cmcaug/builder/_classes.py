"""A detector's classes: their names, and the concept each one maps to.

- `class_names`: the class names of a YOLO model. A model built from a yaml (`yolov8n.yaml`) has no names,
  and ultralytics numbers its classes "0", "1", ...; named that way no class matches a vocabulary. So a
  numbered model is named, in this order, by the names given (`names=`, `--names FILE`), the `names:` list of
  its yaml, or, for 80 classes (every official ultralytics detection yaml), COCO's names as ultralytics
  ships them (`ultralytics/cfg/datasets/coco.yaml`, the classes of its pretrained weights). Names given
  override any model's own.
- `read_names`: names from a file: a dataset yaml with `names:` (as ultralytics trains from) or a text
  file with one name a line.
- `concept_map`: detector class index -> concept id of a vocabulary, saying what to do when none matches.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..concepts import ConceptVocab
from ..errors import InputError

log = logging.getLogger(__name__)

_COCO = "cfg/datasets/coco.yaml"  # in the ultralytics package


def _numbered(names: Sequence[str]) -> bool:
    return list(names) == [str(i) for i in range(len(names))]


def _listed(names: Any, where: str) -> list[str]:
    """`names` (a list, or a {class index: name} mapping as ultralytics writes them) as a list in class order."""
    if isinstance(names, Mapping):
        try:
            order = sorted(names, key=int)
        except (TypeError, ValueError):
            raise InputError(f"{where}: names must map class indices 0, 1, ... to names, got keys {list(names)[:5]}") from None
        if [int(k) for k in order] != list(range(len(order))):
            raise InputError(f"{where}: names must map class indices 0 .. {len(order) - 1}, got {order[:8]}")
        names = [names[k] for k in order]
    if not isinstance(names, (list, tuple)) or not names:
        raise InputError(f"{where}: expected a non-empty list of class names, got {names!r:.80}")
    return [str(n) for n in names]


def read_names(path: str | Path) -> tuple[str, ...]:
    """Class names in class order from `path`: a yaml file's `names` (a list, or {index: name}), else one
    name a line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the class names ({exc}); pass a dataset yaml with names: or a text file, "
                         "one name a line") from exc
    if path.suffix.lower() not in (".yaml", ".yml"):
        return tuple(_listed([line.strip() for line in text.splitlines() if line.strip()], str(path)))
    import yaml  # PyYAML comes with ultralytics, which --names is for

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid yaml ({exc})") from exc
    if not isinstance(data, dict) or "names" not in data:
        raise InputError(f"{path}: expected a yaml file with a names: list (or {{index: name}} mapping), as ultralytics "
                         "dataset files have")
    return tuple(_listed(data["names"], str(path)))


def class_names(own: Sequence[str], declared: Any, given: Sequence[str] | None, weights: str) -> list[str]:
    """The names of the classes of model `weights`, whose own names are `own` (the module docstring has the
    order); `declared`: the `names` entry of its yaml, if any."""
    if given is not None:
        if len(given) != len(own):
            raise InputError(f"{len(given)} class names given for the {len(own)} classes of {weights}; give one name per class, "
                             "in class order")
        return [str(n) for n in given]
    if not _numbered(own):
        return list(own)
    if declared is not None:
        named = _listed(declared, f"{weights}: names")
        if len(named) != len(own):
            raise InputError(f"{weights}: names lists {len(named)} names for the model's {len(own)} classes")
        return named
    if len(own) != 80:
        return list(own)  # `concept_map` says how to name them
    from ultralytics.utils import ROOT, YAML

    log.info("%s numbers its 80 classes: naming them after COCO's classes (%s)", weights, ROOT / _COCO)
    return _listed(YAML.load(ROOT / _COCO)["names"], str(ROOT / _COCO))


def concept_map(names: Sequence[str], vocab: ConceptVocab) -> np.ndarray:
    """Detector class index -> concept id (-1 when the vocabulary has no such name or synonym)."""
    forms = vocab.surface_forms
    out = np.array([vocab.id(n) if n in vocab else forms.get(" ".join(n.lower().split()), -1) for n in names], np.int32)
    if not (out >= 0).any():
        hint = ("; the model numbers its classes: name them with --names FILE (Python: names=[...]) or a names: list in its "
                "model yaml" if _numbered(names) else "")
        raise InputError(f"none of the detector's classes ({', '.join(names[:6])}, ...) is a concept or synonym of the "
                         f"vocabulary ({', '.join(vocab.names[:6])}, ...); pass a matching --vocab{hint}")
    unknown = [n for n, c in zip(names, out) if c < 0]
    if unknown:
        log.warning("%d of the detector's %d classes are not in the vocabulary, so their boxes are dropped as unknown_concept: "
                    "%s%s", len(unknown), len(names), ", ".join(unknown[:10]), ", ..." if len(unknown) > 10 else "")
    return out
