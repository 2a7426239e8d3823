"""`cmcaug preview` on the command line: OUT's extension picks the format for every kind of preview (bank,
CMC views, TiMix); and one rule for usage errors: another extension, flags of another kind of preview,
flags that conflict and numbers out of range are exit 2, refused before any file is read, printed as
`cmcaug preview: error: ...`, while wrong input files stay exit 3. What the pictures hold is tested in
test_preview.py and test_views.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from png_helpers import file_format, picture

from cmcaug.cli.main import main
from cmcaug.cli.usage import UsageError, number

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".html": "HTML", ".htm": "HTML"}
ACCEPTED = ".png, .jpg, .jpeg, .webp, .html, .htm"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A shapes-world corpus, its bank and its captions' tags (so no preview needs spaCy)."""
    from cmcaug.bank.reader import PatchBank
    from cmcaug.builder.pipeline import build_bank
    from cmcaug.synth import make_corpus
    from cmcaug.text.grounding import GroundingTagger
    from cmcaug.text.tags import tag_corpus

    root = tmp_path_factory.mktemp("world")
    corpus = make_corpus(root / "corpus", 6, seed=0, image_size=64)
    build_bank(corpus.images_dir, root / "bank", annotations=corpus.annotations, vocab=corpus.vocab, patch_size=16,
               min_box=4, progress=False)
    vocab = PatchBank.open(root / "bank").vocab
    tag_corpus([corpus.captions], root / "tags.parquet", GroundingTagger(vocab, mode="lookup"), progress=False)
    return {"corpus": root / "corpus", "bank": root / "bank", "tags": root / "tags.parquet"}


def preview_args(world: dict[str, Path], kind: str) -> list[str]:
    """The arguments of each kind of preview, before -o."""
    return {"bank": ["preview", str(world["bank"])],
            "captions": ["preview", str(world["bank"]), "--captions", str(world["tags"]), "--rows", "3"],
            "timix": ["preview", "--timix", str(world["corpus"]), "--rows", "2", "--patch-size", "16", "--image-size", "64"],
            "crops": ["preview", "--crops", str(world["corpus"]), "--rows", "1"],
            }[kind]


