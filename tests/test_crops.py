"""Crop modes (cmcaug.crops): what each mode cuts from an image for a box, exactly; and the picture that shows
them side by side (cmcaug.viz.crops). A bank build with each mode is tested in test_build.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cmcaug.builder.options import CROPS
from cmcaug.crops import CROP_MODES, crop_patch
from cmcaug.errors import InputError
from cmcaug.viz.crops import render_crop_modes

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def scene() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A blue 40 x 60 image with a red 20 x 10 object at (10, 15) and a green neighbour touching its right side."""
    pixels = np.full((40, 60, 3), BLUE, np.uint8)
    pixels[15:25, 10:30] = RED
    pixels[5:35, 30:40] = GREEN
    return pixels, (10, 15, 30, 25)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))


def test_the_modes_are_the_options_choices() -> None:
    assert CROP_MODES == CROPS == ("square", "tight", "pad-mean")
    with pytest.raises(InputError, match="unknown crop mode 'letterbox'; choose one of square, tight, pad-mean"):
        crop_patch(Image.new("RGB", (4, 4)), (0, 0, 2, 2), 8, "letterbox")


def test_square_brings_the_neighbours_in_tight_and_pad_mean_only_the_object() -> None:
    pixels, box = scene()
    image = Image.fromarray(pixels)
    square = crop_patch(image, box, 20)  # the 20 x 20 square (10, 10, 30, 30): blue above and below the object
    assert np.array_equal(square, pixels[10:30, 10:30])
    assert np.array_equal(crop_patch(image, box, 20, "square"), square)  # the default
    tight = crop_patch(image, box, 16, "tight")
    assert np.array_equal(tight, resize(pixels[15:25, 10:30], 16)) and (tight == RED).all()  # stretched, only red
    padded = crop_patch(image, box, 20, "pad-mean")
    assert (padded == RED).all()  # the mean of a red object is red: nothing else enters
    wide = crop_patch(image, (10, 15, 40, 25), 30, "pad-mean")  # red and green: padded with their mean colour
    mean = np.round(pixels[15:25, 10:40].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    assert np.array_equal(wide[10:20], pixels[15:25, 10:40])  # the box, centred, unscaled (30 px into 30 px)
    assert (wide[:10] == mean).all() and (wide[20:] == mean).all()


def test_pad_mean_pads_left_and_right_of_a_tall_box_and_keeps_its_aspect() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    patch = crop_patch(Image.fromarray(pixels), (5, 2, 11, 26), 24, "pad-mean")  # 6 x 24 box, 9 px of padding each side
    assert np.array_equal(patch[:, 9:15], pixels[2:26, 5:11])
    mean = np.round(pixels[2:26, 5:11].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    assert (patch[:, :9] == mean).all() and (patch[:, 15:] == mean).all()


def test_square_centres_a_square_of_the_longer_side_and_antialiases() -> None:
    pixels = np.random.default_rng(1).integers(1, 256, (40, 50, 3), dtype=np.uint8)  # no black pixel: black means padding
    image = Image.fromarray(pixels)
    assert np.array_equal(crop_patch(image, (10, 10, 30, 20), 20), pixels[5:25, 10:30])  # 20 x 10 box -> 20 x 20 square
    edge = crop_patch(image, (40, 0, 50, 4), 10)  # the square (40, -3, 50, 7) sticks out at the top: padded
    assert (edge[:3] == 0).all() and np.array_equal(edge[3:], pixels[0:7, 40:50])
    checkers = np.repeat((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None], 3, axis=2)
    for mode in CROP_MODES:
        small = crop_patch(Image.fromarray(checkers), (0, 0, 32, 32), 8, mode)
        assert np.abs(small.astype(float) - 127.5).max() < 16  # averaged, not aliased to black and white


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 60), st.integers(20, 60), st.floats(-30, 70), st.floats(-30, 70), st.floats(1, 40), st.floats(1, 40),
       st.sampled_from([8, 12, 20]))
def test_square_is_a_centred_square(width, height, x0, y0, w, h, size) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # no black pixel: black means padding
    image = Image.fromarray(pixels)
    patch = crop_patch(image, (x0, y0, x0 + w, y0 + h), size)
    assert patch.shape == (size, size, 3) and patch.dtype == np.uint8
    left, top = int(np.clip(round(x0), 0, width - size)), int(np.clip(round(y0), 0, height - size))
    assert np.array_equal(crop_patch(image, (left, top, left + size, top + size), size), pixels[top:top + size, left:left + size])
    assert (crop_patch(image, (-size, -size, 0.0, 0.0), size)[: size // 2, : size // 2] == 0).all()  # outside: black


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 40), st.floats(0, 40), st.floats(0.2, 20), st.floats(0.2, 20), st.sampled_from([8, 13, 32]),
       st.sampled_from(["tight", "pad-mean"]))
def test_tight_and_pad_mean_hold_only_the_box(x0, y0, w, h, size, mode) -> None:
    """Whatever the box, its edges rounded half up: the patch is made of the box's pixels alone (here one
    colour, in an image of random others), so no neighbour enters."""
    pixels = np.random.default_rng(2).integers(0, 200, (64, 64, 3), dtype=np.uint8)
    left, top = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
    right, bottom = max(left + 1, int(np.floor(x0 + w + 0.5))), max(top + 1, int(np.floor(y0 + h + 0.5)))
    pixels[top:bottom, left:right] = (250, 120, 7)
    patch = crop_patch(Image.fromarray(pixels), (x0, y0, x0 + w, y0 + h), size, mode)
    assert patch.shape == (size, size, 3) and patch.dtype == np.uint8 and (patch == (250, 120, 7)).all()


def test_the_picture_has_a_row_per_box_and_a_tile_per_mode(tmp_path: Path) -> None:
    pixels, box = scene()
    boxes = [np.array([box, (30, 5, 40, 35)], np.float32), np.zeros((0, 4), np.float32), np.array([[0, 0, 60, 40]])]
    path = render_crop_modes([pixels, pixels, pixels], boxes, tmp_path / "crops.png", names=["a", "b", "c"], tile_size=40)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 4 * 40
        three = picture.height
    one = render_crop_modes([pixels], [boxes[0]], tmp_path / "one.png", tile_size=40, max_rows=1)
    with Image.open(one) as picture:
        assert 0 < picture.height < three - 80  # two rows fewer
    for images, found, names, message in [([pixels], [], None, "one box list"), ([pixels], [boxes[1]], None, "at least one box"),
                                          ([pixels], [boxes[0]], ["a", "b"], "one box list"),
                                          ([pixels[..., 0]], [boxes[0]], None, r"RGB uint8 \[H, W, 3\]")]:
        with pytest.raises(InputError, match=message):
            render_crop_modes(images, found, tmp_path / "bad.png", names=names)
    with pytest.raises(InputError, match="extension"):
        render_crop_modes([pixels], [boxes[0]], tmp_path / "crops.gif")
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "crops.gif").exists()
