"""The benchmarks' code paths through `cmcaug bench` and `run_all`: smoke runs write their JSON into --out
(never into benchmarks/results), names are checked, failures reach the exit code. Numbers are never asserted."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmcaug.benchmarks import common, run_all
from cmcaug.cli.main import main
from cmcaug.kernels.backend import interpreter_enabled

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def results_dir_untouched():
    """Fails a test that writes into the checkout's benchmarks/results."""
    results = Path(common.__file__).parent / "results"
    before = set(results.iterdir()) if results.exists() else set()
    yield
    assert (set(results.iterdir()) if results.exists() else set()) == before


def test_list_says_what_each_benchmark_measures(capsys) -> None:
    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[0] for line in lines] == list(run_all.BENCHMARKS)
    assert "Benchmark the fused CMC splice" in next(line for line in lines if line.startswith("splice"))
    assert all(len(line.split()) > 3 for line in lines)


@pytest.mark.parametrize("argv", [["bench", "nope"], ["bench", "--list", "splice", "nope"], ["bench", "--smoke", "Splice"]])
def test_unknown_benchmark_is_bad_usage(argv, capsys) -> None:
    assert main(argv) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_splice_smoke_writes_into_out(tmp_path, results_dir_untouched) -> None:
    assert main(["bench", "splice", "--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("splice-smoke-*.json")
    payload = json.loads(result.read_text())
    assert {"device", "copy_gbs", "rows"} <= payload.keys()
    keys = {"provider", "pass", "dtype", "B", "L", "D", "K", "bytes", "ms", "gbs"}
    assert payload["rows"] and all(keys <= row.keys() for row in payload["rows"])
    assert {row["pass"] for row in payload["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    triton = {"triton"} if interpreter_enabled() else set()  # smoke runs on the CPU: Triton only interpreted
    assert {row["provider"] for row in payload["rows"]} == {"eager", "loop"} | triton
    assert bool(list(tmp_path.glob("splice-smoke-*.png"))) == HAS_MATPLOTLIB


def test_results_go_under_the_working_directory_by_default(tmp_path, monkeypatch, results_dir_untouched) -> None:
    """Without --out: ./cmcaug-bench-results where the user is, never the installed or checked-out package."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "splice", "--smoke"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["cmcaug-bench-results"]
    assert list((tmp_path / "cmcaug-bench-results").glob("splice-smoke-*.json"))


def test_image_mix_smoke_writes_into_out(tmp_path, results_dir_untouched) -> None:
    """Providers agree (the benchmark checks them against the reference), JSON and plots are written."""
    assert main(["bench", "--smoke", "--out", str(tmp_path), "image_mix"]) == 0
    [result] = tmp_path.glob("image_mix-smoke-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"triton", "unfold_fold", "reference", "kornia"}
    assert ("timix" in {r["provider"] for r in rows}) == interpreter_enabled()  # smoke: Triton only interpreted
    assert all("ms" in r or "skipped" in r for r in rows)
    assert bool(list(tmp_path.glob("image_mix-smoke-*-64px.png"))) == HAS_MATPLOTLIB


def test_arguments_after_dashes_reach_the_benchmark(tmp_path, capsys) -> None:
    """`--` hands the rest to the benchmark: its own --help answers (exit 0); an option it lacks fails it."""
    assert main(["bench", "--out", str(tmp_path), "splice", "--", "--help"]) == 0
    assert "--patch-tokens" in capsys.readouterr().out
    assert main(["bench", "--smoke", "--out", str(tmp_path), "splice", "--", "--no-such-option"]) == 1
    assert "failed: splice" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_all_runs_the_named_benchmarks_and_reports_failures(tmp_path, monkeypatch, capsys) -> None:
    """Stand-in modules (in sys.modules, where run_all's import finds them) record their arguments."""
    ran = []
    outcomes = {"build": 1, "grounding": RuntimeError("boom")}
    for name in run_all.BENCHMARKS:
        def bench_main(argv: list[str], name: str = name) -> int:
            ran.append((name, argv))
            if isinstance(outcomes.get(name), Exception):
                raise outcomes[name]
            return outcomes.get(name, 0)
        monkeypatch.setitem(sys.modules, f"{run_all.__package__}.bench_{name}", SimpleNamespace(main=bench_main))

    assert run_all.run(["splice", "image_mix"], smoke=True, out=tmp_path, extra=["-x"]) == 0
    assert ran == [(name, ["--smoke", "--out", str(tmp_path), "-x"]) for name in ("splice", "image_mix")]
    ran.clear()
    assert run_all.run(["grounding", "build", "transform"]) == 1  # a failure does not stop the others
    assert ran == [("grounding", []), ("build", []), ("transform", [])]
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "failed: grounding, build" in err
    ran.clear()
    assert run_all.run(smoke=True) == 1  # all of them, the GPU ones too: a smoke run needs no CUDA
    assert [name for name, _ in ran] == list(run_all.BENCHMARKS)
    ran.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_all.run() == 1
    assert [name for name, _ in ran] == list(run_all.CPU_BENCHMARKS)
    assert "no CUDA device: skipped splice, image_mix" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        run_all.run(["nope"])


def test_results_go_under_the_working_directory_unless_out_says_otherwise(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = common.argument_parser("bench_x", "Measures x.")
    assert parser.parse_args([]).out == tmp_path / "cmcaug-bench-results"
    assert parser.parse_args(["--out", str(tmp_path)]).out == tmp_path


def test_tag_memory_smoke_writes_into_out(tmp_path, results_dir_untouched) -> None:
    assert main(["bench", "tag_memory", "--smoke", "--out", str(tmp_path)]) == 0
    [result] = tmp_path.glob("tag-memory-smoke-*.json")
    assert json.loads(result.read_text())["rows"]


def test_list_with_options_of_a_run_is_bad_usage(capsys) -> None:
    assert main(["bench", "--list", "--smoke"]) == 2
    assert "--list runs nothing" in capsys.readouterr().err
