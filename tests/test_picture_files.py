"""Picture files and text in pictures: every renderer writes the format its path's extension names (the
bytes' magic numbers, the same pixels in PNG, lossless WebP and an HTML page's inlined PNG), refuses any
other extension before writing anything, and draws accented Latin, Greek and Cyrillic as letters, not as
the font's missing-glyph box. CMC view files are tested in test_views.py, `cmcaug preview -o` in
test_cli_preview.py."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from png_helpers import file_format, picture

from cmcaug.errors import InputError
from cmcaug.viz import _sheets
from cmcaug.viz._picture_files import PICTURE_FORMATS
from cmcaug.viz._sheets import LABEL_HEIGHT, PAD, load_font
from cmcaug.viz.mixes import preview_timix, render_mix
from cmcaug.viz.patch_grids import render_patch_grid

NOT_A_CHARACTER = "\U0010fffd"  # a private-use code point no font maps: always drawn as the missing-glyph box
ACCEPTED = ".png, .jpg, .jpeg, .webp, .html, .htm"


def patches(n: int = 3, side: int = 16) -> np.ndarray:
    """Patches in clearly different flat colours, with a black corner each."""
    colours = np.array([[200, 40, 40], [40, 160, 60], [50, 70, 210], [230, 200, 30]], np.uint8)[np.arange(n) % 4]
    out = np.broadcast_to(colours[:, None, None, :], (n, side, side, 3)).copy()
    out[:, :4, :4] = 0
    return out


def grid(path: Path) -> Path:
    return render_patch_grid(patches(), ["one", "two", "three"], path, columns=2)


def mix(path: Path) -> Path:
    from cmcaug.timix import text_aware_mix

    images = torch.from_numpy(patches(4, 32)).permute(0, 3, 1, 2).contiguous()
    result = text_aware_mix(images, torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(0)), patch_size=8,
                            window=2)
    return render_mix(images, result, path, heading="four flat images")


RENDERERS: dict[str, Callable[[Path], Path]] = {"grid": grid, "mix": mix}


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
@pytest.mark.parametrize("suffix", [".png", ".PNG", ".jpg", ".jpeg", ".JPG", ".webp", ".html", ".htm"])
def test_renderers_write_the_format_the_extension_names(tmp_path: Path, renderer: str, suffix: str) -> None:
    render = RENDERERS[renderer]
    reference = picture(render(tmp_path / "reference.png"))
    path = render(tmp_path / "sub" / f"picture{suffix}")
    assert path == tmp_path / "sub" / f"picture{suffix}"
    assert file_format(path) == PICTURE_FORMATS[suffix.lower()]
    pixels = picture(path)
    assert pixels.shape == reference.shape
    if suffix.lower() in (".jpg", ".jpeg"):  # lossy, but the same picture
        assert np.abs(pixels.astype(int) - reference).mean() < 3
    else:  # PNG, lossless WebP, or the page's inlined PNG: the very pixels
        assert np.array_equal(pixels, reference)


def test_html_page_of_a_picture_is_well_formed_and_titled(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    page = ET.parse(mix(tmp_path / "mix.html")).getroot()
    assert page.find("head/title").text == "four flat images"
    image = page.find("body/img")
    assert image.get("alt") == "four flat images"
    assert (int(image.get("height")), int(image.get("width"))) == picture(tmp_path / "mix.html").shape[:2]


@pytest.mark.parametrize("name", ["picture", "picture.txt", "picture.gif", "picture.pdf", "picture.png.bak",
                                  "picture.html.gz"])
def test_other_extensions_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    for render in RENDERERS.values():
        with pytest.raises(InputError, match=f"end the file name in one of {ACCEPTED}$") as error:
            render(tmp_path / "out" / name)
        assert str(tmp_path / "out" / name) in str(error.value)
    with pytest.raises(InputError, match="end the file name in one of"):  # refused before anything is mixed
        preview_timix([], [], tmp_path / "out" / name)
    assert not (tmp_path / "out").exists()


def test_tile_sizes_below_one_are_refused(tmp_path: Path) -> None:
    for size in (0, -5):
        with pytest.raises(InputError, match="tile_size must be at least 1"):
            render_patch_grid(patches(), None, tmp_path / "grid.png", tile_size=size)


# -- text: letters, not boxes ------------------------------------------------------------------------
def label_strip(path: Path) -> np.ndarray:
    """The label under the first tile of a one-tile grid."""
    return picture(path)[PAD + 16 : PAD + 16 + LABEL_HEIGHT, PAD : PAD + 16]


@pytest.mark.parametrize("letter", ["ó", "ñ", "ç", "Ω", "λ", "Ж", "я", "ё"])
def test_labels_draw_non_ascii_letters_not_the_missing_glyph_box(tmp_path: Path, letter: str) -> None:
    font = load_font(_sheets.LABEL_FONT_SIZE)
    box = bytes(font.getmask(NOT_A_CHARACTER))
    assert bytes(font.getmask(letter)) != box, f"the font has no glyph for {letter!r}"
    drawn = label_strip(render_patch_grid(patches(1), [letter], tmp_path / "letter.png"))
    missing = label_strip(render_patch_grid(patches(1), [NOT_A_CHARACTER], tmp_path / "box.png"))
    assert (drawn.min(axis=-1) < 128).any() and not np.array_equal(drawn, missing)


def test_captions_in_spanish_greek_and_russian_draw_as_words(tmp_path: Path) -> None:
    """Each word differs from the same word with its non-ASCII letters swapped for the missing-glyph box."""
    for word in ("marrón", "σκύλος", "собака"):
        boxed = "".join(c if c.isascii() else NOT_A_CHARACTER for c in word)
        sheets = [picture(render_patch_grid(patches(1, 64), [text], tmp_path / f"{k}.png")) for k, text in
                  enumerate((word, boxed))]
        assert not np.array_equal(*sheets), word


def test_the_font_is_matplotlibs_dejavu_sans_and_pillows_default_without_matplotlib(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    font = load_font(12)
    assert font.getname()[0] == "DejaVu Sans"
    assert Path(font.path).resolve() == (Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf").resolve()
    real = importlib.util.find_spec
    monkeypatch.setattr(_sheets.importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else real(name, *args))
    assert load_font(12).getname()[0] != "DejaVu Sans"
    assert file_format(render_patch_grid(patches(1), ["marrón"], tmp_path / "fallback.png")) == "PNG"
