"""CMCTransform: collate (tokenize, align, choose, sample, plan), determinism, pickling, edge cases.

A tiny real bank whose patch pixels encode their patch id, a WordPiece tokenizer whose vocabulary is
written for the tests, and spaCy's lookup tagger for on-the-fly tags; the shared inputs live in
tests/transform_helpers.py, the MLM tests in tests/test_mlm.py.
"""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from transform_helpers import (  # noqa: F401 (bank, tokenizer: fixtures)
    CAPTIONS, COUNTS, ROWS, VOCAB, bank, indexed, regex_spans, replaced_words, same_batch, tokenizer)

from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.kernels import normalize_patches, splice
from cmcaug.transform import CMCTransform


# -- the contract of one batch -----------------------------------------------------------------------


def test_collate_builds_a_consistent_batch(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(ROWS))
    expected = tokenizer([r["caption"] for r in ROWS], padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert batch.indices.tolist() == list(range(len(ROWS)))
    assert batch.captions == CAPTIONS
    # Every grounded word whose concept has patches is replaced at ratio 1; "kites" (empty concept) is not.
    assert [replaced_words(batch, b) for b in range(len(ROWS))] == [
        ["dogs", "frisbee"], ["cat", "kitten", "puppy"], ["hot dog"], ["dog"], ["frisbee"], [], []]
    names = [VOCAB.name(c) for c in batch.concept_ids.tolist()]
    assert names == ["dog", "frisbee", "cat", "cat", "dog", "hot dog", "dog", "frisbee"]
    offsets, counts = bank.offsets, bank.counts
    c = batch.concept_ids.numpy()
    assert ((batch.patch_ids.numpy() >= offsets[c]) & (batch.patch_ids.numpy() < offsets[c] + counts[c])).all()
    assert torch.equal(batch.pixels, bank.pixels(batch.patch_ids))
    assert batch.plan.num_slots == batch.num_patches == 8
    assert torch.equal(batch.plan.modality_ids.sum(1), torch.tensor([2, 3, 1, 1, 1, 0, 0]))
    assert not (batch.replaced_mask & batch.special_tokens_mask).any()
    assert batch.stats.spans == 9 and batch.stats.spans_absent == 1 and batch.stats.absent_concepts == {"kite": 1}
    assert batch.stats.spans_replaced == 8 and batch.stats.ungrounded_captions == 2 and batch.stats.empty_captions == 1


def test_splice_places_patches_and_keeps_text(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(ROWS))
    b, l = batch.input_ids.shape
    text = torch.arange(b * l, dtype=torch.float32).reshape(b, l, 1).expand(b, l, 3).contiguous()
    patches = -1.0 - torch.arange(batch.num_patches, dtype=torch.float32)[:, None, None].expand(-1, 1, 3)
    view = cmc.splice(text, patches.contiguous(), batch)
    assert view.embeds.shape == (b, batch.plan.output_length, 3)
    kept = ~batch.replaced_mask & (batch.attention_mask == 1)
    for row in range(b):  # the view is the row's kept text tokens in order, a patch where each span was
        values = view.embeds[row, : int(view.attention_mask[row].sum()), 0]
        text_values = values[values >= 0]
        assert torch.equal(text_values, text[row, kept[row], 0])
    patch_values = view.embeds[..., 0][view.modality_ids == 1]
    assert torch.equal(patch_values, patches[:, 0, 0])  # slots row by row, left to right
    assert cmc.stats.spans_replaced == 8  # counted in the training process, at splice time


def test_patch_pixels_is_the_normalization_kernel(bank, tokenizer, triton_device):
    batch = CMCTransform(bank, tokenizer, ratio=1.0).collate(indexed(ROWS))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = batch.patch_pixels(mean, std, torch.float32)
    assert out.shape == (batch.num_patches, 3, 4, 4)
    expected = normalize_patches(batch.pixels, mean, std, torch.float32, backend="reference")
    assert torch.equal(out, expected)
    # The Triton kernel itself (interpreted on CPU, compiled on a GPU machine).
    torch.testing.assert_close(batch.to(triton_device).patch_pixels(mean, std, torch.float32, backend="triton").cpu(),
                               expected)


def test_batch_moves_as_a_whole(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(ROWS))
    l, l_out = batch.input_ids.shape[1], batch.plan.output_length
    assert repr(batch) == f"CMCBatch(B=7, L={l}, L_out={l_out}, patches=8, labels=False, device=cpu)"
    assert "ratio=1.0" in repr(cmc) and "epoch=0" in repr(cmc)
    moved = batch.to("cpu", non_blocking=True)
    same_batch(batch, moved)
    assert moved.plan.device == torch.device("cpu")
    if torch.cuda.is_available():
        assert batch.pin_memory().input_ids.is_pinned() and batch.pin_memory().plan.source_index.is_pinned()


# -- choosing and sampling -----------------------------------------------------------------------------


def test_ratio_zero_passes_text_through(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=0.0)
    batch = cmc.collate(indexed(ROWS))
    assert batch.num_patches == 0 and not batch.replaced_mask.any()
    text = torch.randn(*batch.input_ids.shape, 5)
    view = cmc.splice(text, torch.zeros(0, 1, 5), batch)
    valid = batch.attention_mask.bool()
    assert torch.equal(view.embeds[valid], text[valid]) and torch.equal(view.attention_mask, batch.attention_mask)


def test_replacement_rate_matches_ratio(bank, tokenizer):
    rows = indexed(ROWS[:5] * 120)  # 960 replaceable spans
    for ratio in (0.15, 0.5, 0.8):
        stats = CMCTransform(bank, tokenizer, ratio=ratio, seed=3).collate(rows).stats
        candidates = stats.spans - stats.spans_absent
        sigma = (candidates * ratio * (1 - ratio)) ** 0.5
        assert abs(stats.spans_replaced - ratio * candidates) < 4 * sigma


def test_max_replacements_keeps_a_uniform_subset(bank, tokenizer):
    row = {"caption": "A cat sits with a kitten and a puppy.", "spans": regex_spans("A cat sits with a kitten and a puppy.")}
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, max_replacements=1)
    batch = cmc.collate([dict(row, index=i) for i in range(600)])
    assert batch.plan.slots_per_row.max() == 1 and batch.num_patches == 600
    words = [replaced_words(batch, b)[0] for b in range(0, 600, 5)]
    assert {w: words.count(w) for w in set(words)}.keys() == {"cat", "kitten", "puppy"}
    assert min(words.count(w) for w in set(words)) > 20  # each of 3 words ~40 of 120 times


