"""Shared inputs of the CMCTransform tests (tests/test_transform.py, tests/test_mlm.py, tests/test_inputs.py).

A tiny real bank (`write_bank`) whose patch pixels encode their patch id, a WordPiece tokenizer whose
vocabulary is written here ("frisbee" is two sub-tokens), captions with their regex grounding, and the
helpers that compare and read batches. The `bank` and `tokenizer` fixtures are imported by the test modules.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from cmcaug.bank.reader import PatchBank
from cmcaug.bank.writer import write_bank
from cmcaug.concepts import ConceptVocab
from cmcaug.transform import CMCBatch

VOCAB = ConceptVocab({"dog": ["puppy"], "cat": ["kitten"], "hot dog": [], "kite": [], "frisbee": []})
COUNTS = {"dog": 5, "cat": 3, "hot dog": 2, "kite": 0, "frisbee": 4}  # kite: in the vocabulary, not the bank
WORDS = ("a the two three and on with in of is are red blue dog dogs puppy cat cats kitten hot kite kites "
         "fris ##bee ##s chase chases sits grass park man eats plays").split()


def _tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS + [".", ","])})


def regex_spans(caption: str) -> list[dict[str, int]]:
    """Reference grounding for the test captions (a regex over the vocabulary's surface forms)."""
    forms = sorted(VOCAB.surface_forms, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b", re.I)
    return [{"start": m.start(), "end": m.end(), "concept_id": VOCAB.surface_forms[m.group().lower()]}
            for m in pattern.finditer(caption)]


CAPTIONS = [
    "Two dogs chase a frisbee on the grass.",
    "A cat sits with a kitten and a puppy.",
    "A man eats a hot dog in the park.",
    "Three kites and a dog.",
    "A red frisbee.",
    "The grass is blue.",  # nothing grounded
    "",
]
ROWS = [{"caption": c, "spans": regex_spans(c)} for c in CAPTIONS]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> PatchBank:
    return make_bank(tmp_path_factory.mktemp("bank") / "bank", COUNTS)


def make_bank(path, counts: dict[str, int]) -> PatchBank:
    """A bank over VOCAB with `counts[name]` patches per concept, whose pixels all equal their patch id."""
    concepts = np.repeat(np.arange(len(VOCAB)), [counts[n] for n in VOCAB.names]).astype(np.int32)
    n = concepts.size
    pixels = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()  # pixel = id
    embeddings = np.eye(n, 8, dtype=np.float32) + np.eye(n, 8, k=-8, dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    patches = pa.table({"concept_id": concepts, "image": [f"{i:02d}.png" for i in range(n)],
                        "box": pa.array([[0, 0, 4, 4]] * n, pa.list_(pa.float32(), 4)),
                        "score": np.ones(n, np.float32)})
    write_bank(path, vocab=VOCAB, patches=patches, pixels=pixels, embeddings=embeddings, provenance={}, stats={})
    return PatchBank.open(path)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def indexed(rows: list[dict]) -> list[dict]:
    return [dict(r, index=i) for i, r in enumerate(rows)]


def same_batch(a: CMCBatch, b: CMCBatch) -> None:
    for name in ("input_ids", "attention_mask", "replaced_mask", "patch_ids", "concept_ids", "pixels", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.plan.source_index, b.plan.source_index)


def token_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of every run of True in `mask`, end exclusive."""
    runs, j = [], 0
    while j < len(mask):
        if mask[j]:
            k = j
            while k < len(mask) and mask[k]:
                k += 1
            runs.append((j, k))
            j = k
        else:
            j += 1
    return runs


def replaced_words(batch: CMCBatch, b: int) -> list[str]:
    """The caption text under each replaced token run of row b, from the token offsets."""
    spans = token_runs(batch.replaced_mask[b].tolist())
    return [batch.captions[b][s:e] for s, e in _char_ranges(batch, b, spans)]


def _char_ranges(batch, b, spans):
    enc = _tokenizer()(batch.captions[b], return_offsets_mapping=True)["offset_mapping"]
    return [(enc[s][0], enc[e - 1][1]) for s, e in spans]


def views_by_index(batches) -> dict[int, tuple[list[int], list[bool], list[int]]]:
    """Each sample's view across `batches`, by its index: (token ids, replaced mask, patch ids), unpadded."""
    views = {}
    for batch in batches:
        slot_rows = torch.from_numpy(batch.plan.slot_rows)
        for b, index in enumerate(batch.indices.tolist()):
            n = int(batch.attention_mask[b].sum())
            assert index not in views, f"index {index} collated twice"
            views[index] = (batch.input_ids[b, :n].tolist(), batch.replaced_mask[b, :n].tolist(),
                            batch.patch_ids[slot_rows == b].tolist())
    return views
