"""`cmc.dataset`: every source a new user reaches for, each item given its index, extra fields kept.

Caption files in every format tag-text reads (tagged on the fly) and tag-text files (spans used as they
are), lists, Hugging Face `datasets` (map-style and streaming) and streams. The promise
checked throughout: a sample's view depends on its position in the source only, so a raw file, its tags
file, its stream and any number of DataLoader workers give the same views.
"""
from __future__ import annotations

import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset
from transform_helpers import (  # noqa: F401 (bank, tokenizer: fixtures)
    CAPTIONS, ROWS, bank, indexed, same_batch, tokenizer, views_by_index)

from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.inputs import IndexedItems, IndexedStream
from cmcaug.transform import CMCTransform


@pytest.fixture(scope="module")
def tagger(bank):
    from cmcaug.text.grounding import GroundingTagger

    return GroundingTagger(bank.vocab, mode="lookup")


@pytest.fixture(scope="module")
def cmc(bank, tokenizer, tagger):
    return CMCTransform(bank, tokenizer, tagger=tagger, ratio=0.5, seed=4)


def write_captions(path, captions=CAPTIONS, key="caption"):
    """`captions`, each with an "image_id", in the format `path`'s name says (.txt, .jsonl, COCO .json, .parquet, .gz)."""
    records = [{key: c, "image_id": i} for i, c in enumerate(captions)]
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    if ".jsonl" in path.name:
        text = "\n".join(map(json.dumps, records)) + "\n"
    elif ".json" in path.name:
        text = json.dumps({"annotations": [dict(r, id=100 + i) for i, r in enumerate(records)]})
    else:
        text = "\n".join(captions) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def collate_all(cmc, dataset, **loader):
    return list(DataLoader(dataset, batch_size=3, collate_fn=cmc.collate, **loader))


def fields_by_index(batches):
    return {i: {k: v[b] for k, v in batch.fields.items()} for batch in batches for b, i in enumerate(batch.indices.tolist())}


# -- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["captions.txt", "captions.jsonl", "captions.json", "captions.parquet",
                                  "captions.txt.gz", "captions.jsonl.gz", "captions.json.gz"])
def test_a_caption_file_in_any_format_is_tagged_on_the_fly(cmc, tmp_path, name):
    keep = () if ".txt" in name else ("image_id",)
    items = cmc.dataset(write_captions(tmp_path / name), keep=keep)
    assert isinstance(items, IndexedItems) and len(items) == len(CAPTIONS)
    assert [items[i]["caption"] for i in range(len(items))] == CAPTIONS and items[3]["index"] == 3
    assert len(pickle.dumps(items)) < 1000 and pickle.loads(pickle.dumps(items))[3] == items[3]  # workers read it by path
    same_batch(cmc.collate(items.__getitems__(range(len(CAPTIONS)))), cmc.collate(list(enumerate(CAPTIONS))))
    batches = collate_all(cmc, items)
    expected = {"source": [str(tmp_path / name)] * 3, "source_row": [0, 1, 2]}
    expected |= {"image_id": [0, 1, 2]} if keep else {}
    expected |= {"id": [100, 101, 102]} if name in ("captions.json", "captions.json.gz") else {}  # .json: every scalar field
    assert batches[0].fields == expected
    streamed = cmc.dataset(tmp_path / name, keep=keep, streaming=True)
    assert isinstance(streamed, IndexedStream)
    streamed_batches = collate_all(cmc, streamed, num_workers=2)
    assert views_by_index(streamed_batches) == views_by_index(batches)
    assert fields_by_index(streamed_batches) == fields_by_index(batches)


def test_a_raw_file_and_its_tags_file_give_the_same_views(cmc, bank, tokenizer, tagger, tmp_path):
    from cmcaug.text.tags import tag_corpus

    raw = write_captions(tmp_path / "captions.txt")
    tag_corpus([raw], tmp_path / "tags.parquet", tagger, progress=False)
    untagged = CMCTransform(bank, tokenizer, ratio=0.5, seed=4)  # no tagger: the tags file's spans are used as is
    tags = untagged.dataset(tmp_path / "tags.parquet")
    assert len(pickle.dumps(tags)) < 1000 and tags[2].items() >= {"caption": CAPTIONS[2], "index": 2, "row_id": 2}.items()
    batches = collate_all(untagged, tags)
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0].fields.keys() == {"row_id", "source", "source_row"}
    assert views_by_index(batches) == views_by_index(collate_all(cmc, cmc.dataset(raw)))
    assert views_by_index(collate_all(untagged, untagged.dataset(tmp_path / "tags.parquet", streaming=True))) == \
        views_by_index(batches)
    for streaming in (False, True):
        with pytest.raises(InputError, match="come without spans.*tagger=GroundingTagger"):
            untagged.dataset(raw, streaming=streaming)
    table = pa.table({"caption": CAPTIONS, "spans": [r["spans"] for r in ROWS]})
    same_batch(untagged.collate(untagged.dataset(table).__getitems__(range(len(CAPTIONS)))), untagged.collate(indexed(ROWS)))
    tag_corpus([raw], tmp_path / "other.parquet", type(tagger)(ConceptVocab({"dog": []}), mode="lookup"), progress=False)
    with pytest.raises(InputError, match="another vocabulary"):
        untagged.dataset(tmp_path / "other.parquet")


