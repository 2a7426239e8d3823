"""examples/train_timix_relevance.py, reduced: training the relevance head separates object from background,
and TiMix's windows then overwrite background and paste objects."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):
    """The example imported as running the script would: with its folder first on sys.path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("train_timix_relevance")


def test_training_the_head_separates_boxes_from_background(example, tmp_path, capsys) -> None:
    result = example.main(["--images", "64", "--steps", "60", "--workdir", str(tmp_path)])
    before, after = result["before"], result["after"]
    assert abs(before["relevance_on_boxes"] - before["relevance_on_background"]) < 0.1  # untrained: ~0.5 everywhere
    assert after["relevance_on_boxes"] - after["relevance_on_background"] > 0.5
    assert after["object_in_lost_window"] < before["object_in_lost_window"]
    assert after["object_in_lost_window"] <= 0.05
    assert after["object_in_pasted_window"] >= before["object_in_pasted_window"]
    assert len(result["losses"]) == 60 and result["losses"][-1] < result["losses"][0]
    assert (tmp_path / "corpus" / "annotations.json").is_file()
    out = capsys.readouterr().out
    assert "trained head" in out and "boxes as relevance" in out