def test_patches_are_drawn_uniformly_from_the_concept(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate([{"caption": "a dog", "spans": regex_spans("a dog"), "index": i} for i in range(1000)])
    counts = np.bincount(batch.patch_ids.numpy() - bank.offsets[VOCAB.id("dog")], minlength=COUNTS["dog"])
    assert counts.size == COUNTS["dog"] and (abs(counts - 200) < 4 * (200 * 0.8) ** 0.5).all()


def test_views_depend_on_seed_epoch_and_index_only(bank, tokenizer):
    rows = indexed(ROWS[:5] * 8)
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=7)
    full = cmc.collate(rows)
    again = CMCTransform(bank, tokenizer, ratio=0.5, seed=7).collate(rows)
    same_batch(full, again)
    # Batch composition does not matter: row 13 alone gets the view it had in the full batch.
    alone = cmc.collate([rows[13]])
    assert alone.replaced_mask[0].tolist() == full.replaced_mask[13, : alone.replaced_mask.shape[1]].tolist()
    assert alone.patch_ids.tolist() == full.patch_ids[torch.from_numpy(full.plan.slot_rows) == 13].tolist()
    other_seed = CMCTransform(bank, tokenizer, ratio=0.5, seed=8).collate(rows)
    assert not torch.equal(other_seed.replaced_mask, full.replaced_mask)
    cmc.set_epoch(1)
    epoch1 = cmc.collate(rows)
    assert cmc.epoch == 1 and not torch.equal(epoch1.replaced_mask, full.replaced_mask)
    cmc.set_epoch(0)
    same_batch(cmc.collate(rows), full)
    resumed = CMCTransform(bank, tokenizer, ratio=0.5, seed=7)  # a restarted job, resuming at epoch 1
    resumed.set_epoch(1)
    same_batch(resumed.collate(rows), epoch1)



