"""CMCTransform inside real training code: HF BERT and open_clip's text tower, random init, offline.

The models and the objective are the ones in `examples/` (`cmcaug.vlmixer.VLMixerObjective` over them),
imported from there, so the examples are tested too. A shapes-world corpus and bank (`examples/shapes_world.py`) are built once for the module.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from cmcaug import CMCTransform
from cmcaug.text_encoders import OpenCLIPTextEncoder
from cmcaug.vlmixer import VLMixerObjective

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    """Import examples/<name>.py as running the script would: with its folder first on sys.path."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


shapes = _example("shapes_world")
bert_example = _example("train_bert_cmc")
clip_example = _example("train_open_clip_cmc")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return shapes.shapes_world(tmp_path_factory.mktemp("world"), n_images=48, seed=0)


@pytest.fixture(scope="module")
def bert_setup(world):
    bank, rows = world
    tokenizer = bert_example.wordpiece_tokenizer([r["caption"] for r in rows])
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=0)
    batch = cmc.collate([dict(r, index=i) for i, r in enumerate(rows[:16])])
    assert batch.num_patches > 0
    return cmc, tokenizer, batch


def test_bert_trains_on_cmc_views(world, bert_setup):
    bank, rows = world
    _, tokenizer, _ = bert_setup
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=0, negatives=1)
    batch = cmc.collate([dict(r, index=i) for i, r in enumerate(rows[:16])])
    torch.manual_seed(0)
    model, patch_encoder = bert_example.build_model(len(tokenizer), dim=32)
    objective = VLMixerObjective(cmc, model, patch_encoder, mean=bert_example.MEAN, std=bert_example.STD)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):  # one fixed batch: the losses must fall
        loss = objective(batch)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(loss.as_dict())
    assert all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in losses)
    assert losses[-1]["mlm"] < losses[0]["mlm"] and losses[-1]["loss"] < losses[0]["loss"]


def test_bert_gradients_reach_kept_tokens_and_patches_not_replaced_ones(bert_setup):
    from transformers import BertConfig, BertForMaskedLM

    cmc, tokenizer, batch = bert_setup
    torch.manual_seed(0)
    # Untied: with tied weights the MLM decoder would give every vocabulary row a gradient.
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, tie_word_embeddings=False)
    model, patch_encoder = BertForMaskedLM(config), shapes.PatchEncoder(32)
    words = model.get_input_embeddings()
    assert words.weight is not model.get_output_embeddings().weight
    masked = cmc.mask_tokens(batch, mlm_probability=0.3)
    text_emb = words(masked.input_ids)
    text_emb.retain_grad()
    patch_emb = patch_encoder(batch.patch_pixels(bert_example.MEAN, bert_example.STD))
    view = cmc.splice(text_emb, patch_emb, masked)
    out = model(inputs_embeds=view.embeds, attention_mask=view.attention_mask, token_type_ids=view.modality_ids,
                position_ids=view.position_ids, labels=masked.labels, output_hidden_states=True)
    (out.loss + out.hidden_states[-1][:, 0].pow(2).mean()).backward()
    grad = text_emb.grad.abs().sum(-1)
    kept = (batch.attention_mask == 1) & ~batch.replaced_mask
    assert (grad[batch.replaced_mask] == 0).all() and (grad[batch.attention_mask == 0] == 0).all()
    assert (grad[kept] > 0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in patch_encoder.parameters())
    # Word-embedding rows: used by kept tokens -> gradient; used only by replaced tokens -> none.
    kept_ids = set(masked.input_ids[kept].tolist())
    replaced_only = set(masked.input_ids[batch.replaced_mask].tolist()) - kept_ids
    assert replaced_only, "the batch should hold words that occur only where a patch replaced them"
    row_grad = words.weight.grad.abs().sum(-1)
    assert all(row_grad[i] > 0 for i in kept_ids) and all(row_grad[i] == 0 for i in replaced_only)
    assert out.logits.argmax(-1).shape == masked.labels.shape
    words = batch.plan.replaced_token_values(torch.where(batch.special_tokens_mask, -100, batch.input_ids))
    assert torch.equal(masked.labels[view.modality_ids == 1], words.reshape(-1))  # patch rows predict their word


@pytest.fixture(scope="module")
def clip_setup(world):
    open_clip = pytest.importorskip("open_clip")
    bank, rows = world
    return bank, rows, open_clip.get_tokenizer("ViT-B-32")


def test_open_clip_spliced_forward_is_the_models_forward(clip_setup):
    """With nothing replaced, feeding the spliced embeddings equals open_clip's own forward on the ids."""
    bank, rows, tokenizer = clip_setup
    torch.manual_seed(0)
    model = clip_example.text_tower(width=32, output_dim=16).eval()
    cmc = CMCTransform(bank, tokenizer, ratio=0.0)
    batch = cmc.collate([dict(r, index=i) for i, r in enumerate(rows[:8])])
    assert torch.equal(batch.input_ids, tokenizer([r["caption"] for r in rows[:8]]))
    view = cmc.splice(model.token_embedding(batch.input_ids), torch.zeros(0, 1, 32), batch)
    encoder = OpenCLIPTextEncoder(model)
    with torch.no_grad():
        ours = encoder.pool(encoder.encode(view.embeds, view.attention_mask, view.modality_ids, view.position_ids),
                            view.attention_mask)
        theirs = model(batch.input_ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_open_clip_text_tower_trains_on_cmc_views(clip_setup):
    bank, rows, tokenizer = clip_setup
    torch.manual_seed(0)
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, seed=0, negatives=1)
    batch = cmc.collate([dict(r, index=i) for i, r in enumerate(rows[:16])])
    assert batch.num_patches > 0 and batch.plan.output_length < batch.input_ids.shape[1]
    objective = VLMixerObjective(cmc, clip_example.text_tower(width=32, output_dim=16), shapes.PatchEncoder(32),
                                 mean=clip_example.MEAN, std=clip_example.STD, mlm_weight=0.0, temperature=0.5)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = objective(batch).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.patch_encoder.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("example", [bert_example, clip_example], ids=["bert", "open_clip"])
def test_examples_run_end_to_end(example, tmp_path, capsys):
    result = example.main(["--steps", "2", "--images", "24", "--batch-size", "8", "--workdir", str(tmp_path)])
    assert len(result["history"]) == 2 and result["stats"]["captions"] == 16
    assert (tmp_path / "bank" / "manifest.json").is_file()
    assert "replaced" in capsys.readouterr().out


def test_vlmixer_replication_runs_and_reproduces(tmp_path, capsys):
    from cmcaug.benchmarks.common import device_name, slug

    replication = _example("replicate_vlmixer")
    arms = ["cmc+targets", "labelled", "scratch"]
    result = replication.main(["--smoke", "--arms", *arms, "--seeds", "0", "0", "--fractions", "0.5",
                               "--jobs", "1", "--out", str(tmp_path)])
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]]
    assert [r["arm"] for r in rows] == arms * 2
    assert all({"zero_shot", "in_context", "r1@50%", "r5@50%"} <= r.keys() for r in rows)
    assert rows[:3] == rows[3:]  # the same seed twice: the same runs
    assert [s["arm"] for s in result["summary"]] == arms
    stem = tmp_path / f"vlmixer-replication-{slug(device_name('cpu'))}"
    assert all(stem.with_suffix(ext).is_file() for ext in (".json", ".md", ".png"))
    assert "| chance |" in stem.with_suffix(".md").read_text()
    assert "per arm" in capsys.readouterr().out
