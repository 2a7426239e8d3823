"""Hard patch negatives: `CMCTransform(negatives=N)` fills the same plan with other concepts' patches.

Checked: the negatives' concepts differ from their slots', their pixels are the bank's, the draws are keyed
(seed, epoch, sample; not batch composition, collate order or num_workers), the positive view is byte for
byte what it was without negatives, and the batch fields feed `info_nce(..., hard_negatives=...)`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transform_helpers import (  # noqa: F401 (bank, tokenizer: fixtures)
    COUNTS, ROWS, VOCAB, bank, indexed, make_bank, regex_spans, same_batch, tokenizer)

from cmcaug.errors import InputError
from cmcaug.kernels import normalize_patches
from cmcaug.losses import info_nce
from cmcaug.transform import CMCTransform


def negatives_of(batch, row: int) -> tuple[list, list]:
    """Row `row`'s negative patch ids and concepts, [N][slots of the row]."""
    slots = torch.from_numpy(batch.plan.slot_rows == row)
    return batch.negative_patch_ids[:, slots].tolist(), batch.negative_concept_ids[:, slots].tolist()


def test_negatives_show_other_concepts_patches(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, negatives=3)
    batch = cmc.collate(indexed(ROWS * 4))
    m, b = batch.num_patches, len(batch)
    assert batch.num_negatives == 3
    assert batch.negative_patch_ids.shape == batch.negative_concept_ids.shape == (3, m)
    assert batch.negative_patch_ids.dtype == batch.negative_concept_ids.dtype == torch.int64
    assert batch.negative_pixels.shape == (3, m, 4, 4, 3) and batch.negative_pixels.dtype == torch.uint8
    assert batch.negative_valid.shape == (b, 3) and batch.negative_valid.dtype == torch.bool
    concepts = batch.negative_concept_ids.numpy()
    assert (concepts != batch.concept_ids.numpy()[None, :]).all()  # every slot, every view: another concept
    assert (np.asarray(bank.counts)[concepts] > 0).all()  # one with patches ("kite" has none)
    ids = batch.negative_patch_ids.numpy()
    assert ((ids >= bank.offsets[concepts]) & (ids < bank.offsets[concepts] + bank.counts[concepts])).all()
    assert torch.equal(batch.negative_pixels, bank.pixels(batch.negative_patch_ids))
    has_slots = torch.from_numpy(batch.plan.slots_per_row > 0)
    assert torch.equal(batch.negative_valid, has_slots[:, None].expand(b, 3))  # rows without a patch: no negative


def test_negative_concepts_and_patches_are_uniform(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, negatives=2)
    batch = cmc.collate([{"caption": "a dog", "spans": regex_spans("a dog"), "index": i} for i in range(900)])
    concepts = batch.negative_concept_ids.reshape(-1).numpy()  # 1800 draws among cat, hot dog, frisbee
    counts = np.bincount(concepts, minlength=len(VOCAB))
    assert counts[VOCAB.id("dog")] == counts[VOCAB.id("kite")] == 0
    for name in ("cat", "hot dog", "frisbee"):
        assert abs(counts[VOCAB.id(name)] - 600) < 4 * (1800 * 2 / 9) ** 0.5, name
    cats = batch.negative_patch_ids.reshape(-1).numpy()[concepts == VOCAB.id("cat")] - bank.offsets[VOCAB.id("cat")]
    per_patch = np.bincount(cats, minlength=COUNTS["cat"])
    assert per_patch.size == COUNTS["cat"] and (abs(per_patch - cats.size / 3) < 4 * (cats.size * 2 / 9) ** 0.5).all()


def test_negatives_depend_on_seed_epoch_and_index_only(bank, tokenizer):
    rows = indexed(ROWS[:5] * 6)
    cmc = CMCTransform(bank, tokenizer, ratio=0.7, seed=5, negatives=2)
    full = cmc.collate(rows)
    again = CMCTransform(bank, tokenizer, ratio=0.7, seed=5, negatives=2).collate(rows)
    assert torch.equal(full.negative_patch_ids, again.negative_patch_ids)
    for row in (0, 13, 29):  # alone, or with the batch reversed, a row gets the negatives it had
        assert negatives_of(cmc.collate([rows[row]]), 0) == negatives_of(full, row)
        assert negatives_of(cmc.collate(rows[::-1]), len(rows) - 1 - row) == negatives_of(full, row)
    cmc.set_epoch(1)
    epoch1 = cmc.collate(rows)
    cmc.set_epoch(0)
    assert torch.equal(cmc.collate(rows).negative_patch_ids, full.negative_patch_ids)
    differs = epoch1.num_patches != full.num_patches or not torch.equal(epoch1.negative_patch_ids, full.negative_patch_ids)
    assert differs  # a new epoch, new negatives