def test_items_without_index_are_keyed_by_their_text(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=0.5)
    a = cmc.collate(ROWS)
    b = cmc.collate(list(reversed(ROWS)))
    assert a.indices.tolist() == [-1] * len(ROWS)
    assert a.replaced_mask[0].tolist() == b.replaced_mask[-1, : a.replaced_mask.shape[1]].tolist()
    pairs = cmc.collate([(i, r) for i, r in enumerate(ROWS)])  # (index, item) pairs
    same_batch(pairs, cmc.collate(indexed(ROWS)))


def test_explicit_generator_semantics(bank, tokenizer):
    rows = indexed(ROWS[:5] * 4)
    cmc = CMCTransform(bank, tokenizer, ratio=0.5)
    first = cmc.collate(rows, generator=torch.Generator().manual_seed(1))
    same_batch(first, cmc.collate(rows, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(1)
    cmc.collate(rows, generator=g)
    assert not torch.equal(cmc.collate(rows, generator=g).replaced_mask, first.replaced_mask)  # g advanced
    seeded = CMCTransform(bank, tokenizer, ratio=0.5, seed=torch.Generator().manual_seed(5))
    reseeded = CMCTransform(bank, tokenizer, ratio=0.5, seed=torch.Generator().manual_seed(5))
    same_batch(seeded.collate(rows), reseeded.collate(rows))
    # mask_tokens too: one draw of the generator replaces the batch's keys.
    a = cmc.mask_tokens(first, mlm_probability=0.5, generator=torch.Generator().manual_seed(2))
    b = cmc.mask_tokens(first, mlm_probability=0.5, generator=torch.Generator().manual_seed(2))
    keyed = cmc.mask_tokens(first, mlm_probability=0.5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, keyed.labels)


# -- edge cases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[ROWS[0]], [ROWS[5]], [ROWS[6]], ROWS[:3], ROWS[:5]],
                         ids=["B=1", "ungrounded", "empty", "B=3", "B=5"])
def test_small_and_odd_batches_splice(bank, tokenizer, rows):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(rows))
    text = torch.randn(*batch.input_ids.shape, 6, requires_grad=True)
    patches = torch.randn(batch.num_patches, 6, requires_grad=True)  # [M, D] is accepted when K = 1
    view = cmc.splice(text, patches, batch)
    view.embeds.sum().backward()
    assert view.embeds.shape[0] == len(rows)
    assert torch.equal(text.grad[..., 0] == 0, batch.replaced_mask | (batch.attention_mask == 0))


def test_truncated_captions_drop_cut_spans(bank, tokenizer):
    caption = "Two dogs chase a frisbee on the grass."  # [CLS] two dogs chase a fris ##bee ...
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, max_length=6)
    batch = cmc.collate([{"caption": caption, "spans": regex_spans(caption), "index": 0}])
    assert batch.input_ids.shape[1] == 6 and batch.input_ids[0, -1] == tokenizer.sep_token_id
    assert replaced_words(batch, 0) == ["dogs"]  # "frisbee" lost its "##bee": dropped, not half-replaced
    assert batch.stats.truncated_captions == 1 and batch.stats.spans_truncated == 1


def test_a_callable_tokenizer_is_truncated_at_max_length(bank):
    def words(texts):  # any callable texts -> (ids, offsets): here, one token per word
        found = [list(re.finditer(r"\S+", t)) for t in texts]
        return [[len(m.group()) for m in row] for row in found], [[m.span() for m in row] for row in found]

    cmc = CMCTransform(bank, words, ratio=1.0, max_length=4)
    batch = cmc.collate(indexed(ROWS))
    assert batch.input_ids.shape == (len(ROWS), 4) and batch.plan.output_length <= 4
    assert batch.input_ids[0].tolist() == [3, 4, 5, 1]  # "Two dogs chase a"
    assert batch.replaced_mask[0].tolist() == [False, True, False, False]  # "dogs"
    assert batch.stats.truncated_captions == 4  # the captions of more than 4 words
    assert batch.stats.spans_truncated == 5  # frisbee; kitten, puppy; hot dog; dog (words 5+ of their rows)


def test_multi_token_patches_respect_max_length(bank, tokenizer):
    rows = indexed(ROWS)
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, patch_tokens=3, max_length=12)
    batch = cmc.collate(rows)
    assert batch.plan.output_length <= 12 and batch.plan.patch_tokens == 3
    assert batch.stats.spans_no_room > 0
    # Nothing is cut: every text token of every row is still in the view, [SEP] included.
    assert torch.equal((batch.plan.text_destination >= 0).sum(1), (~batch.replaced_mask & (batch.attention_mask == 1)).sum(1))
    view = cmc.splice(torch.randn(*batch.input_ids.shape, 4), torch.randn(batch.num_patches, 3, 4), batch)
    assert view.embeds.shape == (len(rows), batch.plan.output_length, 4)


