"""`cmcaug.draws` and `cmcaug.mlm` through CMCTransform: the keyed draws are pinned, and `mask_tokens` masks only the text of the view.

Inputs (bank, tokenizer, captions) are shared with tests/test_transform.py via tests/transform_helpers.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transform_helpers import ROWS, bank, indexed, replaced_words, tokenizer  # noqa: F401 (bank, tokenizer: fixtures)

from cmcaug import draws
from cmcaug.errors import InputError
from cmcaug.transform import CMCTransform


def test_draws_are_pinned_across_runs_and_versions(bank, tokenizer):
    """The keyed generator's numbers, and so every view, are fixed: resumed training reproduces them."""
    keys = draws.sample_keys(0, 0, np.array([0, 1, 2**40]))
    assert [hex(int(k)) for k in keys] == ["0x27893c8764760a7f", "0x285d7c1e6f8b9543", "0xc7874da7956e47df"]
    assert draws.uniform(keys, draws.STREAM_SELECT, np.array([0, 1, 5])).tolist() == [
        0.0912736438897025, 0.24562885916121202, 0.7331765289098346]
    assert draws.content_id("a dog") == 14364831733120369406
    batch = CMCTransform(bank, tokenizer, ratio=0.5, seed=0).collate(indexed(ROWS[:5] * 2))
    assert [replaced_words(batch, b) for b in range(10)] == [
        ["dogs"], ["kitten"], [], ["dog"], [], ["dogs"], ["cat"], [], ["dog"], []]
    assert batch.patch_ids.tolist() == [2, 5, 3, 1, 5, 1]


def test_mask_tokens_masks_only_text_of_the_view(bank, tokenizer):
    cmc = CMCTransform(bank, tokenizer, ratio=0.5)
    batch = cmc.collate(indexed(ROWS[:5] * 40))
    masked = cmc.mask_tokens(batch, mlm_probability=0.3, patch_targets="none")  # text only (patch rows: test_patch_targets)
    changed_or_chosen = masked.plan.remap_labels(torch.where(batch.input_ids >= 0, 1, 0), ignore_index=0)
    assert masked.labels.shape == batch.plan.source_index.shape
    chosen_view = masked.labels != -100
    assert (changed_or_chosen[chosen_view] == 1).all()  # labels only on text rows of the view
    # Labels hold the original ids, remapped through the plan.
    assert torch.equal(masked.labels[chosen_view], batch.plan.remap_labels(batch.input_ids)[chosen_view])
    chosen_text = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    chosen_text.view(-1)[batch.plan.source_index[chosen_view].long()] = True
    assert not (chosen_text & (batch.special_tokens_mask | batch.replaced_mask)).any()
    assert torch.equal(masked.input_ids[~chosen_text], batch.input_ids[~chosen_text])
    maskable = int((~(batch.special_tokens_mask | batch.replaced_mask)).sum())
    n = int(chosen_text.sum())
    assert abs(n - 0.3 * maskable) < 4 * (maskable * 0.21) ** 0.5
    became_mask = int((masked.input_ids[chosen_text] == tokenizer.mask_token_id).sum())
    kept = int((masked.input_ids[chosen_text] == batch.input_ids[chosen_text]).sum())
    assert abs(became_mask - 0.8 * n) < 4 * (n * 0.16) ** 0.5 and abs(kept - 0.1 * n) < 4 * (n * 0.09) ** 0.5 + 2
    same = cmc.mask_tokens(batch, mlm_probability=0.3, patch_targets="none")
    assert torch.equal(same.input_ids, masked.input_ids) and torch.equal(same.labels, masked.labels)


def test_mask_tokens_needs_a_mask_token_for_open_clip(bank):
    open_clip = pytest.importorskip("open_clip")
    cmc = CMCTransform(bank, open_clip.get_tokenizer("ViT-B-32"), ratio=1.0)
    batch = cmc.collate(indexed(ROWS[:3]))
    assert batch.input_ids.shape[1] == 77
    with pytest.raises(InputError, match="no mask token"):
        cmc.mask_tokens(batch)
    masked = cmc.mask_tokens(batch, mask_token_id=49407, mlm_probability=0.5)
    assert masked.labels.shape == batch.plan.source_index.shape

