"""Tokenizing with offsets (`cmcaug.text.tokenize`), against real tokenizers built offline.

Tokenizers: a BERT WordPiece tokenizer from a vocabulary written here, a byte-level BPE trained here
(RoBERTa/GPT-2 style, no pad token), CLIP's BPE as an HF fast tokenizer built from the vocabulary that
ships in open_clip's wheel, and open_clip's own `SimpleTokenizer` (offsets recovered from its decoding).
Each word must map, through `align_spans`, to the tokens that spell it.
"""
from __future__ import annotations

import copy
import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.errors import InputError
from cmcaug.text.align import align_spans
from cmcaug.text.tokenize import OpenClipOffsets, tokenize_with_offsets, tokenize_words

CAPTIONS = [
    "Two dogs chase a red frisbee.",
    "A skateboarder rides a skateboard past a hot dog stand!",
    "A teddy-bear on the sofa, 3 cats   and a  TV.",
    "",
]
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "two", "dogs", "dog", "chase", "red", "fris", "##bee", ".",
             "skate", "##board", "##er", "rides", "past", "hot", "stand", "!", "teddy", "-", "bear", "on", "the", "sofa",
             ",", "3", "cat", "##s", "and", "tv"]


def spans_of(text: str, *words: str) -> list[tuple[int, int]]:
    """Character spans of the first occurrence of each word (case-sensitive)."""
    return [(text.index(w), text.index(w) + len(w)) for w in words]


def takes(cls: type, name: str) -> bool:
    """transformers 5 builds tokenizers from `vocab`/`merges`, 4.x from `vocab_file`/`merges_file`."""
    return name in inspect.signature(cls.__init__).parameters


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(WORDPIECE) + "\n")
    source = {"vocab": str(vocab)} if takes(BertTokenizerFast, "vocab") else {"vocab_file": str(vocab)}
    tok = BertTokenizerFast(**source, do_lower_case=True)
    assert tok.is_fast and len(tok) == len(WORDPIECE)
    return tok


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer(trim_offsets=True)
    raw.train_from_iterator(CAPTIONS * 20 + ["skateboards and frisbees", "hot dogs and teddy bears"], vocab_size=300,
                            min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer)  # no pad token, like GPT-2


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def clip_fast(open_clip_tokenizer, tmp_path_factory):
    """CLIP's BPE as an HF fast tokenizer, from open_clip's bundled vocabulary and merges."""
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    oc = open_clip_tokenizer
    merges = sorted(oc.bpe_ranks, key=oc.bpe_ranks.get)
    if takes(cls, "vocab"):
        source = {"vocab": oc.encoder, "merges": [tuple(m) for m in merges]}
    else:
        folder = tmp_path_factory.mktemp("clip")
        (folder / "vocab.json").write_text(json.dumps(oc.encoder))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        source = {"vocab_file": str(folder / "vocab.json"), "merges_file": str(folder / "merges.txt")}
    tok = cls(**source, bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>",
              pad_token="<end_of_text>")
    assert tok.is_fast
    return tok


def check_alignment(batch, texts, words_per_text, decode) -> None:
    """Every word maps to the tokens that spell it, and nothing else."""
    for b, (text, words) in enumerate(zip(texts, words_per_text)):
        spans = spans_of(text, *words)
        for (start, end), result in zip(spans, align_spans(spans, batch.offsets[b])):
            lo, hi = result
            assert decode(batch.input_ids[b, lo:hi]).replace(" ", "").lower() == text[start:end].lower().replace(" ", "")


def test_bert_wordpiece(bert):
    words = [["dogs", "frisbee"], ["skateboarder", "skateboard", "hot"], ["teddy-bear", "sofa", "cats", "TV"], []]
    batch = tokenize_with_offsets(bert, CAPTIONS)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.offsets.shape[:2]
    assert (batch.offsets[batch.input_ids == bert.cls_token_id] == 0).all()
    check_alignment(batch, CAPTIONS, words, bert.decode)
    skate = align_spans(spans_of(CAPTIONS[1], "skateboarder"), batch.offsets[1])[0]
    assert skate[1] - skate[0] == 3  # skate ##board ##er


