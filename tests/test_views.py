"""CMC view pages on a shapes-world bank: one inlined patch per replaced word, exactly the replaced words
marked, the view's tokens in order; the picture variants (the format the extension names, others refused,
non-ASCII letters drawn as letters), open_clip tokens, bad options, captions read lazily, and
`cmcaug preview --captions` (tagging captions, or reading a tag-text file; missing or empty files)."""
from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from png_helpers import file_format, picture, read
from transform_helpers import token_runs

from cmcaug.bank.reader import PatchBank
from cmcaug.cli.main import main
from cmcaug.errors import InputError
from cmcaug.text.tokenize import tokenize_words


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchBank, Path, list[dict]]:
    """A shapes-world corpus, its bank (built from the COCO boxes) and its captions as tag rows."""
    from cmcaug.builder.pipeline import build_bank
    from cmcaug.synth import make_corpus
    from cmcaug.text.grounding import GroundingTagger

    root = tmp_path_factory.mktemp("world")
    corpus = make_corpus(root / "corpus", 12, seed=0, image_size=64)
    build_bank(corpus.images_dir, root / "bank", annotations=corpus.annotations, vocab=corpus.vocab, patch_size=16,
               min_box=4, progress=False)
    bank = PatchBank.open(root / "bank")
    captions = [json.loads(line)["caption"] for line in corpus.captions.open()]
    tagged = GroundingTagger(bank.vocab, mode="lookup").tag(captions)
    rows = [{"caption": c, "spans": [s._asdict() for s in spans], "index": i} for i, (c, spans) in enumerate(zip(captions, tagged))]
    return bank, corpus.captions, rows


def collate(bank: PatchBank, rows: list[dict], **options):
    from cmcaug.transform import CMCTransform

    return CMCTransform(bank, tokenize_words, **{"ratio": 0.6, **options}).collate(rows)


def sections(path: Path) -> list[ET.Element]:
    """The page's caption sections; parsing it as XML proves it well-formed."""
    page = ET.parse(path).getroot()
    assert page.tag == "html" and page.find("head/title") is not None
    return page.findall("body/section")


def text_of(element: ET.Element) -> str:
    return "".join(element.itertext())


