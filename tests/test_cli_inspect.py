"""`cmcaug inspect BANK`: summary text, --json, --no-validate, and exit code 4 for a bad bank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from bank_helpers import EMPTY_CONCEPT, VOCAB, rehash, write_random_bank

from cmcaug.bank import format as fmt
from cmcaug.bank.reader import PatchBank
from cmcaug.cli import main as cli


@pytest.fixture
def inspect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> object:
    """Run `cmcaug inspect ...` through the real entry point -> (exit code, stdout, stderr).

    Only the inspect subcommand is registered, so this test does not depend on the other subcommands' modules.
    """
    assert "inspect_bank" in cli.COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", ("inspect_bank",))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(["inspect", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def bank_path(tmp_path: Path) -> Path:
    write_random_bank(tmp_path / "bank", n=120)
    return tmp_path / "bank"


def test_text_summary_and_per_concept_table(inspect, bank_path: Path) -> None:
    code, out, _ = inspect(str(bank_path))
    assert code == 0
    bank = PatchBank.open(bank_path)
    assert out.startswith("patch bank\n")
    lines = out.splitlines()
    for line in ("  num_patches: 120", "  patch_size: 6", "  embedding_dim: 12", "  index: SQfp16", "  empty_concepts: 1"):
        assert line in lines
    assert "    detector: annotations.json" in lines
    rows = {line.split()[0]: line for line in out.splitlines()[-len(VOCAB) :]}
    for i, name in enumerate(VOCAB.names):
        assert name in rows[str(i)] and rows[str(i)].endswith(f" {bank.count(name)}")
    assert rows[str(VOCAB.id(EMPTY_CONCEPT))].endswith(" 0")


def test_json_is_the_bank_summary(inspect, bank_path: Path) -> None:
    code, out, _ = inspect(str(bank_path), "--json")
    assert code == 0
    assert json.loads(out) == PatchBank.open(bank_path).summary()


def test_corrupt_bank_exits_4_unless_checksums_are_skipped(inspect, bank_path: Path) -> None:
    data = bytearray((bank_path / fmt.PIXELS).read_bytes())
    data[-1] ^= 1
    (bank_path / fmt.PIXELS).write_bytes(bytes(data))
    code, out, err = inspect(str(bank_path))
    assert code == 4 and out == ""
    assert err.startswith("cmcaug inspect: error: ") and "pixels.npy" in err and "sha256" in err
    assert inspect(str(bank_path), "--no-validate")[0] == 0


def test_index_of_another_bank_exits_4_unless_validation_is_skipped(inspect, bank_path: Path, tmp_path: Path) -> None:
    """inspect reads no index with --no-validate (it never searches); validation reads and refuses it."""
    write_random_bank(tmp_path / "other", n=80)
    (bank_path / fmt.INDEX).write_bytes((tmp_path / "other" / fmt.INDEX).read_bytes())
    rehash(bank_path)
    code, out, err = inspect(str(bank_path))
    assert code == 4 and out == "" and "index.faiss" in err and "80 vectors" in err
    assert inspect(str(bank_path), "--no-validate")[0] == 0


def test_missing_bank_exits_4(inspect, tmp_path: Path) -> None:
    code, _, err = inspect(str(tmp_path / "nowhere"))
    assert code == 4 and "manifest.json" in err


def test_nested_manifest_fields_render_as_indented_lines() -> None:
    from cmcaug.cli.render import summary

    stats = {"boxes": {"dropped": {"small": 2}, "kept": 1_000}, "inputs": ["a", "b"], "empty": {}}
    assert summary("bank", stats).splitlines() == [
        "bank", "  boxes:", "    dropped:", "      small: 2", "    kept: 1,000", "  inputs: a, b", "  empty: {}"]
