"""examples/replicate_timix.py --smoke: the whole pipeline (corpora, every arm at every size, tables, JSON,
markdown, plot) on a tiny configuration, in seconds."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def replicate(monkeypatch: pytest.MonkeyPatch):
    """The example imported as running the script would: with its folder first on sys.path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("replicate_timix")


def test_smoke_run_writes_every_arm_and_size(replicate, tmp_path, capsys) -> None:
    payload = replicate.main(["--smoke", "--out", str(tmp_path)])
    [json_path] = tmp_path.glob("timix-replication-*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(json_path.read_text())
    assert saved["summary"] == payload["summary"]
    sizes, seeds = replicate.SMOKE["sizes"], replicate.SMOKE["seeds"]
    cells = {(e["arm"], e["size"]) for e in saved["summary"]}
    assert cells == {(arm, size) for arm in replicate.ARMS for size in sizes}
    assert len(saved["rows"]) == len(replicate.ARMS) * len(sizes) * len(seeds)
    for row in saved["rows"]:
        for key in ("r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "val_r1", "train_r1"):
            assert 0 <= row[key] <= 1
        assert ("mix_loss" in row) == (row["arm"] != "none")
        assert ("head_loss" in row) == (row["arm"] == "timix-head")
    assert saved["chance_r1"] == pytest.approx(1 / saved["config"]["test"], abs=1e-4)
    md = json_path.with_suffix(".md").read_text()
    assert all(f"| {arm} |" in md for arm in replicate.ARMS)
    out = capsys.readouterr().out
    assert "per (arm, size), mean ± std over seeds" in out


def test_runs_are_reproducible(replicate, tmp_path) -> None:
    """A seed fixes corpus, initialization, batches and mixing draws: the same run twice gives the same row."""
    first = replicate.main(["--smoke", "--arms", "cutmix", "timix-head", "--sizes", "24", "--out", str(tmp_path)])
    again = replicate.main(["--smoke", "--arms", "cutmix", "timix-head", "--sizes", "24", "--out", str(tmp_path)])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rows]  # noqa: E731
    assert strip(first["rows"]) == strip(again["rows"])
