"""Resume: a build SIGKILLed at any point and re-run with --resume writes exactly the uninterrupted bank.

The kills hit the real CLI in a subprocess, at named points (via the `CMCAUG_BUILD_CRASH_AT` hook) and
at random moments while it works; the final files are compared by sha256 with an uninterrupted build.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bank_helpers import file_hashes, stop_after

from cmcaug.builder._state import BUILD_DIR, CRASH_ENV, digest
from cmcaug.builder.pipeline import build_bank, run_local
from cmcaug.errors import BankFormatError, InputError
from cmcaug.synth import make_corpus

CLI = [sys.executable, "-m", "cmcaug.cli.main", "build-bank"]
BATCHES = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("resume") / "corpus", 4 * BATCHES, seed=2, image_size=128).root


def options(corpus: Path) -> dict:
    return {"annotations": str(corpus / "annotations.json"), "vocab": str(corpus / "vocab.json"), "batch_size": 4,
            "min_box": 4, "max_per_concept": 5, "workers": 2}


def cli_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options(corpus).items()]
    return [*CLI, str(corpus / "images"), "-o", str(out), *flags, *extra]


def build(corpus: Path, out: Path, **kwargs):
    return build_bank([str(corpus / "images")], out, progress=False, **{**options(corpus), **kwargs})


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reference") / "bank"
    build(corpus, out)
    return file_hashes(out)


def shards(out: Path) -> list[str]:
    return sorted(p.name for p in (out / BUILD_DIR / "shards").glob("*"))


def progress(out: Path) -> tuple[int, bool]:
    return len([s for s in shards(out) if s.endswith(".npz")]), (out / "manifest.json").exists()


POINTS = ["shard:2", "finalize:before", "finalize:staged", "publish:unpublished", "publish:moved", "finalize:written",
          "finalize:renamed"]
STAGED_WHOLE = {"finalize:staged", "publish:unpublished", "publish:moved"}  # a resume publishes the staged bank as it is


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_named_points(point: str, corpus: Path, reference: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "bank"
    killed = subprocess.run(cli_args(corpus, out), env={**os.environ, CRASH_ENV: point}, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    published = (out / "manifest.json").exists()
    if point == "shard:2":
        assert shards(out) == ["00000000.npz", "00000001.npz"] and not published  # committed whole, nothing else
        resumed = subprocess.run(cli_args(corpus, out, "--resume"), capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "batches resumed: 2" in resumed.stdout and "boxes kept" in resumed.stdout
    else:
        assert published == (point in ("finalize:written", "finalize:renamed"))
        assert (out / BUILD_DIR).exists() == (point != "finalize:renamed")
        result = build(corpus, out, resume=True)
        finished = point in STAGED_WHOLE or point == "finalize:renamed"
        assert result.already_built == finished and result.resumed_batches == (0 if finished else BATCHES)
    assert file_hashes(out) == reference


def test_random_sigkills(corpus: Path, tmp_path: Path) -> None:
    """Runs killed at random moments after they made progress (a new shard or the manifest), one batch
    per image so kills land between and inside shard commits, until a run finishes on its own."""
    build(corpus, tmp_path / "reference", batch_size=1)
    out, rnd, kills = tmp_path / "bank", random.Random(0), 0
    for _ in range(30):
        before = progress(out)
        proc = subprocess.Popen(cli_args(corpus, out, "--resume", "--batch-size=1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and progress(out) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.03))
        proc.kill()
        if proc.wait() == 0:
            break
        kills += 1
    assert kills >= 1 and progress(out)[1]
    build(corpus, out, resume=True, batch_size=1)
    assert file_hashes(out) == file_hashes(tmp_path / "reference")


def test_resume_rules(corpus: Path, reference: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "bank"
    (out / BUILD_DIR / "shards").mkdir(parents=True)  # killed before its state was written
    with pytest.raises(InputError, match="unfinished build: pass --resume"):
        build(corpus, out)
    assert not build(corpus, out, resume=True).already_built and file_hashes(out) == reference
    again = build(corpus, out, resume=True)  # a finished bank of the same inputs: nothing to do
    assert again.already_built and again.stats["boxes"]["kept"] > 0 and file_hashes(out) == reference
    with pytest.raises(InputError, match=r"finished bank built from other inputs or options \(differs in: options\.seed \(0 before, "
                                         r"1 now\)\); pass --overwrite to replace it"):
        build(corpus, out, resume=True, seed=1)
    assert build(corpus, tmp_path / "new", resume=True).resumed_batches == 0  # --resume on no bank starts one
    assert file_hashes(tmp_path / "new") == reference


def test_resume_refuses_other_options_and_bad_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank"
    killed = subprocess.run(cli_args(corpus, out), env={**os.environ, CRASH_ENV: "finalize:before"}, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(InputError, match=r"differs in: options\.patch_size \(64 before, 32 now\)\); rerun with the ones it was "
                                         r"started with to resume its 6 finished batch\(es\), or pass --overwrite to start over"):
        build(corpus, out, resume=True, patch_size=32)
    (out / BUILD_DIR / "shards" / "00000003.npz").write_bytes(b"garbage")
    with pytest.raises(BankFormatError, match="00000003.npz: unreadable build shard"):
        build(corpus, out, resume=True)


def spelled(corpus: Path, images: str, annotations: str, out: Path, **kwargs):
    """A build of the corpus with its paths spelled as given (relative to the corpus's parent folder)."""
    return build_bank([images], out, progress=False, **{**options(corpus), "annotations": annotations, **kwargs})


def test_inputs_are_compared_resolved_however_spelled(corpus: Path, reference: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`corpus/images`, `./corpus/images/` and the absolute path are one input (and so for the annotations)."""
    monkeypatch.chdir(corpus.parent)
    out = tmp_path / "bank"
    with pytest.raises(KeyboardInterrupt):
        spelled(corpus, "corpus/images", "corpus/annotations.json", out, runner=stop_after(2, run_local))
    with pytest.raises(KeyboardInterrupt):
        spelled(corpus, "./corpus/images/", "./corpus//annotations.json", out, resume=True, runner=stop_after(1, run_local))
    resumed = spelled(corpus, str(corpus / "images"), str(corpus / "annotations.json"), out, resume=True)
    assert resumed.resumed_batches == 3 and file_hashes(out) == reference
    assert resumed.manifest["provenance"]["inputs"] == [str((corpus / "images").resolve())]
    assert spelled(corpus, "corpus/images/", "corpus/annotations.json", out, resume=True).already_built
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "corpus" / "images").mkdir(parents=True)
    for image in sorted((corpus / "images").iterdir())[:4]:
        (elsewhere / "corpus" / "images" / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(elsewhere)  # the same spelling from another folder: other images
    with pytest.raises(InputError, match=r"finished bank built from other inputs or options \(differs in: images\.count \(24 "
                                         r"before, 4 now\); images\.keys_sha256 \('\w+' before, '\w+' now\); inputs \(\['/\S+/corpus/"
                                         r"images'\] before, \['/\S+/elsewhere/corpus/images'\] now\)\)"):
        spelled(corpus, "corpus/images", str(corpus / "annotations.json"), out, resume=True, ignore_unmatched_annotations=True)


def test_builds_of_earlier_versions_spelled_as_typed_still_resume(corpus: Path, reference: dict[str, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Before issue 13 a build stored its paths as typed: relative ones that resolve here to this build's count as the same."""
    monkeypatch.chdir(corpus.parent)
    out = tmp_path / "bank"
    with pytest.raises(KeyboardInterrupt):
        spelled(corpus, "corpus/images", "corpus/annotations.json", out, runner=stop_after(2, run_local))
    state = json.loads((out / BUILD_DIR / "state.json").read_text())
    state["description"]["inputs"], state["description"]["detector"]["path"] = ["corpus/images"], "corpus/annotations.json"
    state["fingerprint"] = digest(state["description"])  # as the earlier version wrote it
    (out / BUILD_DIR / "state.json").write_text(json.dumps(state))
    assert spelled(corpus, "./corpus/images", str(corpus / "annotations.json"), out, resume=True).resumed_batches == 2
    assert file_hashes(out) == reference
    manifest = json.loads((out / "manifest.json").read_text())  # a finished bank of an earlier version
    manifest["provenance"] = {**state["description"], "fingerprint": state["fingerprint"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert spelled(corpus, "corpus/images/", "corpus/annotations.json", out, resume=True).already_built
    with pytest.raises(InputError, match=r"; inputs \(\['corpus/images'\] before, \['/\S+/corpus'\] now\)\)"):
        spelled(corpus, "corpus", "corpus/annotations.json", out, resume=True)
