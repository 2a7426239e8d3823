"""Cross-modal CutMix with open_clip: its tokenizer and text transformer, trained on shapes-world captions.

    python examples/train_open_clip_cmc.py --steps 40

open_clip's tokenizer (its BPE vocabulary ships in the wheel) tokenizes the captions; cmcaug recovers
each token's character offsets, so grounded words map onto BPE tokens. A small randomly initialised
open_clip `TextTransformer` then reads the CMC view through `cmcaug.vlmixer.VLMixerObjective` (its
`OpenCLIPTextEncoder` feeds the spliced embeddings in where the token embeddings would go, causal
attention, pooled at the end token). The loss is VLMixer's contrast between each caption's text view and
its CMC view, with in-batch and hard patch negatives. open_clip's tower has no MLM head, so the MLM term
is off here (`mlm_weight=0`); pass `mlm_head=nn.Linear(width, vocab_size)` and a `mask_token_id` to add it.

Corpus, bank and tags are built here, offline, in a temporary folder (`shapes_world.py`). Lines that use
cmcaug in the training loop are marked `# cmcaug`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cmcaug import CMCTransform
from cmcaug.vlmixer import VLMixerObjective
from shapes_world import PatchEncoder, parse_args, shapes_world  # next to this file

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def text_tower(width: int = 64, output_dim: int = 32):
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=77, vocab_size=49408, width=width, heads=2, layers=2, output_dim=output_dim)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], steps=40)
    import open_clip

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-clip-") as tmp:
        bank, rows = shapes_world(args.workdir or Path(tmp), args.images, args.seed, args.context)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        cmc = CMCTransform(bank, tokenizer, ratio=args.ratio, seed=args.seed, negatives=1)    # cmcaug
        loader = DataLoader(cmc.dataset(rows), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=cmc.collate, num_workers=args.num_workers,           # cmcaug
                            generator=torch.Generator().manual_seed(args.seed))
        objective = VLMixerObjective(cmc, text_tower(), PatchEncoder(64), mean=MEAN, std=STD,    # cmcaug
                                     mlm_weight=0.0)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
        history, step, epoch = [], 0, 0
        while step < args.steps:
            cmc.set_epoch(epoch)                                                             # cmcaug
            for batch in loader:
                loss = objective(batch).loss                                                 # cmcaug
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