def test_absent_concepts_are_skipped_and_counted(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    row = {"caption": "Three kites and a dog.", "spans": regex_spans("Three kites and a dog."), "index": 0}
    batch = cmc.collate([row, row])
    assert [VOCAB.name(c) for c in batch.concept_ids.tolist()] == ["dog", "dog"]
    assert batch.stats.spans_absent == 2 and batch.stats.absent_concepts == {"kite": 2}
    cmc.splice(torch.zeros(*batch.input_ids.shape, 2), torch.zeros(2, 1, 2), batch)
    assert cmc.reset_stats().absent_concepts == {"kite": 2} and cmc.stats.spans == 0


def test_a_word_the_tokenizer_does_not_know_is_still_replaced(bank, tokenizer):
    row = {"caption": "a doggo", "spans": [(2, 7, VOCAB.id("dog"))], "index": 0}  # "doggo" -> [UNK]
    batch = CMCTransform(bank, tokenizer, ratio=1.0).collate([row])
    assert batch.input_ids[0, 2] == tokenizer.unk_token_id and replaced_words(batch, 0) == ["doggo"]
    assert batch.special_tokens_mask[0, 2]  # but never an MLM target, as in HF's collator


def test_overlapping_spans_keep_the_first(bank, tokenizer):
    caption = "A man eats a hot dog."
    spans = [{"start": 13, "end": 20, "concept_id": VOCAB.id("hot dog")}, {"start": 17, "end": 20, "concept_id": VOCAB.id("dog")}]
    batch = CMCTransform(bank, tokenizer, ratio=1.0).collate([{"caption": caption, "spans": spans, "index": 0}])
    assert replaced_words(batch, 0) == ["hot dog"] and batch.stats.spans_overlapping == 1


@pytest.mark.parametrize("item, message", [
    (3, "expected a caption string"),
    ({"text": "a dog"}, "expected a caption string"),
    ({"caption": 7, "spans": []}, "'caption' must be a string"),
    ({"caption": "a dog", "spans": [{"start": 2}]}, "spans must be"),
    ({"caption": "a dog", "spans": [(2, 5, 99)]}, "outside the bank's vocabulary"),
    ((-1, "a dog"), "index must be an integer >= 0"),
    ({"caption": "a dog", "spans": [], "index": -2}, "index must be an integer >= 0"),
    ("a dog", "no tagger"),
])
def test_bad_items_get_clear_errors(bank, tokenizer, item, message):
    with pytest.raises(InputError, match=message):
        CMCTransform(bank, tokenizer).collate([item])


@pytest.mark.parametrize("kwargs", [{"ratio": 1.5}, {"ratio": None}, {"max_replacements": -1}, {"patch_tokens": 0},
                                    {"max_length": 1}, {"seed": 0.5}, {"seed": None}])
def test_bad_options_are_refused(bank, tokenizer, kwargs):
    with pytest.raises(InputError):
        CMCTransform(bank, tokenizer, **kwargs)


def test_the_bank_may_be_given_by_its_folder(bank, tokenizer):
    for path in (bank.path, str(bank.path)):
        same_batch(CMCTransform(path, tokenizer, ratio=0.5).collate(indexed(ROWS)),
                   CMCTransform(bank, tokenizer, ratio=0.5).collate(indexed(ROWS)))
    with pytest.raises(InputError, match="PatchBank or the path of a bank folder, got dict"):
        CMCTransform({}, tokenizer)


def test_empty_batch_is_refused(bank, tokenizer):
    with pytest.raises(InputError, match="non-empty"):
        CMCTransform(bank, tokenizer).collate([])


# -- on-the-fly tagging ----------------------------------------------------------------------------------


def test_captions_are_tagged_on_the_fly(bank, tokenizer):
    from cmcaug.text.grounding import GroundingTagger

    tagger = GroundingTagger(bank.vocab, mode="lookup")
    cmc = CMCTransform(bank, tokenizer, tagger=tagger, ratio=1.0)
    tagged = [{"caption": c, "spans": s, "index": i} for i, (c, s) in enumerate(zip(CAPTIONS, tagger.tag(CAPTIONS)))]
    same_batch(cmc.collate([(i, c) for i, c in enumerate(CAPTIONS)]), cmc.collate(tagged))
    assert cmc.collate([(0, CAPTIONS[0])]).num_patches == 2
    clone = pickle.loads(pickle.dumps(cmc))  # what a spawned DataLoader worker gets: the tagger reloads there
    same_batch(clone.collate([(i, c) for i, c in enumerate(CAPTIONS)]), cmc.collate(tagged))
    with pytest.raises(InputError, match="vocabulary differs"):
        CMCTransform(bank, tokenizer, tagger=GroundingTagger(ConceptVocab({"dog": []}), mode="lookup"))


# -- processes -----------------------------------------------------------------------------------------------


def test_pickles_small_with_the_bank_memory_mapped(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=11)
    cmc.set_epoch(3)
    data = pickle.dumps(cmc)
    assert len(data) < 100_000  # the bank travels as its path, not its pixels
    clone = pickle.loads(data)
    assert isinstance(clone.bank._pixels, np.memmap) and clone.epoch == 3
    same_batch(clone.collate(indexed(ROWS)), cmc.collate(indexed(ROWS)))


def test_views_are_identical_across_worker_counts_and_epochs(bank, tokenizer):
    """num_workers=0 vs 2 spawned, persistent workers: set_epoch reaches them through shared memory."""
    from torch.utils.data import DataLoader

    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=1)
    data = cmc.dataset(ROWS * 3)

    def run(**kwargs):
        loader = DataLoader(data, batch_size=4, collate_fn=cmc.collate, **kwargs)
        out = []
        for epoch in (0, 1):
            cmc.set_epoch(epoch)
            out.append(list(loader))
        return out

    serial = run(num_workers=0)
    parallel = run(num_workers=2, multiprocessing_context="spawn", persistent_workers=True)
    for epoch_a, epoch_b in zip(serial, parallel):
        for a, b in zip(epoch_a, epoch_b, strict=True):
            same_batch(a, b)
    assert any(not torch.equal(a.replaced_mask, b.replaced_mask) for a, b in zip(*serial))  # epochs differ