def test_special_tokens_are_marked_and_unk_keeps_its_offsets(bert):
    text = "a doggo [MASK] dog"  # [CLS] a [UNK] [MASK] dog [SEP]: "doggo" is no word of the vocabulary
    batch = tokenize_with_offsets(bert, [text, "a"])
    assert batch.input_ids[0].tolist() == [bert.cls_token_id, 5, bert.unk_token_id, bert.mask_token_id, 8, bert.sep_token_id]
    assert batch.special_tokens_mask.tolist() == [[True, False, True, True, False, True], [True, False, True, True, True, True]]
    assert batch.offsets[0].tolist() == [[0, 0], [0, 1], [2, 7], [0, 0], [15, 18], [0, 0]]
    assert align_spans([(2, 7), (8, 14), (15, 18)], batch.offsets[0]) == [(2, 3), None, (4, 5)]  # doggo [MASK] dog


def test_bert_truncation_drops_cut_spans(bert):
    text = CAPTIONS[1]
    batch = tokenize_with_offsets(bert, [text], max_length=6)  # [CLS] a skate ##board ##er [SEP]: "rides" is cut
    assert align_spans(spans_of(text, "skateboarder", "rides"), batch.offsets[0]) == [(2, 5), None]
    assert batch.input_ids[0, -1] == bert.sep_token_id


def test_byte_level_bpe_without_pad_token(byte_bpe):
    assert byte_bpe.pad_token_id is None
    words = [["dogs", "frisbee"], ["skateboarder", "hot dog"], ["teddy-bear", "cats"], []]
    batch = tokenize_with_offsets(byte_bpe, CAPTIONS)
    assert (batch.attention_mask.sum(1) == [len(byte_bpe(t)["input_ids"]) for t in CAPTIONS]).all()
    check_alignment(batch, CAPTIONS, words, lambda ids: byte_bpe.decode(ids))


def test_open_clip_ids_match_the_tokenizer_and_offsets_match_hf_clip(open_clip_tokenizer, clip_fast):
    texts = [*CAPTIONS, "Skateboarder's TRICK 🐶 café, naïve ΣΟΦΙΑ"]
    ours = tokenize_with_offsets(open_clip_tokenizer, texts)
    assert torch.equal(torch.from_numpy(ours.input_ids), open_clip_tokenizer(texts))
    hf = tokenize_with_offsets(clip_fast, texts)
    for b in range(len(texts)):
        n, m = int(ours.attention_mask[b].sum()), int(hf.attention_mask[b].sum())
        assert ours.input_ids[b, :n].tolist() == hf.input_ids[b, :m].tolist()
        assert ours.offsets[b, :n].tolist() == hf.offsets[b, :m].tolist()


def test_open_clip_offsets_survive_cleaning(open_clip_tokenizer):
    """open_clip unescapes HTML, repairs text with ftfy, collapses whitespace and lowercases."""
    text = "Tom &amp; a  CAT\t&lt;3 “quoted” ｄｏｇ e\u0301cole 🐶🐶"
    ids, offsets = open_clip_tokenizer.encode(text), OpenClipOffsets.for_tokenizer(open_clip_tokenizer).encode(text)[1]
    pieces = [text[s:e] for s, e in offsets]
    assert len(ids) == len(offsets)
    assert pieces[:7] == ["Tom", "&amp;", "a", "CAT", "&lt;", "3", "“"]
    assert "ｄｏｇ" in pieces and pieces.count("🐶") == 2 and "e\u0301" in "".join(pieces)
    assert all(0 <= s < e <= len(text) for s, e in offsets) and offsets == sorted(offsets)


def test_open_clip_offsets_split_entities_from_the_words_glued_to_them(open_clip_tokenizer):
    text = "cats&amp;dogs R&amp;B &ampdog caf&eacute;s"
    pieces = [text[s:e] for s, e in OpenClipOffsets.for_tokenizer(open_clip_tokenizer).encode(text)[1]]
    assert pieces[:7] == ["cats", "&amp;", "dogs", "R", "&amp;", "B", "&amp"] and pieces[7] == "dog"


def test_open_clip_truncation_puts_end_token_last(open_clip_tokenizer):
    text = "dog " * 100 + "cat"
    batch = tokenize_with_offsets(open_clip_tokenizer, [text], max_length=10)
    assert torch.equal(torch.from_numpy(batch.input_ids), open_clip_tokenizer([text], context_length=10))
    assert tokenize_with_offsets(open_clip_tokenizer, [text]).input_ids.shape == (1, 77)  # its context length
    assert batch.input_ids[0, -1] == open_clip_tokenizer.eot_token_id and tuple(batch.offsets[0, -1]) == (0, 0)
    assert align_spans([(0, 3), (len(text) - 3, len(text))], batch.offsets[0]) == [(1, 2), None]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["dog", "Cat", "TEDDY", "bear", "&amp;", "&lt;", "3", "!?", "🐶", "猫", "é",
                                 "naïve", "ｄｏｇ", "  ", "\t", "\n", " ", "-", "'s"]), max_size=14))
