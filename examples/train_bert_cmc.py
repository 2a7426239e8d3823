"""Cross-modal CutMix with Hugging Face BERT: a tiny model pre-trained on unpaired shapes-world text, on the CPU.

    python examples/train_bert_cmc.py --steps 60

Everything is built here, offline, in a temporary folder: a shapes-world corpus, its patch bank and its
captions' grounding tags (`shapes_world.py`), and a WordPiece tokenizer over the captions' words. Then
VLMixer's objective on unpaired text (`cmcaug.vlmixer.VLMixerObjective`): each caption's grounded words are
swapped for bank patches (the CMC view); the model learns masked language modelling on the CMC view, where
a patch slot predicts the word it replaced (`--patch-targets`), and a contrast that pulls each caption's
text view towards its CMC view and away from the same view with other concepts' patches (`--negatives`).

Then a test only cross-modal alignment can pass (`vlmixer_eval.zero_shot_accuracy`): the patches of a
held-out shapes world (another seed, `--eval-images` images never seen in training) are classified by the
concept name whose text embedding is nearest. Training never pairs an image with its caption (patches are
drawn from the bank by concept). `replicate_vlmixer.py` runs the ablations over several seeds.

The lines that use cmcaug in the training loop are marked `# cmcaug`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cmcaug import CMCTransform
from cmcaug.mlm import DEFAULT_PATCH_TARGETS, PATCH_TARGETS
from cmcaug.vlmixer import VLMixerObjective
from shapes_world import PatchEncoder, argument_parser, shapes_world  # next to this file
from vlmixer_eval import zero_shot_accuracy

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


def build_model(vocab_size: int, dim: int = 64, dropout: float = 0.1):
    """A two-layer BERT for masked LM (token types: 0 words, 1 patches) and the patch encoder beside it."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=MAX_LENGTH, type_vocab_size=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config), PatchEncoder(dim)


def add_recipe_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The objective's choices as options (defaults: the library's recipe)."""
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1, help="of the text-view / CMC-view contrast")
    parser.add_argument("--patch-targets", choices=PATCH_TARGETS, default=DEFAULT_PATCH_TARGETS,
                        help="what a patch slot predicts in MLM (cmcaug.mlm.patch_targets)")
    parser.add_argument("--negatives", type=int, default=1, help="hard patch negatives per CMC view (0: none)")
    parser.add_argument("--contrast-dropout", action="store_true", help="keep dropout on in the contrast passes")
    parser.add_argument("--dropout", type=float, default=0.1, help="the model's dropout")
    return parser


def pretrain(args: argparse.Namespace, bank, rows: list[dict], log_every: int = 10):
    """VLMixer pre-training on `rows` against `bank`: the trained objective and the loss history."""
    torch.manual_seed(args.seed)
    tokenizer = wordpiece_tokenizer([r["caption"] for r in rows])
    cmc = CMCTransform(bank, tokenizer, ratio=args.ratio, max_length=MAX_LENGTH, seed=args.seed,   # cmcaug
                       negatives=args.negatives)
    loader = DataLoader(cmc.dataset(rows), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=cmc.collate, num_workers=args.num_workers,                   # cmcaug
                        generator=torch.Generator().manual_seed(args.seed))
    model, patch_encoder = build_model(len(tokenizer), dropout=args.dropout)
    objective = VLMixerObjective(cmc, model, patch_encoder, mean=MEAN, std=STD,                 # cmcaug
                                 patch_targets=args.patch_targets, temperature=args.temperature,
                                 contrast_dropout=args.contrast_dropout)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=args.lr)
    history, step, epoch = [], 0, 0
    while step < args.steps:
        cmc.set_epoch(epoch)                                                                     # cmcaug
        for batch in loader:
            losses = objective(batch)                                                            # cmcaug
            optimizer.zero_grad(set_to_none=True)
            losses.loss.backward()
            optimizer.step()
            history.append({k: round(v, 4) for k, v in losses.as_dict().items()})
            step += 1
            if log_every and (step % log_every == 0 or step == args.steps):
                print(f"step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
            if step == args.steps:
                break
        epoch += 1
    return objective, history


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = add_recipe_options(argument_parser(__doc__.splitlines()[0], steps=60))
    parser.add_argument("--eval-images", type=int, default=120,
                        help="images of the held-out corpus for zero_shot_accuracy (0: no evaluation)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out corpus; not --seed")
    args = parser.parse_args(argv)
    if args.eval_images and args.eval_seed == args.seed:
        parser.error(f"--eval-seed must differ from --seed ({args.seed}): the held-out corpus would be the training corpus")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cmcaug-bert-") as tmp:
        root = args.workdir or Path(tmp)
        bank, rows = shapes_world(root, args.images, args.seed, args.context)
        objective, history = pretrain(args, bank, rows)
        stats = objective.cmc.stats.as_dict()                                                    # cmcaug
        print(f"replaced {stats['spans_replaced']} of {stats['spans']} grounded words in {stats['captions']} captions")
        result = {"history": history, "stats": stats}
        if args.eval_images:
            heldout, _ = shapes_world(root / "heldout", args.eval_images, args.eval_seed, args.context)
            result["zero_shot"] = zero_shot = zero_shot_accuracy(objective, heldout)
            print(f"zero-shot accuracy on {zero_shot['patches']} held-out patches: {zero_shot['accuracy']:.3f} "
                  f"(chance {zero_shot['chance']:.3f})")
        return result


if __name__ == "__main__":
    main()