def test_splice_with_the_triton_kernel_equals_the_reference(bank, tokenizer, triton_device):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(ROWS))
    text, patches = torch.randn(*batch.input_ids.shape, 8), torch.randn(batch.num_patches, 1, 8)
    expected = splice(text, patches, batch.plan, backend="reference").embeds
    assert torch.equal(cmc.splice(text, patches, batch).embeds, expected)  # "auto" on CPU tensors
    moved = batch.to(triton_device)
    kernel = cmc.splice(text.to(triton_device), patches.to(triton_device), moved, backend="triton").embeds
    assert torch.equal(kernel.cpu(), expected)


@pytest.mark.gpu
def test_cuda_batch_pins_moves_and_matches_the_cpu(bank, tokenizer):
    """DataLoader(pin_memory=True) pins the whole batch; on the GPU every step gives the CPU's result."""
    from torch.utils.data import DataLoader

    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=2)
    (host,) = DataLoader(indexed(ROWS), batch_size=len(ROWS), collate_fn=cmc.collate, pin_memory=True)
    assert all(t.is_pinned() for t in (host.input_ids, host.pixels, host.plan.source_index, host.replaced_mask))
    batch = host.to("cuda", non_blocking=True)
    assert batch.pixels.is_cuda and batch.plan.device.type == "cuda"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.testing.assert_close(batch.patch_pixels(mean, std).cpu(), host.patch_pixels(mean, std))
    text, patches = torch.randn(*host.input_ids.shape, 16), torch.randn(host.num_patches, 1, 16)
    assert torch.equal(cmc.splice(text.cuda(), patches.cuda(), batch).embeds.cpu(), cmc.splice(text, patches, host).embeds)
    on_gpu, on_cpu = cmc.mask_tokens(batch, mlm_probability=0.5), cmc.mask_tokens(host, mlm_probability=0.5)
    assert torch.equal(on_gpu.input_ids.cpu(), on_cpu.input_ids) and torch.equal(on_gpu.labels.cpu(), on_cpu.labels)
