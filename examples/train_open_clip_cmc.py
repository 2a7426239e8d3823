"""Cross-modal CutMix with open_clip: its tokenizer and text transformer, trained on shapes-world captions.

    python examples/train_open_clip_cmc.py --steps 40

open_clip's tokenizer (its BPE vocabulary ships in the wheel) tokenizes the captions; cmcaug recovers
each token's character offsets, so grounded words map onto BPE tokens. A small randomly initialised
open_clip `TextTransformer` then reads the CMC view: the spliced embeddings go in where its token
embeddings would (`encode_embeds`, below, is its forward from the token embeddings on). The loss is
VLMixer's contrast between each caption's text view and its CMC view, with in-batch negatives.

Corpus, bank and tags are built here, offline, in a temporary folder (`shapes_world.py`). Lines that use
cmcaug in the training loop are marked `# cmcaug`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cmcaug import CMCTransform
from cmcaug.losses import info_nce
from shapes_world import PatchEncoder, parse_args, shapes_world  # next to this file

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def text_tower(width: int = 64, output_dim: int = 32):
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=77, vocab_size=49408, width=width, heads=2, layers=2, output_dim=output_dim)


def encode_embeds(model, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """open_clip `TextTransformer.forward` from token embeddings on (causal mask, pooled at the end token).

    The end-of-text token is each row's last real token, in the text view and in the CMC view alike.
    """
    length = embeds.shape[1]
    x = embeds.to(model.transformer.get_cast_dtype()) + model.positional_embedding[position_ids]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(x.shape[0], device=x.device), attention_mask.sum(1) - 1]
    return pooled @ model.text_projection


def train_step(cmc: CMCTransform, model, patch_encoder, batch, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE between each caption's text view and its CMC view."""
    text_emb = model.token_embedding(batch.input_ids)                                   # [B, 77, D]
    patch_emb = patch_encoder(batch.patch_pixels(MEAN, STD, torch.float32))              # cmcaug: [M, 1, D]
    view = cmc.splice(text_emb, patch_emb, batch)                                        # cmcaug
    n = int(batch.attention_mask.sum(1).max())  # open_clip pads to 77; causal attention ignores the padding
    positions = torch.arange(n).expand(len(batch), n)
    text_features = encode_embeds(model, text_emb[:, :n], batch.attention_mask[:, :n], positions)
    cmc_features = encode_embeds(model, view.embeds, view.attention_mask, view.position_ids)
    return info_nce(text_features, cmc_features, temperature)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], steps=40)
    import open_clip

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-clip-") as tmp:
        bank, rows = shapes_world(args.workdir or Path(tmp), args.images, args.seed)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        cmc = CMCTransform(bank, tokenizer, ratio=args.ratio, seed=args.seed)                 # cmcaug
        loader = DataLoader(cmc.dataset(rows), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=cmc.collate, num_workers=args.num_workers,           # cmcaug
                            generator=torch.Generator().manual_seed(args.seed))
        model, patch_encoder = text_tower(), PatchEncoder(64)
        optimizer = torch.optim.AdamW([*model.parameters(), *patch_encoder.parameters()], lr=2e-3)
        history, step, epoch = [], 0, 0
        while step < args.steps:
            cmc.set_epoch(epoch)                                                             # cmcaug
            for batch in loader:
                loss = train_step(cmc, model, patch_encoder, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(round(loss.item(), 4))
                step += 1
                if step % 10 == 0 or step == args.steps:
                    print(f"step {step:4d}  contrastive {history[-1]:.3f}")
                if step == args.steps:
                    break
            epoch += 1
        stats = cmc.stats.as_dict()                                                          # cmcaug
        print(f"replaced {stats['spans_replaced']} of {stats['spans']} grounded words in {stats['captions']} captions")
        return {"history": history, "stats": stats}


if __name__ == "__main__":
    main()
