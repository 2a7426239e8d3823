"""Cross-modal CutMix with Hugging Face BERT: a tiny model trained on shapes-world captions, on the CPU.

    python examples/train_bert_cmc.py --steps 60

Everything is built here, offline, in a temporary folder: a shapes-world corpus, its patch bank and its
captions' grounding tags (`shapes_world.py`), and a WordPiece tokenizer over the captions' words. Then the
VLMixer recipe on unpaired text: each caption's grounded words are swapped for bank patches (the CMC view);
the model learns masked language modelling on the CMC view and a contrastive loss that pulls each
caption's text view and CMC view together.

Then a test only cross-modal alignment can pass (`zero_shot_accuracy`): the patches of a held-out
shapes-world corpus (another seed, `--eval-images` images never seen in training) are classified by the
concept name whose text embedding is nearest. Training never pairs an image with its caption (patches are
drawn from the bank by concept), so this measures what VLMixer claims CMC gives: alignment from unpaired data.
`unpaired_zero_shot.py` runs it with and without CMC over several seeds.

The lines that use cmcaug in a training loop are marked `# cmcaug`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmcaug import CMCTransform, PatchBank, SplicePlan, normalize_patches, splice
from cmcaug.losses import info_nce
from shapes_world import PatchEncoder, argument_parser, shapes_world  # next to this file

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MAX_LENGTH = 64  # the model's position embeddings: tokens per caption, and per CMC view


def wordpiece_tokenizer(texts: list[str]):
    """A BERT WordPiece tokenizer over every word of `texts`, plus single characters for unseen words.

    Built, not trained (no download, and the `tokenizers` trainer breaks ties differently from run to
    run): BERT's normalizer, pre-tokenizer and special tokens, ids in sorted order, so runs reproduce.
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))})
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *(f"##{c}" for c in chars)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})


def build_model(vocab_size: int, dim: int = 64):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=MAX_LENGTH, type_vocab_size=2)
    return BertForMaskedLM(config), PatchEncoder(dim)


def train_step(cmc: CMCTransform, model, patch_encoder, batch, temperature: float = 0.1) -> dict[str, torch.Tensor]:
    """MLM on the masked CMC view + InfoNCE between the text view and the (unmasked) CMC view."""
    words = model.get_input_embeddings()
    patch_emb = patch_encoder(batch.patch_pixels(MEAN, STD, torch.float32))       # cmcaug: [M, 1, D]
    masked = cmc.mask_tokens(batch, mlm_probability=0.15)                          # cmcaug
    view = cmc.splice(words(masked.input_ids), patch_emb, masked)                  # cmcaug
    mlm = model(inputs_embeds=view.embeds, attention_mask=view.attention_mask,
                token_type_ids=view.modality_ids, position_ids=view.position_ids, labels=masked.labels).loss
    clean = cmc.splice(words(batch.input_ids), patch_emb, batch)                   # cmcaug
    cmc_cls = model.bert(inputs_embeds=clean.embeds, attention_mask=clean.attention_mask,
                         token_type_ids=clean.modality_ids, position_ids=clean.position_ids).last_hidden_state[:, 0]
    text_cls = model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, 0]
    contrastive = info_nce(text_cls, cmc_cls, temperature)
    return {"loss": mlm + contrastive, "mlm": mlm, "contrastive": contrastive}