def test_open_clip_offsets_point_at_the_bytes_of_each_token(open_clip_tokenizer, parts):
    text = " ".join(parts)
    oc = OpenClipOffsets.for_tokenizer(open_clip_tokenizer)
    ids, offsets = oc.encode(text)
    for token_id, (s, e) in zip(ids, offsets):
        assert 0 <= s < e <= len(text)
        assert oc._bytes_of(token_id) in oc._clean(text[s:e]).encode("utf-8")


def whitespace(texts):
    """A callable tokenizer: one token per word, its id the word's length."""
    ids, offsets = [], []
    for text in texts:
        pos, row_ids, row_offsets = 0, [], []
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            row_ids.append(len(word))
            row_offsets.append((start, pos))
        ids.append(row_ids)
        offsets.append(row_offsets)
    return ids, offsets


def test_callable_tokenizer_is_padded():
    batch = tokenize_with_offsets(whitespace, ["a dog", "two red dogs", ""])
    assert batch.input_ids.shape == (3, 3) and batch.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert align_spans([(2, 5)], batch.offsets[0]) == [(1, 2)]
    with pytest.raises(InputError, match="2 ids but 1 offsets"):
        tokenize_with_offsets(lambda texts: ([[1, 2]], [[(0, 1)]]), ["ab"])


def test_callable_tokenizer_is_cut_at_max_length():
    batch = tokenize_with_offsets(whitespace, ["a dog", "two red dogs", "a"], max_length=2)
    assert batch.input_ids.tolist() == [[1, 3], [3, 3], [1, 0]] and batch.offsets[1].tolist() == [[0, 3], [4, 7]]
    assert batch.special_tokens_mask.tolist() == [[False, False], [False, False], [False, True]]  # padding only
    assert align_spans([(8, 12)], batch.offsets[1]) == [None]  # "dogs" was cut
    with pytest.raises(InputError, match="2 ids but 1 offsets"):  # checked before cutting
        tokenize_with_offsets(lambda texts: ([[1, 2]], [[(0, 1)]]), ["ab"], max_length=1)


def test_word_tokenizer_keeps_words_whole_and_punctuation_apart():
    text = "Two dogs' T-shirts, a hot dog!"
    ids, offsets = tokenize_words([text, "", "TWO  dogs'"])
    assert [text[s:e] for s, e in offsets[0]] == ["Two", "dogs", "'", "T-shirts", ",", "a", "hot", "dog", "!"]
    assert ids[1] == offsets[1] == [] and ids[2][:2] == ids[0][:2]  # ids ignore case, offsets the spacing
    assert len(set(ids[0])) == 9 and all(0 <= i < 2**31 for i in ids[0])
    batch = tokenize_with_offsets(tokenize_words, [text])
    assert align_spans([(22, 29), (4, 8)], batch.offsets[0]) == [(6, 8), (1, 2)]  # "hot dog", "dogs"


def test_unusable_tokenizers_are_refused(open_clip_tokenizer):
    class Slow:
        is_fast = False

        def __call__(self, texts):
            return {}

    with pytest.raises(InputError, match="use_fast=True"):
        tokenize_with_offsets(Slow(), ["a dog"])
    with pytest.raises(InputError, match="cannot tokenize"):
        tokenize_with_offsets(42, ["a dog"])
    with pytest.raises(InputError, match=r"texts\[1\] is a int"):
        tokenize_with_offsets(open_clip_tokenizer, ["a dog", 3])
    masked = copy.copy(open_clip_tokenizer)
    masked.reduction_fn = lambda texts, **kwargs: None  # what SimpleTokenizer(reduction_mask=...) sets
    with pytest.raises(InputError, match="reduction_mask"):
        OpenClipOffsets(masked)


def test_a_wrapper_of_an_hf_tokenizer_is_pointed_at_its_inner_tokenizer(bert):
    class Wrapper:  # like open_clip's HFTokenizer: returns a tensor of ids, holds the HF tokenizer
        tokenizer = bert

        def __call__(self, texts):
            return torch.zeros(len(texts), 4)

    with pytest.raises(InputError, match="wraps an HF fast tokenizer: pass its .tokenizer instead"):
        tokenize_with_offsets(Wrapper(), ["a dog"])