def exit_code(argv: list[str]) -> int:
    """`main`'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("kind", ["bank", "captions", "timix", "crops"])
@pytest.mark.parametrize("suffix", sorted(SUFFIXES))
def test_the_extension_picks_the_format(world: dict[str, Path], tmp_path: Path, kind: str, suffix: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"preview{suffix}"
    assert main([*preview_args(world, kind), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and file_format(out) == SUFFIXES[suffix]
    if SUFFIXES[suffix] == "HTML" and kind == "captions":  # the views' own page, a figure per patch
        assert "<section>" in out.read_text() and "<figure" in out.read_text()
    else:  # a picture, or a page showing it
        assert picture(out).shape[0] > 48


@pytest.mark.parametrize("kind", ["bank", "captions", "timix"])
@pytest.mark.parametrize("name", ["preview", "preview.txt", "preview.gif", "preview.png.bak"])
def test_other_extensions_are_usage_errors_naming_the_accepted_ones(world: dict[str, Path], tmp_path: Path, kind: str,
                                                                    name: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / name
    assert main([*preview_args(world, kind), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cmcaug preview: error: argument -o/--output: {out}: ") and err.rstrip().endswith(ACCEPTED)
    assert not out.exists()


def test_the_extension_is_checked_before_the_bank_is_opened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", str(tmp_path / "no-bank"), "-o", str(tmp_path / "bank.pdf")]) == 2  # not 4: no bank
    assert "the extension '.pdf' names no picture format" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "flags", "message"), [
    ("timix", ["BANK"], "--timix draws images of a corpus and takes no BANK or --captions; run them separately"),
    ("timix", ["--captions", "TAGS"], "--timix draws images of a corpus and takes no BANK or --captions"),
    ("crops", ["--timix", "CORPUS"], "--timix and --crops are two previews"),
    ("crops", ["--per-concept", "3"], "--per-concept is for a bank preview (BANK without --captions), not a crop-mode"),
    (None, [], "give a patch bank folder BANK, or --timix CORPUS / --crops CORPUS for a corpus preview"),
    (None, ["--captions", "TAGS"], "give a patch bank folder BANK"),
    ("bank", ["--rows", "3"], "--rows is for --captions or --timix"),
    ("bank", ["--ratio", "0.2", "--mode", "lookup"], "--ratio, --mode are for CMC views (--captions), not a bank "
                                                     "preview (BANK without --captions)"),
    ("bank", ["--image-size", "64"], "--image-size is for a TiMix preview (--timix), not a bank preview"),
    ("captions", ["--per-concept", "3"], "--per-concept is for a bank preview (BANK without --captions), not CMC views"),
    ("captions", ["--label-mode", "relevance"], "--label-mode is for a TiMix preview (--timix), not CMC views"),
    ("timix", ["--concepts", "star"], "--concepts is for a bank preview (BANK without --captions), not a TiMix preview"),
    ("timix", ["--tokenizer", "words"], "--tokenizer is for CMC views (--captions), not a TiMix preview (--timix)"),
    ("timix", ["--image-size", "100"], "--image-size must be a multiple of --patch-size, got 100 and 16"),
])
def test_flags_that_conflict_are_usage_errors(world: dict[str, Path], tmp_path: Path, kind: str | None, flags: list[str],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    args = preview_args(world, kind) if kind else ["preview"]
    flags = [{"BANK": str(world["bank"]), "TAGS": str(world["tags"])}.get(f, f) for f in flags]
    assert main([*args, *flags, "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"cmcaug preview: error: {message}")
    assert not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--rows", "0"], "argument --rows: must be >= 1, got 0"),
    (["--tile-size", "-5"], "argument --tile-size: must be >= 1, got -5"),
    (["--per-concept", "0"], "argument --per-concept: must be >= 1, got 0"),
    (["--patch-size", "0"], "argument --patch-size: must be >= 1, got 0"),
    (["--ratio", "1.5"], "argument --ratio: must lie in [0, 1], got 1.5"),
    (["--ratio", "nan"], "argument --ratio: must lie in [0, 1], got nan"),
    (["--rows", "two"], "argument --rows: expected an integer, got 'two'"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(world: dict[str, Path], tmp_path: Path, flags: list[str],
                                                               message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([*preview_args(world, "captions"), *flags, "-o", str(tmp_path / "out.png")]) == 2
    assert f"cmcaug preview: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_wrong_input_files_stay_exit_3(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bank, out = str(world["bank"]), str(tmp_path / "out.png")
    (tmp_path / "empty.txt").write_text("")
    for argv, message in [
        (["preview", bank, "--captions", str(tmp_path / "none.txt")], "no such captions file"),
        (["preview", bank, "--captions", str(tmp_path / "empty.txt")], "holds no captions"),
        (["preview", bank, "--concepts", "dragon"], "unknown concept 'dragon'"),
        (["preview", "--timix", str(world["corpus"] / "images")], "annotations.json"),
    ]:
        assert main([*argv, "-o", out]) == 3
        err = capsys.readouterr().err
        assert err.startswith("cmcaug preview: error: ") and message in err
    assert main(["preview", str(tmp_path), "-o", out]) == 4  # a folder that holds no bank


def test_usage_error_and_number_are_the_shared_rule(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Any subcommand that raises UsageError exits 2 with argparse's line; `number` checks like build-bank's flags."""
    import argparse

    from cmcaug.cli import inspect_bank

    def refuse(args: argparse.Namespace) -> int:
        raise UsageError("--json and --no-validate cannot meet here")

    monkeypatch.setattr(inspect_bank, "run", refuse)
    assert main(["inspect", "anything"]) == 2
    assert capsys.readouterr().err == "cmcaug inspect: error: --json and --no-validate cannot meet here\n"
    assert number(int, 1)("3") == 3 and number(float, 0, 1)("0.25") == 0.25 and number(float, 0, above=True)("1e-9") == 1e-9
    for parse, text, words in [(number(int, 1), "0", "must be >= 1, got 0"), (number(float, 0, 1), "2", "must lie in [0, 1]"),
                               (number(float, 0, above=True), "0", "must be > 0, got 0.0"),
                               (number(int), "1.5", "expected an integer, got '1.5'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse(text)