def encode_patches(model, patch_encoder, tokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """[CLS] embeddings [N, D] of uint8 patches [N, P, P, 3], each alone in a sequence laid out as in a CMC view.

    [CLS] patch [SEP], the patch with token type 1: cmcaug plans and splices it, the patch replacing the
    middle token of [CLS] [MASK] [SEP].
    """
    slots = tokenizer([tokenizer.mask_token] * len(pixels), return_tensors="pt")
    plan = SplicePlan.build(slots.attention_mask.sum(1).numpy(), [[(1, 2)]] * len(pixels),
                            text_length=slots.input_ids.shape[1])
    patch_emb = patch_encoder(normalize_patches(pixels, MEAN, STD, torch.float32))
    view = splice(model.get_input_embeddings()(slots.input_ids), patch_emb, plan)
    return model.bert(inputs_embeds=view.embeds, attention_mask=view.attention_mask, token_type_ids=view.modality_ids,
                      position_ids=view.position_ids).last_hidden_state[:, 0]


def encode_names(model, tokenizer, names: list[str]) -> torch.Tensor:
    """[CLS] embeddings [C, D] of the concept names as text, [CLS] name [SEP], as the text view encodes a caption."""
    return model.bert(**tokenizer(names, padding=True, return_tensors="pt")).last_hidden_state[:, 0]


@torch.no_grad()
def zero_shot_accuracy(model, patch_encoder, tokenizer, bank: PatchBank) -> dict:
    """Classify every patch of `bank` by the concept name nearest to it (cosine of [CLS] embeddings).

    Patches and names are encoded apart (`encode_patches`, `encode_names`), in eval mode. Returns top-1
    accuracy, chance (1 / concepts), the share of the most common concept (what predicting one concept for
    every patch can score), accuracy per concept and how often each concept was predicted.
    """
    names, counts = bank.vocab.names, bank.counts
    labels = torch.from_numpy(np.repeat(np.arange(len(names)), counts))
    modes = [(m, m.training) for m in (model, patch_encoder)]
    for m, _ in modes:
        m.eval()
    try:
        patch_cls = encode_patches(model, patch_encoder, tokenizer, bank.pixels(np.arange(len(labels))))
        name_cls = encode_names(model, tokenizer, names)
    finally:
        for m, training in modes:
            m.train(training)
    predicted = (F.normalize(patch_cls, dim=-1) @ F.normalize(name_cls, dim=-1).T).argmax(1)
    correct = (predicted == labels).float()
    return {
        "accuracy": round(correct.mean().item(), 4),
        "chance": round(1 / len(names), 4),
        "majority": round(float(counts.max() / counts.sum()), 4),
        "patches": len(labels),
        "per_concept": {n: round(correct[labels == c].mean().item(), 4) for c, n in enumerate(names) if counts[c]},
        "predicted": {n: int((predicted == c).sum()) for c, n in enumerate(names)},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0], steps=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1, help="of the text-view / CMC-view InfoNCE")
    parser.add_argument("--eval-images", type=int, default=120,
                        help="images of the held-out corpus for zero_shot_accuracy (0: no evaluation)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out corpus; not --seed")
    parser.add_argument("--coded-colors", action="store_true",
                        help="train on colour-coded captions (shapes_world.code_colors): context that names the shape")
    args = parser.parse_args(argv)
    if args.eval_images and args.eval_seed == args.seed:
        parser.error(f"--eval-seed must differ from --seed ({args.seed}): the held-out corpus would be the training corpus")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-bert-") as tmp:
        bank, rows = shapes_world(args.workdir or Path(tmp), args.images, args.seed, args.coded_colors)
        tokenizer = wordpiece_tokenizer([r["caption"] for r in rows])
        cmc = CMCTransform(bank, tokenizer, ratio=args.ratio, max_length=MAX_LENGTH, seed=args.seed)  # cmcaug
        loader = DataLoader(cmc.dataset(rows), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=cmc.collate, num_workers=args.num_workers,           # cmcaug
                            generator=torch.Generator().manual_seed(args.seed))
        model, patch_encoder = build_model(len(tokenizer))
        optimizer = torch.optim.AdamW([*model.parameters(), *patch_encoder.parameters()], lr=args.lr)
        history, step, epoch = [], 0, 0
        while step < args.steps:
            cmc.set_epoch(epoch)                                                             # cmcaug
            for batch in loader:
                losses = train_step(cmc, model, patch_encoder, batch, args.temperature)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                history.append({k: round(v.item(), 4) for k, v in losses.items()})
                step += 1
                if step % 10 == 0 or step == args.steps:
                    print(f"step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
                if step == args.steps:
                    break
            epoch += 1
        stats = cmc.stats.as_dict()                                                          # cmcaug
        print(f"replaced {stats['spans_replaced']} of {stats['spans']} grounded words in {stats['captions']} captions")
        result = {"history": history, "stats": stats}
        if args.eval_images:
            heldout, _ = shapes_world((args.workdir or Path(tmp)) / "heldout", args.eval_images, args.eval_seed)
            result["zero_shot"] = zero_shot = zero_shot_accuracy(model, patch_encoder, tokenizer, heldout)
            print(f"zero-shot accuracy on {zero_shot['patches']} held-out patches: {zero_shot['accuracy']:.3f} "
                  f"(chance {zero_shot['chance']:.3f})")
        return result


if __name__ == "__main__":
    main()
