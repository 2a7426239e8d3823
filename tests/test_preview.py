"""Pictures: patch grids and bank previews (cmcaug.viz.patch_grids: layout, exact tile contents, labels, bad input) and
TiMix mix sheets (cmcaug.viz.mixes: outlines exactly on the windows; on a shapes-world corpus, the windows
with the most and least box coverage), through the library and the CLI, which reads the corpus. CMC view
pictures are tested in test_views.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from png_helpers import read

from cmcaug.bank.reader import PatchBank
from cmcaug.bank.writer import write_bank
from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.timix import choose_partners
from cmcaug.viz._sheets import LABEL_HEIGHT, PAD
from cmcaug.viz.mixes import _WINDOW, preview_timix, render_mix
from cmcaug.viz.patch_grids import preview_bank, render_patch_grid


def coded_patches(n: int, side: int) -> np.ndarray:
    """Patches of one flat colour each; the colour encodes the patch number."""
    codes = np.arange(n)
    colors = np.stack([(codes * 37) % 256, codes % 256, 255 - codes % 256], axis=1).astype(np.uint8)
    return np.broadcast_to(colors[:, None, None, :], (n, side, side, 3)).copy()


def tile_origin(row: int, column: int, side: int, labelled: bool) -> tuple[int, int]:
    """(x, y) of a tile's top-left pixel in a sheet without a title column."""
    return PAD + column * (side + PAD), PAD + row * (side + PAD + (LABEL_HEIGHT if labelled else 0))


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
        below = sheet[y + side : y + side + (LABEL_HEIGHT if labelled else PAD), x : x + side]
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
    assert sheet.shape[1] == 16 + 2 * PAD


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
    assert sheet.shape[0] == 2 * (SIDE + PAD + LABEL_HEIGHT) + PAD  # circle and star; heart has none
    circles, stars = (row_tiles(sheet, r) for r in range(2))
    assert len(circles) == len(set(circles)) == 4 and set(circles) <= set(range(5))
    assert len(stars) == len(set(stars)) == 4 and set(stars) <= set(range(5, 17))


def test_preview_bank_shows_all_patches_of_small_concepts_and_empty_rows(bank: PatchBank, tmp_path: Path) -> None:
    sheet = read(preview_bank(bank, tmp_path / "bank.png", concepts=["heart", "circle"], per_concept=8))
    assert sheet.shape[0] == 2 * (SIDE + PAD + LABEL_HEIGHT) + PAD
    assert row_tiles(sheet, 0) == []
    assert sorted(row_tiles(sheet, 1)) == list(range(5))
    only_empty = read(preview_bank(bank, tmp_path / "empty.png", concepts=[2]))
    assert only_empty.shape[0] == SIDE + 2 * PAD and row_tiles(only_empty, 0) == []


def test_preview_bank_is_deterministic_for_a_seed(bank: PatchBank, tmp_path: Path) -> None:
    first = preview_bank(bank, tmp_path / "a.png", seed=3).read_bytes()
    assert preview_bank(bank, tmp_path / "b.png", seed=3).read_bytes() == first
    assert preview_bank(bank, tmp_path / "c.png", seed=4).read_bytes() != first


@pytest.mark.parametrize(("options", "match"), [({"concepts": ["dragon"]}, "unknown concept"), ({"concepts": [3]}, "out of range"),
                                             ({"per_concept": 0}, "per_concept must be at least 1"),
                                             ({"seed": -1}, "seed at least 0, got 8 and -1"),
                                             ({"tile_size": 0}, "tile_size must be at least 1")])
