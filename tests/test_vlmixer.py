"""`cmcaug.vlmixer.VLMixerObjective` and its text-tower adapters, against the same losses written out by hand.

A tiny random BERT (HF) and a tiny open_clip text tower read CMC views of the transform tests' captions and
bank (`transform_helpers`). The objective must equal its definition: the model's own MLM loss on the masked
CMC view with patch-slot targets, plus InfoNCE between text view and CMC view with the hard negative views,
the contrast passes without dropout unless asked; readouts must sit where the plan says.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cmcaug import CMCTransform, InputError
from cmcaug.kernels import normalize_patches
from cmcaug.losses import info_nce
from cmcaug.text_encoders import MaskedLMEncoder, OpenCLIPTextEncoder, text_encoder
from cmcaug.vlmixer import VLMixerObjective
from transform_helpers import ROWS, bank, indexed, tokenizer  # noqa: F401 (fixtures)

MEAN, STD, DIM = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 16


def bert(vocab_size: int, dropout: float = 0.0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config)


def patch_encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 3, DIM))  # [M, D]: the objective adds K = 1


@pytest.fixture()
def setup(bank, tokenizer):  # noqa: F811
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, max_length=64, seed=0, negatives=2)
    batch = cmc.collate(indexed(ROWS))
    assert batch.num_patches > 0 and batch.negative_valid.any() and not batch.negative_valid.all()
    return cmc, batch


def test_objective_is_mlm_plus_contrast_with_hard_negatives(setup, tokenizer):  # noqa: F811
    cmc, batch = setup
    model, patches = bert(len(tokenizer)), patch_encoder()
    objective = VLMixerObjective(cmc, model, patches, mean=MEAN, std=STD, temperature=0.2, mlm_weight=0.5)
    losses = objective(batch)

    words = model.get_input_embeddings()
    emb = patches(normalize_patches(batch.pixels, MEAN, STD, torch.float32)).unsqueeze(1)
    masked = cmc.mask_tokens(batch, 0.15, patch_targets="word")
    view = cmc.splice(words(masked.input_ids), emb, masked)
    mlm = model(inputs_embeds=view.embeds, attention_mask=view.attention_mask, token_type_ids=view.modality_ids,
                position_ids=view.position_ids, labels=masked.labels).loss

    def cls(embeds, mask, types, positions):
        return model.bert(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                          position_ids=positions).last_hidden_state[:, 0]

    text = model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, 0]
    views = []
    for p in (batch.pixels, *batch.negative_pixels):
        v = cmc.splice(words(batch.input_ids), patches(normalize_patches(p, MEAN, STD, torch.float32)).unsqueeze(1), batch)
        views.append(cls(v.embeds, v.attention_mask, v.modality_ids, v.position_ids))
    contrastive = info_nce(text, views[0], 0.2, hard_negatives=torch.stack(views[1:], 1),
                           hard_negative_mask=batch.negative_valid)
    torch.testing.assert_close(losses.mlm, mlm)
    torch.testing.assert_close(losses.contrastive, contrastive)
    torch.testing.assert_close(losses.loss, 0.5 * mlm + contrastive)
    losses.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in patches.parameters())
    assert set(losses.as_dict()) == {"loss", "mlm", "contrastive"}


def test_contrast_passes_run_without_dropout_unless_asked(setup, tokenizer):  # noqa: F811
    cmc, batch = setup
    model = bert(len(tokenizer), dropout=0.5)
    objective = VLMixerObjective(cmc, model, patch_encoder(), mean=MEAN, std=STD, mlm_weight=0.0)
    objective.train()
    first, second = objective(batch).contrastive, objective(batch).contrastive
    assert torch.equal(first, second)  # no dropout in the contrast: deterministic
    assert model.training and all(m.training for m in model.modules())  # and the mode is restored
    model.eval()
    torch.testing.assert_close(objective(batch).contrastive, first)  # the same as eval mode
    noisy = VLMixerObjective(cmc, model, objective.patch_encoder, mean=MEAN, std=STD, mlm_weight=0.0,
                             contrast_dropout=True).train()
    assert not torch.equal(noisy(batch).contrastive, noisy(batch).contrastive)


@pytest.mark.parametrize("targets", ["none", "word", "masked"])
def test_patch_target_modes_train(setup, tokenizer, targets):  # noqa: F811
    cmc, batch = setup
    objective = VLMixerObjective(cmc, bert(len(tokenizer)), patch_encoder(), mean=MEAN, std=STD,
                                 patch_targets=targets, mlm_probability=0.9)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = objective(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_readouts_sit_where_the_plan_says(setup, tokenizer):  # noqa: F811
    cmc, batch = setup
    model = bert(len(tokenizer)).eval()
    objective = VLMixerObjective(cmc, model, patch_encoder(), mean=MEAN, std=STD).eval()
    with torch.no_grad():
        view = objective.encode_view(batch)
        assert view.patch_states.shape == (batch.num_patches, 1, DIM)
        is_patch = batch.plan.modality_ids == 1
        torch.testing.assert_close(view.patch_states[:, 0], view.hidden[is_patch])
        torch.testing.assert_close(view.pooled, view.hidden[:, 0])
        text = objective.encode_text(batch.input_ids, batch.attention_mask)
        assert text.patch_states is None and text.word_states is None and text.pooled.shape == (len(batch), DIM)
        words = objective.encode_text(batch.input_ids, batch.attention_mask, batch.plan).word_states
        spans = batch.plan.slot_token_spans
        expected = torch.stack([text.hidden[b, s:e].mean(0) for b, (s, e) in zip(batch.plan.slot_rows, spans)])
        assert (spans[:, 1] - spans[:, 0] > 1).any()  # "frisbee": a word of two sub-tokens
        torch.testing.assert_close(words, expected)
        # patches alone, and grouped: [CLS] p [SEP] and [CLS] p1 p2 p3 [SEP]
        pixels = batch.pixels[:4]
        alone, grouped = objective.encode_patches(pixels), objective.encode_patches(pixels, [1, 3])
        assert alone.pooled.shape == (4, DIM) and grouped.pooled.shape == (2, DIM)
        assert grouped.attention_mask.sum(1).tolist() == [3, 5]
        torch.testing.assert_close(grouped.pooled[0], alone.pooled[0])
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        words = model.get_input_embeddings().weight
        expected = torch.stack([words[cls], *objective._patch_embeds(pixels[1:])[:, 0], words[sep]])
        hidden = model.bert(inputs_embeds=expected[None], token_type_ids=torch.tensor([[0, 1, 1, 1, 0]]))
        torch.testing.assert_close(grouped.pooled[1], hidden.last_hidden_state[0, 0])
    with pytest.raises(InputError, match="groups"):
        objective.encode_patches(pixels, [2, 1])


def test_open_clip_tower(setup):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer

    bank, rows = setup[0].bank, ROWS
    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=DIM, heads=2, layers=1, output_dim=8).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cmc = CMCTransform(bank, tokenizer, ratio=0.0, seed=0)
    batch = cmc.collate(indexed(rows[:5]))
    encoder = text_encoder(tower)
    assert isinstance(encoder, OpenCLIPTextEncoder) and not encoder.has_mlm
    with torch.no_grad():  # nothing replaced: the adapter's forward is open_clip's own
        ours = encoder.pool(encoder.encode(encoder.embed(batch.input_ids), batch.attention_mask), batch.attention_mask)
        torch.testing.assert_close(ours, tower(batch.input_ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="MLM head"):
        VLMixerObjective(cmc, tower, patch_encoder(), mean=MEAN, std=STD)
    cmc = CMCTransform(bank, tokenizer, ratio=1.0, seed=0, negatives=1)
    batch = cmc.collate(indexed(rows[:5]))
    head = nn.Linear(DIM, 49408)
    objective = VLMixerObjective(cmc, tower.train(), patch_encoder(), mean=MEAN, std=STD, mlm_head=head,
                                 mask_token_id=49407)
    losses = objective(batch)
    losses.loss.backward()
    assert torch.isfinite(losses.loss) and head.weight.grad.abs().sum() > 0
    assert objective.encode_patches(batch.pixels[:3], [3]).pooled.shape == (1, 8)


def test_objective_refuses_what_it_cannot_do(setup, tokenizer):  # noqa: F811
    cmc, _ = setup
    model = bert(len(tokenizer))
    with pytest.raises(InputError, match="patch_targets"):
        VLMixerObjective(cmc, model, patch_encoder(), mean=MEAN, std=STD, patch_targets="word-ish")
    with pytest.raises(InputError, match="weights"):
        VLMixerObjective(cmc, model, patch_encoder(), mean=MEAN, std=STD, mlm_weight=0, contrast_weight=0)
    with pytest.raises(InputError, match="text tower"):
        text_encoder(nn.Linear(2, 2))
    assert isinstance(text_encoder(model), MaskedLMEncoder)


def test_roberta_positions_start_after_the_padding_index(bank):  # noqa: F811
    """RoBERTa numbers positions from padding_idx + 1: the adapter's forward from embeddings is the model's own."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=40, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    model = RobertaForMaskedLM(config).eval()
    encoder = text_encoder(model)
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        ours = encoder.encode(encoder.embed(ids), mask)
        theirs = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()])


