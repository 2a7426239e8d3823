"""Cross-modal CutMix with Hugging Face BERT: a tiny model trained on shapes-world captions, on the CPU.

    python examples/train_bert_cmc.py --steps 60

Everything is built here, offline, in a temporary folder: a shapes-world corpus, its patch bank and its
captions' grounding tags (`shapes_world.py`), and a WordPiece tokenizer over the captions' words. Then the
VLMixer recipe on unpaired text: each caption's grounded words are swapped for bank patches (the CMC view);
the model learns masked language modelling on the CMC view and a contrastive loss that pulls each
caption's text view and CMC view together.

The lines that use cmcaug in a training loop are marked `# cmcaug`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cmcaug import CMCTransform
from cmcaug.losses import info_nce
from shapes_world import PatchEncoder, parse_args, shapes_world  # next to this file

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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], steps=60)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-bert-") as tmp:
        bank, rows = shapes_world(args.workdir or Path(tmp), args.images, args.seed)
        tokenizer = wordpiece_tokenizer([r["caption"] for r in rows])
        cmc = CMCTransform(bank, tokenizer, ratio=args.ratio, max_length=MAX_LENGTH, seed=args.seed)  # cmcaug
        loader = DataLoader(cmc.dataset(rows), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=cmc.collate, num_workers=args.num_workers,           # cmcaug
                            generator=torch.Generator().manual_seed(args.seed))
        model, patch_encoder = build_model(len(tokenizer))
        optimizer = torch.optim.AdamW([*model.parameters(), *patch_encoder.parameters()], lr=2e-3)
        history, step, epoch = [], 0, 0
        while step < args.steps:
            cmc.set_epoch(epoch)                                                             # cmcaug
            for batch in loader:
                losses = train_step(cmc, model, patch_encoder, batch)
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
        return {"history": history, "stats": stats}


if __name__ == "__main__":
    main()
