"""Patch-row MLM targets: a patch slot predicts the word it replaced ("word"), or is chosen and hidden like a
text token ("masked"), and `splice(mask_embedding=...)` shows the hidden ones as [MASK].

The exactness of `SplicePlan.replaced_token_values` and `remap_labels(patch_labels=...)` against a per-row
construction is in tests/test_plan.py; here: the modes, their draws, and the CMCTransform path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transform_helpers import ROWS, bank, indexed, tokenizer  # noqa: F401 (bank, tokenizer: fixtures)

from cmcaug import draws, mlm
from cmcaug.errors import InputError
from cmcaug.kernels.index_maps import PAD_SOURCE
from cmcaug.plan import SplicePlan
from cmcaug.transform import CMCTransform


def many_slots(rows: int = 600, seed: int = 0) -> tuple[SplicePlan, torch.Tensor, np.ndarray]:
    """A plan of `rows` rows of 12 tokens, four 2-token spans each (K = 3), with distinct token values."""
    plan = SplicePlan.build([12] * rows, [[(1, 3), (4, 6), (7, 9), (10, 12)]] * rows, patch_tokens=3)
    ids = torch.arange(rows * 12).reshape(rows, 12) + 5
    return plan, ids, draws.sample_keys(seed, 0, np.arange(rows))


def test_modes_none_and_word() -> None:
    plan, ids, keys = many_slots(4)
    labels, hidden = mlm.patch_targets(ids, plan, keys, mode="none", ignore_index=-9)
    assert labels.dtype == torch.int64 and (labels == -9).all() and hidden.dtype == torch.bool and not hidden.any()
    labels, hidden = mlm.patch_targets(ids, plan, keys, mode="word", ignore_index=-9)
    assert torch.equal(labels, plan.replaced_token_values(ids, ignore_index=-9)) and not hidden.any()
    assert labels.shape == hidden.shape == (16, 3)
    assert labels[0].tolist() == [6, 7, -9]  # row k: the word's k-th sub-token; past its last, nothing
    with pytest.raises(InputError, match=r"patch_targets must be one of \('none', 'word', 'masked'\), got 'all'"):
        mlm.patch_targets(ids, plan, keys, mode="all")
    assert mlm.PATCH_TARGETS == ("none", "word", "masked") and mlm.DEFAULT_PATCH_TARGETS == "word"


def test_masked_mode_chooses_and_hides_whole_slots_at_the_asked_rates() -> None:
    plan, ids, keys = many_slots(600)  # 2400 slots
    labels, hidden = mlm.patch_targets(ids, plan, keys, mode="masked", mlm_probability=0.3, mask_fraction=0.8)
    words = plan.replaced_token_values(ids)
    chosen = (labels != -100).any(1)
    assert torch.equal(labels[chosen], words[chosen]) and (labels[~chosen] == -100).all()  # a slot is all or nothing
    assert (hidden.all(1) | ~hidden.any(1)).all() and not hidden[~chosen].any()  # hidden: its K rows, chosen only
    m, n = plan.num_slots, int(chosen.sum())
    assert abs(n - 0.3 * m) < 4 * (m * 0.21) ** 0.5
    n_hidden = int(hidden.all(1).sum())
    assert abs(n_hidden - 0.8 * n) < 4 * (n * 0.16) ** 0.5
    none, _ = mlm.patch_targets(ids, plan, keys, mode="masked", mlm_probability=0.0)
    every, shown = mlm.patch_targets(ids, plan, keys, mode="masked", mlm_probability=1.0, mask_fraction=0.0)
    assert (none == -100).all() and torch.equal(every, words) and not shown.any()
    with pytest.raises(InputError, match="mask_fraction must lie in"):
        mlm.patch_targets(ids, plan, keys, mode="masked", mask_fraction=1.5)


def test_masked_draws_are_keyed_per_slot_or_come_from_a_generator() -> None:
    plan, ids, keys = many_slots(40)
    kwargs = {"mode": "masked", "mlm_probability": 0.5, "mask_fraction": 0.5}
    labels, hidden = mlm.patch_targets(ids, plan, keys, **kwargs)
    again = mlm.patch_targets(ids, plan, keys.copy(), **kwargs)
    assert torch.equal(again[0], labels) and torch.equal(again[1], hidden)
    # A row alone (another batch, another slot numbering) draws what it drew in the full batch.
    row = 17
    alone = SplicePlan.build([12], [[(1, 3), (4, 6), (7, 9), (10, 12)]], patch_tokens=3)
    own_labels, own_hidden = mlm.patch_targets(ids[row: row + 1], alone, keys[row: row + 1], **kwargs)
    slots = torch.from_numpy(plan.slot_rows == row)
    assert torch.equal(own_labels, labels[slots]) and torch.equal(own_hidden, hidden[slots])
    first = mlm.patch_targets(ids, plan, keys, generator=torch.Generator().manual_seed(3), **kwargs)
    second = mlm.patch_targets(ids, plan, keys, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], labels)  # the generator's draw replaces the keys


def test_mask_tokens_places_patch_labels_through_the_plan() -> None:
    plan, ids, keys = many_slots(8)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    kwargs = {"mlm_probability": 0.3, "mask_token_id": 1, "vocab_size": 10_000}
    masked, text_only = mlm.mask_tokens(ids, maskable, plan, keys, **kwargs)
    patch_labels = plan.replaced_token_values(ids)
    same, labels = mlm.mask_tokens(ids, maskable, plan, keys, patch_labels=patch_labels, **kwargs)
    assert torch.equal(same, masked)  # the text's draws do not change
    is_patch = plan.modality_ids.bool()
    assert torch.equal(labels[~is_patch], text_only[~is_patch])
    assert torch.equal(labels[is_patch], patch_labels.reshape(-1))  # every slot's rows, in slot order


# -- through CMCTransform -----------------------------------------------------------------------------


def test_default_patch_targets_are_the_replaced_words(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, patch_tokens=2)
    batch = cmc.collate(indexed(ROWS[:1]))  # "two dogs chase a frisbee": dogs, then fris ##bee
    masked = cmc.mask_tokens(batch, mlm_probability=0.0)
    assert masked.patch_mask is None
    patch_rows = masked.labels[batch.plan.modality_ids.bool()].tolist()
    assert patch_rows == tokenizer.convert_tokens_to_ids(["dogs"]) + [-100] + tokenizer.convert_tokens_to_ids(["fris", "##bee"])
    k1 = CMCTransform(bank, tokenizer, ratio=1.0).collate(indexed(ROWS[:1]))
    labels = cmc.mask_tokens(k1, mlm_probability=0.0).labels
    assert labels[k1.plan.modality_ids.bool()].tolist() == tokenizer.convert_tokens_to_ids(["dogs", "fris"])  # K=1: first


def test_patch_targets_leave_the_text_masking_unchanged(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=0.5)
    batch = cmc.collate(indexed(ROWS * 10))
    text_only = cmc.mask_tokens(batch, mlm_probability=0.3, patch_targets="none")
    is_patch = batch.plan.modality_ids.bool()
    assert (text_only.labels[is_patch] == -100).all() and text_only.patch_mask is None
    for mode in ("word", "masked"):
        masked = cmc.mask_tokens(batch, mlm_probability=0.3, patch_targets=mode)
        assert torch.equal(masked.input_ids, text_only.input_ids), mode
        assert torch.equal(masked.labels[~is_patch], text_only.labels[~is_patch]), mode
    words = cmc.mask_tokens(batch, mlm_probability=0.3)  # the default is "word"
    assert torch.equal(words.labels[is_patch], batch.plan.replaced_token_values(batch.input_ids).reshape(-1))
    with pytest.raises(InputError, match=r"patch_targets must be one of \('none', 'word', 'masked'\)"):
        cmc.mask_tokens(batch, patch_targets="words")


def test_an_unknown_word_is_not_a_patch_target(bank, tokenizer):
    row = {"caption": "a doggo", "spans": [(2, 7, bank.vocab.id("dog"))], "index": 0}  # "doggo" -> [UNK]
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate([row])
    assert batch.num_patches == 1
    assert (cmc.mask_tokens(batch, mlm_probability=1.0).labels[batch.plan.modality_ids.bool()] == -100).all()


def test_masked_mode_through_the_transform_is_reproducible(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, patch_tokens=2)
    batch = cmc.collate(indexed(ROWS * 20))
    masked = cmc.mask_tokens(batch, mlm_probability=0.5, patch_targets="masked")
    assert masked.patch_mask.shape == (batch.num_patches, 2) and masked.patch_mask.dtype == torch.bool
    assert masked.patch_mask.any() and not masked.patch_mask.all()
    same = cmc.mask_tokens(batch, mlm_probability=0.5, patch_targets="masked")
    assert torch.equal(same.patch_mask, masked.patch_mask) and torch.equal(same.labels, masked.labels)
    g = [cmc.mask_tokens(batch, mlm_probability=0.5, patch_targets="masked", generator=torch.Generator().manual_seed(4))
         for _ in range(2)]
    assert torch.equal(g[0].patch_mask, g[1].patch_mask) and torch.equal(g[0].labels, g[1].labels)
    assert cmc.mask_tokens(masked, patch_targets="word").patch_mask is None  # re-masking replaces it
    moved = masked.to("cpu")
    assert torch.equal(moved.patch_mask, masked.patch_mask)


def test_splice_shows_hidden_patches_as_the_mask_embedding(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, patch_tokens=2)
    batch = cmc.mask_tokens(cmc.collate(indexed(ROWS * 3)), mlm_probability=0.5, patch_targets="masked")
    hidden = batch.patch_mask
    assert hidden.any() and not hidden.all()
    b, l = batch.input_ids.shape
    d = 3
    text = torch.arange(b * l * d, dtype=torch.float32).reshape(b, l, d).requires_grad_()
    patches = (-1.0 - torch.arange(batch.num_patches * 2 * d, dtype=torch.float32)).reshape(-1, 2, d).requires_grad_()
    mask_embedding = torch.tensor([7.0, 8.0, 9.0], requires_grad=True)
    view = cmc.splice(text, patches, batch, mask_embedding=mask_embedding)
    # By hand: each output row reads a text row, a patch row (the mask embedding where hidden) or nothing.
    expected = torch.zeros(b, batch.plan.output_length, d)
    for row in range(b):
        for t, s in enumerate(batch.plan.source_index[row].tolist()):
            if s >= 0:
                expected[row, t] = text.detach().reshape(-1, d)[s]
            elif s != PAD_SOURCE:
                m, k = divmod(-1 - s, 2)
                expected[row, t] = mask_embedding.detach() if hidden[m, k] else patches.detach()[m, k]
    assert torch.equal(view.embeds, expected)
    view.embeds.sum().backward()
    assert torch.equal(mask_embedding.grad, torch.full((d,), float(hidden.sum())))
    assert (patches.grad[hidden] == 0).all() and (patches.grad[~hidden] == 1).all()
    with pytest.raises(InputError, match=r"mask_embedding=model.get_input_embeddings\(\).weight\[tokenizer.mask_token_id\]"):
        cmc.splice(text, patches, batch)
    with pytest.raises(InputError, match=r"mask_embedding must be a tensor \[D\] = \[3\]"):
        cmc.splice(text, patches, batch, mask_embedding=torch.zeros(4))


def test_splice_without_hidden_patches_needs_no_mask_embedding(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=1.0)
    batch = cmc.collate(indexed(ROWS))
    text, patches = torch.randn(*batch.input_ids.shape, 4), torch.randn(batch.num_patches, 4)
    plain = cmc.splice(text, patches, batch).embeds
    for mode in ("none", "word"):
        assert torch.equal(cmc.splice(text, patches, cmc.mask_tokens(batch, patch_targets=mode)).embeds, plain)
    shown = cmc.mask_tokens(batch, patch_targets="masked", mask_fraction=0.0)
    assert torch.equal(cmc.splice(text, patches, shown).embeds, plain)
    assert torch.equal(cmc.splice(text, patches, shown, mask_embedding=torch.zeros(4)).embeds, plain)


@pytest.mark.gpu
def test_patch_targets_and_negatives_on_cuda_match_the_cpu(bank, tokenizer):
    """A pinned batch moved to the GPU: the same patch labels, hidden rows, spliced view and hard negatives."""
    from torch.utils.data import DataLoader

    cmc = CMCTransform(bank, tokenizer, ratio=1.0, patch_tokens=2, negatives=2)
    (host,) = DataLoader(indexed(ROWS * 3), batch_size=len(ROWS) * 3, collate_fn=cmc.collate, pin_memory=True)
    assert host.negative_pixels.is_pinned() and host.negative_valid.is_pinned()
    device = host.to("cuda", non_blocking=True)
    on_cpu = cmc.mask_tokens(host, mlm_probability=0.5, patch_targets="masked")
    on_gpu = cmc.mask_tokens(device, mlm_probability=0.5, patch_targets="masked")
    assert on_gpu.patch_mask.is_cuda and torch.equal(on_gpu.patch_mask.cpu(), on_cpu.patch_mask)
    assert torch.equal(on_gpu.labels.cpu(), on_cpu.labels)
    text, patches, mask = torch.randn(*host.input_ids.shape, 8), torch.randn(host.num_patches, 2, 8), torch.randn(8)
    expected = cmc.splice(text, patches, on_cpu, mask_embedding=mask).embeds
    got = cmc.splice(text.cuda(), patches.cuda(), on_gpu, mask_embedding=mask.cuda()).embeds
    assert torch.equal(got.cpu(), expected)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.testing.assert_close(device.negative_patch_pixels(mean, std).cpu(), host.negative_patch_pixels(mean, std))