def test_negatives_leave_the_positive_view_unchanged(bank, tokenizer):
    rows = indexed(ROWS * 3)
    plain = CMCTransform(bank, tokenizer, ratio=0.5, seed=2).collate(rows)
    with_negatives = CMCTransform(bank, tokenizer, ratio=0.5, seed=2, negatives=4).collate(rows)
    same_batch(plain, with_negatives)
    assert np.array_equal(plain.sample_keys, with_negatives.sample_keys)
    m = plain.num_patches
    assert plain.num_negatives == 0 and m > 0
    assert plain.negative_patch_ids is plain.negative_concept_ids is plain.negative_pixels is plain.negative_valid is None
    with pytest.raises(InputError, match="no hard negatives"):
        plain.negative_patch_pixels((0.5,) * 3, (0.25,) * 3)


def test_without_another_concept_the_negatives_are_not_valid(tokenizer, tmp_path):
    only_dogs = make_bank(tmp_path / "bank", {"dog": 3, "cat": 0, "hot dog": 0, "kite": 0, "frisbee": 0})
    cmc = CMCTransform(only_dogs, tokenizer, ratio=1.0, negatives=2)
    batch = cmc.collate(indexed(ROWS))
    assert batch.num_patches > 0
    assert torch.equal(batch.negative_patch_ids, batch.patch_ids.expand(2, -1))  # the slot's own patch
    assert torch.equal(batch.negative_concept_ids, batch.concept_ids.expand(2, -1))
    assert not batch.negative_valid.any()


def test_negative_patch_pixels_normalize_each_view(bank, tokenizer):
    batch = CMCTransform(bank, tokenizer, ratio=1.0, negatives=2).collate(indexed(ROWS))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = batch.negative_patch_pixels(mean, std)
    assert out.shape == (2, batch.num_patches, 3, 4, 4) and out.dtype == torch.float32
    for n in range(2):
        assert torch.equal(out[n], normalize_patches(bank.pixels(batch.negative_patch_ids[n]), mean, std, torch.float32))


def test_negatives_move_with_the_batch(bank, tokenizer):
    batch = CMCTransform(bank, tokenizer, ratio=1.0, negatives=2).collate(indexed(ROWS))
    moved = batch.to("meta")
    for name in ("negative_patch_ids", "negative_concept_ids", "negative_pixels", "negative_valid"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(batch, name).device.type == "cpu", name
    if torch.cuda.is_available():
        assert batch.pin_memory().negative_pixels.is_pinned()


@pytest.mark.parametrize("value", [-1, True, 1.5, None, "2"])
def test_bad_negatives_are_refused(bank, tokenizer, value):
    with pytest.raises(InputError, match="negatives must be an integer >= 0"):
        CMCTransform(bank, tokenizer, negatives=value)


def test_repr_shows_negatives(bank, tokenizer):
    assert "negatives=3" in repr(CMCTransform(bank, tokenizer, negatives=3))
    assert "negatives=0" in repr(CMCTransform(bank, tokenizer))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_negatives_are_identical_across_worker_counts(bank, tokenizer):
    from torch.utils.data import DataLoader

    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=1, negatives=2)
    data = cmc.dataset(ROWS * 3)
    serial = list(DataLoader(data, batch_size=4, collate_fn=cmc.collate))
    parallel = list(DataLoader(data, batch_size=4, collate_fn=cmc.collate, num_workers=2, multiprocessing_context="spawn"))
    for a, b in zip(serial, parallel, strict=True):
        same_batch(a, b)
        for name in ("negative_patch_ids", "negative_concept_ids", "negative_pixels", "negative_valid"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_negative_views_feed_info_nce(bank, tokenizer):
    """The intended loop: splice each negative view with the same text, pool, and score it as a hard negative."""
    torch.manual_seed(0)
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, negatives=2)
    batch = cmc.collate(indexed(ROWS[:5]))
    encoder = torch.nn.Linear(3 * 4 * 4, 8)
    text_emb = torch.randn(*batch.input_ids.shape, 8)
    mean, std = (0.5,) * 3, (0.25,) * 3

    def pooled(patch_emb: torch.Tensor) -> torch.Tensor:
        view = cmc.splice(text_emb, patch_emb, batch)
        weights = view.attention_mask[..., None].float()
        return (view.embeds * weights).sum(1) / weights.sum(1)

    positive = pooled(encoder(batch.patch_pixels(mean, std).flatten(1)))
    negative_emb = encoder(batch.negative_patch_pixels(mean, std).flatten(2))  # [N, M, D]
    negatives = torch.stack([pooled(e) for e in negative_emb], dim=1)  # [B, N, D]
    text = (text_emb * batch.attention_mask[..., None]).sum(1) / batch.attention_mask.sum(1, keepdim=True)
    loss = info_nce(text, positive, hard_negatives=negatives, hard_negative_mask=batch.negative_valid)
    loss.backward()
    assert torch.isfinite(loss) and encoder.weight.grad.abs().sum() > 0
