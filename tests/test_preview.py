"""Patch grids and bank previews: layout, exact tile contents, labels, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from cmcaug.bank import PatchBank
from cmcaug.bank_writer import write_bank
from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.preview import _LABEL_HEIGHT, _PAD, preview_bank, render_patch_grid


def coded_patches(n: int, side: int) -> np.ndarray:
    """Patches of one flat colour each; the colour encodes the patch number."""
    codes = np.arange(n)
    colors = np.stack([(codes * 37) % 256, codes % 256, 255 - codes % 256], axis=1).astype(np.uint8)
    return np.broadcast_to(colors[:, None, None, :], (n, side, side, 3)).copy()


def tile_origin(row: int, column: int, side: int, labelled: bool) -> tuple[int, int]:
    """(x, y) of a tile's top-left pixel in a sheet without a title column."""
    return _PAD + column * (side + _PAD), _PAD + row * (side + _PAD + (_LABEL_HEIGHT if labelled else 0))


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize(("n", "columns"), [(1, 8), (10, 4), (7, 7), (9, 1)])
def test_grid_places_every_patch(tmp_path: Path, n: int, columns: int, labelled: bool) -> None:
    side = 16
    patches = coded_patches(n, side)
    labels = [f"patch {i}" for i in range(n)] if labelled else None
    sheet = read(render_patch_grid(patches, labels, tmp_path / "grid.png", columns=columns))
    rows, cols = -(-n // columns), min(n, columns)
    x_end, y_end = tile_origin(rows, cols, side, labelled)
    assert sheet.shape == (y_end, x_end, 3)
    for i in range(n):
        x, y = tile_origin(i // columns, i % columns, side, labelled)
        assert (sheet[y : y + side, x : x + side] == patches[i]).all()
        below = sheet[y + side : y + side + (_LABEL_HEIGHT if labelled else _PAD), x : x + side]
        assert (below.min(axis=-1) < 100).any() == labelled  # ink of the label, or blank padding


def test_grid_accepts_tensors_and_rescales(tmp_path: Path) -> None:
    patches = torch.from_numpy(coded_patches(3, 8))
    patches[:, 0, 0] = 0  # a marker pixel, drawn as a 3x3 block at triple size
    sheet = read(render_patch_grid(patches, None, tmp_path / "grid.png", tile_size=24))
    x, y = tile_origin(0, 2, 24, False)
    assert (sheet[y : y + 3, x : x + 3] == 0).all()
    assert (sheet[y + 3 : y + 24, x + 3 : x + 24] == patches[2, 1, 1].numpy()).all()


def test_grid_shortens_long_labels(tmp_path: Path) -> None:
    sheet = read(render_patch_grid(coded_patches(2, 16), ["x" * 200, "y"], tmp_path / "grid.png", columns=1))
    assert sheet.shape[1] == 16 + 2 * _PAD


def test_grid_creates_parent_folders(tmp_path: Path) -> None:
    path = render_patch_grid(coded_patches(1, 4), None, tmp_path / "a" / "b" / "grid.png")
    assert path == tmp_path / "a" / "b" / "grid.png" and path.is_file()


@pytest.mark.parametrize(
    ("pixels", "labels", "columns", "match"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), None, 4, "uint8"),
        (np.zeros((2, 8, 8), np.uint8), None, 4, "uint8"),
        (np.zeros((2, 8, 6, 3), np.uint8), None, 4, "uint8"),
        (np.zeros((0, 8, 8, 3), np.uint8), None, 4, "at least one"),
        (np.zeros((2, 8, 8, 3), np.uint8), ["one"], 4, "labels"),
        (np.zeros((2, 8, 8, 3), np.uint8), None, 0, "columns"),
    ],
)
def test_grid_rejects_bad_input(tmp_path: Path, pixels: np.ndarray, labels: list[str] | None, columns: int, match: str) -> None:
    with pytest.raises(InputError, match=match):
        render_patch_grid(pixels, labels, tmp_path / "grid.png", columns=columns)


