"""A checkout never shadows an installed package and never mixes two source trees (cmcaug/_checkout.py).

Each test runs a fresh interpreter with `python -c` in a checkout, as a user's REPL or notebook there
would: the working directory is first on its sys.path, so the top-level `kernels/`, `cli/` and
`benchmarks/` folders are visible by their bare names.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# Prints where every loaded cmcaug* module and the bare names `kernels`, `cli`, `benchmarks` came from.
REPORT = """
import importlib, json, sys
import cmcaug, cmcaug.kernels, cmcaug.cli.main, cmcaug.benchmarks.common
from cmcaug import CMCTransform, PatchBank, splice
bare = {}
for name in ("kernels", "cli", "benchmarks"):
    try:
        bare[name] = importlib.import_module(name).__file__
    except ImportError as exc:
        bare[name] = "ImportError: " + str(exc)
files = {name: m.__file__ for name, m in sys.modules.items() if name.split(".")[0] == "cmcaug" and getattr(m, "__file__", None)}
print(json.dumps({"cmcaug": files, "bare": bare}))
"""


def run_in(cwd: Path, code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_one_tree(report: dict, tree: Path) -> None:
    files = report["cmcaug"]
    assert {"cmcaug.kernels.splice", "cmcaug.cli.main", "cmcaug.benchmarks.common", "cmcaug.transform"} <= files.keys()
    outside = {name: path for name, path in files.items() if not Path(path).resolve().is_relative_to(tree)}
    assert not outside, f"cmcaug modules from outside {tree}: {outside}"


def assert_not_shadowed(report: dict, tree: Path) -> None:
    for name, found in report["bare"].items():
        if found.startswith("ImportError"):
            assert f"cmcaug.{name}" in found  # the message names what the folder is
        else:
            assert not Path(found).resolve().is_relative_to(tree / name), f"`import {name}` found the checkout's folder"


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_transformers_builds_a_bert_model_in_the_checkout() -> None:
    """transformers imports Hugging Face's `kernels` (when installed); the checkout's kernels/ must not answer."""
    report = run_in(ROOT, textwrap.dedent("""
        from transformers import BertConfig, BertModel
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    """) + REPORT)
    assert_one_tree(report, ROOT)
    assert_not_shadowed(report, ROOT)


def test_every_cmcaug_module_comes_from_the_checkout_it_runs_in() -> None:
    assert_not_shadowed(report := run_in(ROOT, REPORT), ROOT)
    assert_one_tree(report, ROOT)


def test_a_second_clone_does_not_mix_with_the_installed_one(tmp_path) -> None:
    """The venv's editable install points at ROOT; a second clone run from its own folder uses only its own files."""
    clone = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for folder in ("cmcaug", "kernels", "cli", "benchmarks"):
        shutil.copytree(ROOT / folder, clone / folder, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", clone / "pyproject.toml")
    report = run_in(clone, REPORT)
    assert_one_tree(report, clone.resolve())
    assert_not_shadowed(report, clone.resolve())
    # A module the clone lacks (an older branch, a module moved since) is missing, not borrowed from ROOT.
    (clone / "cmcaug" / "mixgen.py").unlink()
    missing = run_in(clone, """
import importlib, json
try:
    importlib.import_module("cmcaug.mixgen")
    print(json.dumps("imported"))
except ModuleNotFoundError as exc:
    print(json.dumps(exc.name))
""")
    assert missing == "cmcaug.mixgen"


def test_an_installed_copy_finds_its_subpackages_inside_cmcaug(tmp_path) -> None:
    """A wheel's layout (kernels/ inside cmcaug/, no pyproject.toml beside it) installs no finder of its own."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "cmcaug", site / "cmcaug", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("kernels", "cli", "benchmarks"):
        shutil.copytree(ROOT / folder, site / "cmcaug" / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    report = run_in(site, REPORT + """
from cmcaug._checkout import CheckoutFinder
assert not any(isinstance(finder, CheckoutFinder) for finder in sys.meta_path)
""")
    assert_one_tree(report, site.resolve())