def test_an_hf_model_without_an_mlm_head_needs_mlm_weight_0(setup):
    from transformers import BertConfig, BertModel

    cmc, batch = setup
    model = BertModel(BertConfig(vocab_size=40, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    assert not text_encoder(model).has_mlm
    with pytest.raises(InputError, match="MLM head"):
        VLMixerObjective(cmc, model, patch_encoder(), mean=MEAN, std=STD)


def test_mlm_loss_is_zero_not_nan_without_labels():
    from cmcaug.text_encoders import masked_lm_loss

    logits, labels = torch.randn(2, 5, 11), torch.full((2, 5), -100)
    assert masked_lm_loss(logits, labels).item() == 0.0
    labels[0, 1], labels[1, 3] = 4, 7
    torch.testing.assert_close(masked_lm_loss(logits, labels),
                               torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_objective_runs_under_autocast(setup, tokenizer):  # noqa: F811
    """bf16 patch features (autocast) and float32 word embeddings meet in one splice: the patches are cast."""
    cmc, batch = setup
    objective = VLMixerObjective(cmc, bert(len(tokenizer)), patch_encoder(), mean=MEAN, std=STD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = objective(batch)
    losses.loss.backward()
    assert torch.isfinite(losses.loss)


def test_open_clip_towers_the_adapter_cannot_read_are_refused():
    pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer

    bidirectional = TextTransformer(context_length=77, vocab_size=100, width=DIM, heads=2, layers=1, output_dim=8,
                                    no_causal_mask=True)
    with pytest.raises(InputError, match="no_causal_mask"):
        text_encoder(bidirectional)