def test_field_names_the_caption_column_and_the_rest_are_fields(cmc, tmp_path):
    jsonl = write_captions(tmp_path / "c.jsonl", key="text")
    parquet = write_captions(tmp_path / "c.parquet", key="text")
    with pytest.raises(InputError, match="no column 'caption'; it has \\['text', 'image_id'\\]"):
        cmc.dataset(parquet)
    rows = [{"text": c, "image_id": 10 + i} for i, c in enumerate(CAPTIONS)]
    expected = views_by_index(collate_all(cmc, cmc.dataset(CAPTIONS)))
    for source in (rows, parquet, jsonl):
        batches = collate_all(cmc, cmc.dataset(source, field="text"))
        assert views_by_index(batches) == expected
    assert collate_all(cmc, cmc.dataset(rows, field="text"))[1].fields == {"image_id": [13, 14, 15]}
    batch = cmc.collate([{"caption": "a dog", "image_id": 7}, "a cat", {"caption": "a kite", "url": "u"}])
    assert batch.fields == {"image_id": [7, None, None], "url": [None, None, "u"]}
    assert batch.to("cpu").fields == batch.fields and cmc.collate(["a dog"]).fields == {}


@pytest.mark.parametrize("source, message", [
    ("missing.jsonl", "missing.jsonl: no such"),
    ("captions.csv", "unknown corpus format"),
    ({"train": ["a dog"]}, "pick a split, e.g. ds\\['train'\\]"),
    (iter(["a dog"]), "one-shot list_iterator"),
    ((c for c in ["a dog"]), "one-shot generator"),
    (3, "takes a file path, a sequence or an iterable"),
    (b"a dog", "takes a file path"),
])
def test_sources_it_cannot_read_are_refused(cmc, tmp_path, source, message):
    if source == "captions.csv":
        (tmp_path / source).write_text("caption\na dog\n")
    with pytest.raises(InputError, match=message):
        cmc.dataset(tmp_path / source if isinstance(source, str) else source)


# -- HF datasets and streams -----------------------------------------------------------------------------


def test_an_hf_dataset_shuffles_and_keeps_its_columns(cmc):
    from datasets import Dataset

    rows = [{"caption": c, "image_id": i, "split": "val"} for i, c in enumerate(CAPTIONS * 2)]
    data = cmc.dataset(Dataset.from_list(rows))
    batches = collate_all(cmc, data, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert views_by_index(batches) == views_by_index(collate_all(cmc, cmc.dataset(CAPTIONS * 2)))
    for batch in batches:
        assert batch.fields["image_id"] == batch.indices.tolist() and set(batch.fields["split"]) == {"val"}


class Stream(IterableDataset):
    """A re-iterable stream (a torch IterableDataset that does not split itself among workers)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_a_stream_gives_the_same_views_whatever_num_workers(cmc):
    rows = [dict(r, image_id=i) for i, r in enumerate(ROWS * 3)]  # 21 items: uneven over 2 and 4 workers
    expected = views_by_index(collate_all(cmc, cmc.dataset(rows)))
    assert sorted(expected) == list(range(21))
    for workers in (0, 2, 3):
        batches = collate_all(cmc, cmc.dataset(Stream(rows)), num_workers=workers)
        assert views_by_index(batches) == expected, f"num_workers={workers}"
        assert all(b.fields["image_id"] == b.indices.tolist() for b in batches)
    cmc.set_epoch(1)
    try:  # a stream is read afresh every epoch, and the epoch reaches the workers
        epoch1 = views_by_index(collate_all(cmc, cmc.dataset(Stream(rows)), num_workers=2))
        assert epoch1 == views_by_index(collate_all(cmc, cmc.dataset(rows))) and epoch1 != expected
    finally:
        cmc.set_epoch(0)
    assert views_by_index(collate_all(cmc, cmc.dataset(rows, streaming=True), num_workers=3)) == expected


def test_a_self_sharding_hf_stream_is_refused_under_several_workers(cmc):
    from datasets import Dataset

    data = cmc.dataset(Dataset.from_list(ROWS).to_iterable_dataset(num_shards=2))  # what streaming=True loads
    assert sorted(views_by_index(collate_all(cmc, data))) == list(range(len(ROWS)))
    with pytest.raises(InputError, match="splits itself among DataLoader workers.*'index'"):
        collate_all(cmc, data, num_workers=2)


def test_a_kept_value_that_does_not_fit_its_column_is_none_as_tag_text_writes_it(tmp_path, cmc):
    """A .jsonl file's kept fields are typed by its first 1,000 rows; a later misfit (a string in an int column)
    is None, as in the tags file tag-text writes from the same file."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": "a dog", "n": 1}\n' * 1000 + '{"caption": "a cat", "n": "many"}\n')
    dataset = cmc.dataset(path, keep=["n"])
    assert (dataset[0]["n"], dataset[1000]["n"]) == (1, None)


def test_an_hf_dataset_keeps_its_transform(cmc):
    """`with_transform` / `set_transform` still apply: cmc.dataset reads rows through the dataset itself."""
    from datasets import Dataset

    ds = Dataset.from_list([{"caption": c} for c in CAPTIONS]).with_transform(
        lambda batch: {"caption": [c.upper() for c in batch["caption"]], "length": [len(c) for c in batch["caption"]]})
    data = cmc.dataset(ds)
    assert data[1]["caption"] == CAPTIONS[1].upper() and data[1]["length"] == len(CAPTIONS[1])
    batches = collate_all(cmc, data)
    assert [c for b in batches for c in b.captions] == [c.upper() for c in CAPTIONS]
    assert [n for b in batches for n in b.fields["length"]] == [len(c) for c in CAPTIONS]