# -- bank previews -----------------------------------------------------------------------------
COUNTS = {"circle": 5, "star": 12, "heart": 0}
SIDE = 16


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank written with the real writer: 5 circles, 12 stars, no hearts; patch colour = input row."""
    vocab = ConceptVocab({name: [] for name in COUNTS})
    concept_ids = np.repeat(np.arange(len(COUNTS), dtype=np.int32), list(COUNTS.values()))
    n = len(concept_ids)
    patches = pa.table({
        "concept_id": pa.array(concept_ids, pa.int32()),
        "image": pa.array([f"images/{i:03d}.png" for i in range(n)]),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(np.tile([0, 0, 8, 8], n).astype(np.float32)), 4),
        "score": pa.array(np.ones(n, np.float32)),
    })
    embeddings = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("bank") / "bank"
    write_bank(path, vocab=vocab, patches=patches, pixels=coded_patches(n, SIDE), embeddings=embeddings, provenance={}, stats={})
    return path


@pytest.fixture(scope="module")
def bank(bank_path: Path) -> PatchBank:
    return PatchBank.open(bank_path)


def row_tiles(sheet: np.ndarray, row: int) -> list[int]:
    """Patch numbers (input rows) of the tiles drawn in one preview row, read left to right from
    their colours along the row's middle line."""
    codes = {tuple(c): i for i, c in enumerate(coded_patches(sum(COUNTS.values()), 1)[:, 0, 0])}
    _, y = tile_origin(row, 0, SIDE, True)
    line = [codes.get(tuple(int(v) for v in pixel)) for pixel in sheet[y + SIDE // 2]]
    return [code for k, code in enumerate(line) if code is not None and (k == 0 or line[k - 1] != code)]


def test_preview_bank_rows_hold_distinct_patches_of_their_concept(bank: PatchBank, tmp_path: Path) -> None:
    sheet = read(preview_bank(bank, tmp_path / "bank.png", per_concept=4, seed=1))
    assert sheet.shape[0] == 2 * (SIDE + _PAD + _LABEL_HEIGHT) + _PAD  # circle and star; heart has none
    circles, stars = (row_tiles(sheet, r) for r in range(2))
    assert len(circles) == len(set(circles)) == 4 and set(circles) <= set(range(5))
    assert len(stars) == len(set(stars)) == 4 and set(stars) <= set(range(5, 17))


def test_preview_bank_shows_all_patches_of_small_concepts_and_empty_rows(bank: PatchBank, tmp_path: Path) -> None:
    sheet = read(preview_bank(bank, tmp_path / "bank.png", concepts=["heart", "circle"], per_concept=8))
    assert sheet.shape[0] == 2 * (SIDE + _PAD + _LABEL_HEIGHT) + _PAD
    assert row_tiles(sheet, 0) == []
    assert sorted(row_tiles(sheet, 1)) == list(range(5))
    only_empty = read(preview_bank(bank, tmp_path / "empty.png", concepts=[2]))
    assert only_empty.shape[0] == SIDE + 2 * _PAD and row_tiles(only_empty, 0) == []


def test_preview_bank_is_deterministic_for_a_seed(bank: PatchBank, tmp_path: Path) -> None:
    first = preview_bank(bank, tmp_path / "a.png", seed=3).read_bytes()
    assert preview_bank(bank, tmp_path / "b.png", seed=3).read_bytes() == first
    assert preview_bank(bank, tmp_path / "c.png", seed=4).read_bytes() != first


@pytest.mark.parametrize(("concepts", "per_concept", "match"), [(["dragon"], 8, "unknown concept"), ([3], 8, "out of range"), (None, 0, "per_concept")])
def test_preview_bank_rejects_bad_arguments(bank: PatchBank, tmp_path: Path, concepts: list | None, per_concept: int, match: str) -> None:
    with pytest.raises(InputError, match=match):
        preview_bank(bank, tmp_path / "x.png", concepts=concepts, per_concept=per_concept)


def test_preview_cli(bank_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert main(["preview", str(bank_path), "-o", str(out), "--concepts", "star", "--per-concept", "3"]) == 0
    sheet = read(out)
    assert len(row_tiles(sheet, 0)) == 3
    assert str(out) in capsys.readouterr().out