def replaced_runs(batch, b: int, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Characters under each run of replaced tokens of row b (from replaced_mask and the token offsets)."""
    return [(offsets[j][0], offsets[k - 1][1]) for j, k in token_runs(batch.replaced_mask[b].tolist())]


def marked(section: ET.Element, kind: str) -> list[str]:
    """Texts of the caption's marks: "replaced" (<mark>) or "grounded" (kept as text)."""
    return [text_of(e) for e in section.find("p").iter() if e.get("class") == kind]


@pytest.mark.parametrize("patch_tokens", [1, 2])
def test_cmc_view_page_marks_the_replaced_words_and_inlines_their_patches(world, tmp_path: Path, patch_tokens: int) -> None:
    from cmcaug.viz.cmc_views import render_cmc_views

    bank, _, rows = world
    batch = collate(bank, rows, patch_tokens=patch_tokens)
    assert 0 < batch.num_patches < sum(len(r["spans"]) for r in rows)  # some grounded words stay text
    path = render_cmc_views(batch, tmp_path / "views.html", tokenizer=tokenize_words, vocab=bank.vocab,
                            grounded=[r["spans"] for r in rows], title="shapes <world>")
    found = sections(path)
    assert len(found) == len(rows)
    _, offsets = tokenize_words(batch.captions)
    slot = 0
    for b, section in enumerate(found):
        caption = section.find("p[@class='caption']")
        assert text_of(caption) == batch.captions[b]
        runs = replaced_runs(batch, b, offsets[b])
        assert marked(section, "replaced") == [batch.captions[b][s:e] for s, e in runs]
        kept = [batch.captions[b][s["start"] : s["end"]] for s in rows[b]["spans"]
                if not any(s["start"] < e and start < s["end"] for start, e in runs)]
        assert marked(section, "grounded") == kept
        images = list(section.iter("img"))
        assert len(images) == int(batch.plan.slots_per_row[b])
        for image, figure in zip(images, section.iter("figcaption")):
            head, data = image.get("src").split(",", 1)
            assert head == "data:image/png;base64"
            assert np.array_equal(read_png(base64.b64decode(data)), batch.pixels[slot].numpy())
            assert figure.text == image.get("alt") == bank.vocab.name(int(batch.concept_ids[slot]))
            slot += 1
        # The view reads as the caption with each replaced run swapped for its concept names.
        view = [text_of(cell) for cell in section.find("div[@class='view']")]
        expected, j, mask = [], 0, batch.replaced_mask[b].tolist()
        names = iter(bank.vocab.name(int(c)) for c in batch.concept_ids[slot - len(images) : slot])
        while j < len(offsets[b]):
            if mask[j]:
                while j < len(mask) and mask[j]:
                    j += 1
                expected.append(next(names))
            else:
                expected.append(batch.captions[b][offsets[b][j][0] : offsets[b][j][1]])
                j += 1
        assert view == expected
    assert slot == batch.num_patches


def read_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_cmc_view_without_tokenizer_shows_ids_and_the_png_variant(world, tmp_path: Path) -> None:
    from cmcaug.viz.cmc_views import render_cmc_views

    bank, _, rows = world
    batch = collate(bank, rows, ratio=1.0)
    found = sections(render_cmc_views(batch, tmp_path / "ids.html", max_rows=3))
    assert len(found) == 3 and not any(s.find("p/mark") is not None for s in found)
    tokens = [cell.text for cell in found[0].find("div") if cell.tag == "span"]
    assert tokens and all(t.startswith("#") for t in tokens)
    assert len(list(found[0].iter("img"))) == int(batch.plan.slots_per_row[0])
    png = read(render_cmc_views(batch, tmp_path / "views.png", tokenizer=None, max_rows=2))
    assert png.shape[1] >= 720 and png.shape[0] > 2 * 48


def test_cmc_view_with_open_clip_tokens(world, tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    from cmcaug.text.tokenize import tokenize_with_offsets
    from cmcaug.transform import CMCTransform
    from cmcaug.viz.cmc_views import render_cmc_views

    bank, _, rows = world
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    batch = CMCTransform(bank, tokenizer, ratio=0.6).collate(rows[:4])
    found = sections(render_cmc_views(batch, tmp_path / "clip.html", tokenizer=tokenizer, vocab=bank.vocab))
    offsets = tokenize_with_offsets(tokenizer, batch.captions).offsets
    for b, section in enumerate(found):
        runs = replaced_runs(batch, b, offsets[b].tolist())
        assert marked(section, "replaced") == [batch.captions[b][s:e] for s, e in runs]
        specials = [cell.text for cell in section.find("div") if "special" in (cell.get("class") or "")]
        assert specials == ["<start_of_text>", "<end_of_text>"]


def test_cmc_view_refuses_another_tokenizer_and_bad_options(world, tmp_path: Path) -> None:
    from cmcaug.viz.cmc_views import preview_captions, render_cmc_views

    bank, _, rows = world
    batch = collate(bank, rows)
    with pytest.raises(InputError, match="other token ids"):
        render_cmc_views(batch, tmp_path / "x.html", tokenizer=lambda texts: ([[1] * len(t.split()) for t in texts],
                                                                                [[(0, 1)] * len(t.split()) for t in texts]))
    with pytest.raises(InputError, match="max_rows"):
        render_cmc_views(batch, tmp_path / "x.html", max_rows=0)
    with pytest.raises(InputError, match="tokenizer must be"):
        preview_captions(bank, rows, tmp_path / "x.html", tokenizer="bert")
    with pytest.raises(InputError, match="at least one caption"):
        preview_captions(bank, [], tmp_path / "x.html")


def test_preview_captions_reads_only_the_rows_it_shows(world, tmp_path: Path) -> None:
    from cmcaug.viz.cmc_views import preview_captions

    bank, _, rows = world

    def lazy():  # a long file read lazily: nothing past the first rows may be asked for
        yield from rows[:3]
        raise AssertionError("read past the rows shown")

    stats = preview_captions(bank, lazy(), tmp_path / "x.html", rows=3, mode="lookup")
    assert len(sections(Path(stats["output"]))) == 3


def test_preview_cli_renders_cmc_views_of_caption_files(world, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cmcaug.text.grounding import GroundingTagger
    from cmcaug.text.tags import tag_corpus

    bank, captions, rows = world
    out = tmp_path / "views.html"
    args = ["preview", str(bank.path), "--captions", str(captions), "-o", str(out), "--rows", "5", "--ratio", "1"]
    assert main([*args, "--mode", "lookup", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    found = sections(out)
    assert [text_of(s.find("p")) for s in found] == [r["caption"] for r in rows[:5]]
    replaced = sum(len(list(s.iter("img"))) for s in found)
    assert replaced > 0 and f"spans_replaced: {replaced}" in printed
    tags = tmp_path / "tags.parquet"  # tag-text output: its spans are used as they are, no tagging
    tag_corpus([captions], tags, GroundingTagger(bank.vocab, mode="lookup"), progress=False)
    assert main(["preview", str(bank.path), "--captions", str(tags), "-o", str(tmp_path / "tags.html"), "--rows", "5",
                 "--ratio", "1", "--seed", "3"]) == 0
    assert (tmp_path / "tags.html").read_bytes() == out.read_bytes()  # same spans, same keys: the same views
    assert main([*args[:5], str(tmp_path / "views.png"), "--rows", "2", "--mode", "lookup"]) == 0
    assert read(tmp_path / "views.png").shape[1] >= 720
    (tmp_path / "empty.txt").write_text("")
    for bad, message in ((tmp_path / "none.txt", "no such captions file"), (tmp_path / "empty.txt", "holds no captions")):
        assert main(["preview", str(bank.path), "--captions", str(bad), "-o", str(out)]) == 3
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".WEBP", ".html", ".htm", ".HTM"])
def test_cmc_view_format_follows_the_extension(world, tmp_path: Path, suffix: str) -> None:
    from cmcaug.viz._picture_files import PICTURE_FORMATS
    from cmcaug.viz.cmc_views import render_cmc_views

    bank, _, rows = world
    batch = collate(bank, rows[:3], ratio=1.0)
    path = render_cmc_views(batch, tmp_path / f"views{suffix}", tokenizer=tokenize_words, vocab=bank.vocab)
    assert file_format(path) == PICTURE_FORMATS[suffix.lower()]
    if file_format(path) == "HTML":  # the page of views, its patches inline
        assert len(sections(path)) == 3
    else:
        reference = read(render_cmc_views(batch, tmp_path / "views.png", tokenizer=tokenize_words, vocab=bank.vocab))
        assert picture(path).shape == reference.shape


def test_cmc_views_refuse_other_extensions_before_tagging(world, tmp_path: Path) -> None:
    from cmcaug.viz.cmc_views import preview_captions, render_cmc_views

    bank, _, rows = world

    def untouched():  # the captions are not read when the path is refused
        raise AssertionError("read the captions")
        yield

    for name in ("views.txt", "views", "views.svg"):
        with pytest.raises(InputError, match="end the file name in one of .png, .jpg, .jpeg, .webp, .html, .htm"):
            render_cmc_views(collate(bank, rows[:2]), tmp_path / name)
        with pytest.raises(InputError, match="end the file name in one of"):
            preview_captions(bank, untouched(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_cmc_view_picture_draws_accented_greek_and_cyrillic_letters(world, tmp_path: Path) -> None:
    """A caption's non-ASCII letters draw as letters: the picture differs from the one of the same caption with
    them swapped for a code point no font has (the missing-glyph box)."""
    from cmcaug.viz.cmc_views import render_cmc_views

    bank, _, _ = world
    caption = "un perro marrón, ένας σκύλος, собака"
    boxed = "".join(c if c.isascii() else "\U0010fffd" for c in caption)
    drawn = [read(render_cmc_views(collate(bank, [{"caption": text, "spans": []}]), tmp_path / f"{k}.png",
                                   tokenizer=tokenize_words)) for k, text in enumerate((caption, boxed))]
    assert drawn[0].shape == drawn[1].shape and not np.array_equal(*drawn)