def test_preview_bank_rejects_bad_arguments(bank: PatchBank, tmp_path: Path, options: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        preview_bank(bank, tmp_path / "x.png", **options)


def test_preview_cli(bank_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert main(["preview", str(bank_path), "-o", str(out), "--concepts", "star", "--per-concept", "3"]) == 0
    sheet = read(out)
    assert len(row_tiles(sheet, 0)) == 3
    assert str(out) in capsys.readouterr().out


# -- TiMix mix sheets ----------------------------------------------------------------------------------
def grey_batch(b: int, h: int, w: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] grey ramps (R = G = B, never the outline colour), different per image."""
    ramp = (torch.arange(h * w).reshape(h, w) * 7 % 200 + 20).to(torch.uint8)
    return torch.stack([(ramp + 5 * i).expand(3, h, w) for i in range(b)])


def sheet_tile(sheet: np.ndarray, row: int, column: int, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    x, y = PAD + column * (w + PAD), PAD + row * (h + PAD + LABEL_HEIGHT)
    return sheet[y : y + h, x : x + w]


def assert_outline(tile: np.ndarray, box: list[int] | None, scale: float) -> None:
    """The outline colour lies exactly on the 2-pixel inner border of `box` (pixels, end-exclusive), scaled."""
    ring = np.zeros(tile.shape[:2], bool)
    if box is not None:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        ring[y0:y1, x0:x1] = True
        ring[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = False
    assert np.array_equal((tile == _WINDOW).all(axis=-1), ring)


@pytest.mark.parametrize(("tile_size", "as_float"), [(None, False), (96, True)])
def test_render_mix_outlines_the_windows_mix_result_reports(tmp_path: Path, tile_size: int | None, as_float: bool) -> None:
    from cmcaug.timix import text_aware_mix

    images = grey_batch(5, 32, 48)
    relevance = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(0))
    result = text_aware_mix(images, relevance, patch_size=8, window=2, partner=torch.tensor([4, 3, 2, 1, 0]))
    inputs = images.float() / 255 if as_float else images
    sheet = read(render_mix(inputs, result, tmp_path / "mix.png", max_rows=4, tile_size=tile_size))
    scale = 1.0 if tile_size is None else tile_size / 48
    size = (round(48 * scale), round(32 * scale))
    assert sheet.shape == (PAD + 4 * (size[1] + PAD + LABEL_HEIGHT), PAD + 3 * (size[0] + PAD), 3)
    for i in range(4):
        partner = int(result.partner[i])
        mixed = partner != i
        source, target = ((result.source_box[i] * 8).tolist(), (result.target_box[i] * 8).tolist()) if mixed else (None, None)
        assert_outline(sheet_tile(sheet, i, 0, size), None, scale)
        assert_outline(sheet_tile(sheet, i, 1, size), source, scale)
        assert_outline(sheet_tile(sheet, i, 2, size), target, scale)
        if tile_size is None:  # drawn as is: the tiles are the images, outside the outlines
            ring = (sheet_tile(sheet, i, 2, size) == _WINDOW).all(axis=-1)
            assert np.array_equal(sheet_tile(sheet, i, 2, size)[~ring], result.images[i].permute(1, 2, 0).numpy()[~ring])
            assert np.array_equal(sheet_tile(sheet, i, 0, size), images[i].permute(1, 2, 0).numpy())
    assert int(result.partner[2]) == 2  # so row 2 was checked to have no outline at all


@pytest.mark.parametrize(("images", "match"), [(torch.zeros(2, 3, 16), "B, C, H, W"), (torch.zeros(2, 4, 16, 16), "C = 1 or 3"),
                                               (torch.zeros(2, 3, 16, 16, dtype=torch.int32), "uint8 or float"),
                                               (torch.zeros(3, 3, 16, 16), "differ in shape")])
def test_render_mix_rejects_bad_images(tmp_path: Path, images: torch.Tensor, match: str) -> None:
    from cmcaug.timix import text_aware_mix

    result = text_aware_mix(grey_batch(2, 16, 16), torch.rand(2, 2, 2), patch_size=8, window=1)
    with pytest.raises(InputError, match=match):
        render_mix(images, result, tmp_path / "mix.png")


# -- TiMix previews of an annotated corpus -------------------------------------------------------------
def test_patch_box_coverage_is_the_largest_share_one_box_covers() -> None:
    from cmcaug.relevance import patch_box_coverage

    boxes = [torch.tensor([[5.0, 0.0, 16.0, 10.0], [0.0, 0.0, 8.0, 10.0]]), torch.zeros(0, 4)]  # 40 x 40 px, 4 x 4
    coverage = patch_box_coverage(boxes, (4, 4), image_size=(40, 40))
    assert coverage.dtype == torch.float64 and coverage.shape == (2, 4, 4)
    assert coverage[0, 0].tolist() == pytest.approx([0.8, 0.6, 0, 0]) and not coverage[0, 1:].any()  # max, not sum
    assert not coverage[1].any()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmcaug.synth import make_corpus

    return make_corpus(tmp_path_factory.mktemp("timix") / "corpus", 6, seed=1, image_size=64).root


def annotated(root: Path, rows: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """File names, pixels and (x0, y0, x1, y1) pixel boxes of the corpus's first `rows` images, read here
    with Pillow and json (not with the CLI's reader, which the CLI test checks against this)."""
    coco = json.loads((root / "annotations.json").read_text())
    names = sorted(im["file_name"] for im in coco["images"])[:rows]
    ids = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes = {name: [] for name in names}
    for ann in coco["annotations"]:
        if ids[ann["image_id"]] in boxes:
            x, y, w, h = ann["bbox"]
            boxes[ids[ann["image_id"]]].append([x, y, x + w, y + h])
    return names, [read(root / "images" / name) for name in names], [np.array(boxes[n]).reshape(-1, 4) for n in names]


def expected_coverage(root: Path, grid: int) -> dict[str, np.ndarray]:
    """file name -> [grid, grid] largest share of each patch that one COCO box covers, from annotations.json."""
    coco = json.loads((root / "annotations.json").read_text())
    names = {im["id"]: (im["file_name"], im["width"]) for im in coco["images"]}
    out = {name: np.zeros((grid, grid)) for name, _ in names.values()}
    for ann in coco["annotations"]:
        name, size = names[ann["image_id"]]
        x, y, w, h = (v * grid / size for v in ann["bbox"])  # patch units
        edges = np.arange(grid)
        cover = (np.minimum(y + h, edges + 1) - np.maximum(y, edges)).clip(0)[:, None] * \
                (np.minimum(x + w, edges + 1) - np.maximum(x, edges)).clip(0)[None, :]
        out[name] = np.maximum(out[name], cover)
    return out


def window_sums_of(coverage: np.ndarray, k: int) -> list[float]:
    n = len(coverage)
    return [coverage[y : y + k, x : x + k].sum() for y in range(n - k + 1) for x in range(n - k + 1)]


def outlined_box(tile: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((tile == _WINDOW).all(axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize(("rows", "seed"), [(5, 0), (6, 3)])
def test_preview_timix_pastes_the_most_covered_window_over_the_least(corpus: Path, tmp_path: Path, rows: int,
                                                                     seed: int) -> None:
    patch, side = 16, 96  # 6 x 6 patches; the 64-pixel images are enlarged, their boxes with them
    names, images, boxes = annotated(corpus, rows)
    stats = preview_timix(images, boxes, tmp_path / "mix.png", seed=seed, patch_size=patch, image_size=side,
                          tile_size=None)
    sheet = read(tmp_path / "mix.png")
    cell = side + PAD + LABEL_HEIGHT
    heading = sheet.shape[0] - rows * cell - PAD  # the rows sit under the heading
    assert heading > LABEL_HEIGHT and sheet.shape[1] == PAD + 3 * (side + PAD)
    assert (sheet[:heading].min(axis=-1) < 100).any()  # the heading's ink
    assert stats["grid"] == [6, 6] and stats["partner"] == choose_partners(rows, "flip").tolist()
    coverage = expected_coverage(corpus, 6)
    k = stats["window"]
    assert 2 <= k <= 4  # window_ratio (0.35, 0.75) of 6 patches
    for i in range(rows):
        j = stats["partner"][i]
        tiles = [sheet[heading + PAD + i * cell :][:side, PAD + c * (side + PAD) :][:, :side] for c in range(3)]
        if j == i:  # an image that is its own partner stays as it was
            assert not (tiles[2] == _WINDOW).all(axis=-1).any() and stats["lam"][i] == 1
            continue
        source, target = outlined_box(tiles[1]), outlined_box(tiles[2])
        assert source[2] - source[0] == target[2] - target[0] == k * patch
        assert all(v % patch == 0 for v in source + target)
        sx, sy, tx, ty = source[0] // patch, source[1] // patch, target[0] // patch, target[1] // patch
        partner, own = coverage[names[j]], coverage[names[i]]
        assert partner[sy : sy + k, sx : sx + k].sum() == pytest.approx(max(window_sums_of(partner, k)))
        assert own[ty : ty + k, tx : tx + k].sum() == pytest.approx(min(window_sums_of(own, k)))
        inner = (slice(2, k * patch - 2), slice(2, k * patch - 2))  # inside the outlines: the pasted pixels
        pasted = tiles[2][target[1] : target[3], target[0] : target[2]][inner]
        assert np.array_equal(pasted, tiles[1][source[1] : source[3], source[0] : source[2]][inner])
        assert stats["lam"][i] == pytest.approx(1 - k * k / 36, abs=1e-4)


def test_preview_timix_is_deterministic_for_a_seed(corpus: Path, tmp_path: Path) -> None:
    _, images, boxes = annotated(corpus, 4)
    options = {"patch_size": 16, "image_size": 64, "tile_size": 48}
    first = preview_timix(images, boxes, tmp_path / "a.png", seed=5, **options)
    second = preview_timix(images, boxes, tmp_path / "b.png", seed=5, **options)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert {k: v for k, v in first.items() if k != "output"} == {k: v for k, v in second.items() if k != "output"}
    relevance = preview_timix(images, boxes, tmp_path / "c.png", seed=5, label_mode="relevance", **options)
    assert relevance["window"] == first["window"] and relevance["lam"] != first["lam"]


@pytest.mark.parametrize(("images", "boxes", "options", "match"), [
    (2, 2, {"image_size": 100}, "multiple of patch_size"), (2, 2, {"patch_size": 0}, "patch_size"),
    (0, 0, {}, "at least one image"), (2, 1, {}, "one box array per image")])
def test_preview_timix_rejects_bad_arguments(corpus: Path, tmp_path: Path, images: int, boxes: int, options: dict,
                                             match: str) -> None:
    _, pixels, found = annotated(corpus, 2)
    with pytest.raises(InputError, match=match):
        preview_timix(pixels[:images], found[:boxes], tmp_path / "x.png",
                      **{"patch_size": 16, "image_size": 64, **options})


def test_preview_cli_renders_timix_of_the_corpus_it_reads(corpus: Path, bank_path: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "timix.png"
    args = ["preview", "--timix", str(corpus), "-o", str(out), "--patch-size", "16", "--image-size", "64"]
    assert main([*args, "--rows", "3", "--tile-size", "64", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    partners = ", ".join(map(str, choose_partners(3, "flip").tolist()))
    assert "preview: TiMix" in printed and str(out) in printed and f"partner: {partners}" in printed
    assert "images: 000001.png, 000002.png, 000003.png" in printed
    _, images, boxes = annotated(corpus, 3)
    preview_timix(images, boxes, tmp_path / "library.png", seed=2, patch_size=16, image_size=64, tile_size=64,
                  title=f"TiMix on {corpus}")
    assert np.array_equal(read(out), read(tmp_path / "library.png"))
    assert main([*args[:2], str(corpus / "images"), *args[3:]]) == 3 and "annotations.json" in capsys.readouterr().err
