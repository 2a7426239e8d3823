"""`build_bank_distributed`: the Ray build writes the local build's bank byte for byte, resumes (and is
resumed by) the local build, holds the bank's lock on the driver, carries worker errors back as cmcaug
errors, and refuses bad options.

One small local Ray (2 CPUs, no dashboard, no usage stats, private temp dir) serves the whole module,
because starting Ray takes seconds; the module is one xdist group so only one worker starts it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from bank_helpers import file_hashes, stop_after

from cmcaug.bank._folder import Folder
from cmcaug.bank._publish import bank_lock
from cmcaug.builder._state import BUILD_DIR
from cmcaug.builder.detect import UltralyticsDetector
from cmcaug.builder.distributed import RayRunner, build_bank_distributed
from cmcaug.builder.pipeline import build_bank, run_local
from cmcaug.cli.main import main
from cmcaug.errors import BankLockedError, InputError, MissingDependencyError
from cmcaug.synth import make_corpus

pytestmark = [
    pytest.mark.xdist_group("ray"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),  # Ray's own settings, not ours
]

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray", reason="Ray is the 'distributed' extra: pip install 'cmcaug[distributed]'")
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 107 characters
    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_ENV.items():
            env.setenv(name, value)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=128 << 20, _temp_dir=temp)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 shapes-world images plus an empty and a truncated file, so failure counts cross Ray too."""
    root = make_corpus(tmp_path_factory.mktemp("distributed") / "corpus", 32, seed=6, image_size=160).root
    good = (root / "images" / "000001.png").read_bytes()
    (root / "images" / "broken").mkdir()
    (root / "images" / "broken" / "empty.png").write_bytes(b"")
    (root / "images" / "broken" / "cut.png").write_bytes(good[: len(good) // 2])
    return root


def options(corpus: Path, **overrides: object) -> dict:
    return {"annotations": str(corpus / "annotations.json"), "vocab": str(corpus / "vocab.json"), "batch_size": 5,
            "min_box": 4, "max_per_concept": 6, "progress": False, **overrides}


def shard_count(out: Path) -> int:
    return len(list((out / BUILD_DIR / "shards").glob("*.npz")))


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict]:
    out = tmp_path_factory.mktemp("reference") / "bank"
    result = build_bank(corpus / "images", out, **options(corpus))
    return file_hashes(out), result.stats


def test_ray_bank_is_the_local_bank(cluster, corpus: Path, reference, tmp_path: Path) -> None:
    result = build_bank_distributed(corpus / "images", tmp_path / "bank", actors=1, **options(corpus))
    assert file_hashes(tmp_path / "bank") == reference[0] and result.stats == reference[1]
    assert result.stats["images"]["read"] == 34 and result.stats["images"]["failed"]["truncated"] == 1
    assert result.stats["images"]["failed"]["empty"] == 1 and result.stats["boxes"]["kept"] > 0


def test_resume_across_runners(cluster, corpus: Path, reference, tmp_path: Path) -> None:
    local_first = tmp_path / "local-first"
    with pytest.raises(KeyboardInterrupt):
        build_bank(corpus / "images", local_first, runner=stop_after(3, run_local), **options(corpus))
    assert shard_count(local_first) == 3 and not (local_first / "manifest.json").exists()
    resumed = build_bank_distributed(corpus / "images", local_first, resume=True, **options(corpus))
    assert resumed.resumed_batches == 3 and file_hashes(local_first) == reference[0]

    ray_first = tmp_path / "ray-first"
    with pytest.raises(KeyboardInterrupt):
        build_bank(corpus / "images", ray_first, runner=stop_after(2, RayRunner(actors=1)), **options(corpus))
    assert shard_count(ray_first) == 2 and not (ray_first / "manifest.json").exists()
    resumed = build_bank(corpus / "images", ray_first, resume=True, **options(corpus))
    assert resumed.resumed_batches == 2 and file_hashes(ray_first) == reference[0]
    again = build_bank_distributed(corpus / "images", ray_first, resume=True, **options(corpus))
    assert again.already_built and file_hashes(ray_first) == reference[0]


def test_the_driver_holds_the_bank_lock_for_the_whole_build(cluster, corpus: Path, reference, tmp_path: Path) -> None:
    """A second build of BANK while a Ray build runs is refused, and a Ray build of a locked BANK too."""
    out, on_ray = tmp_path / "bank", RayRunner(actors=1)

    def runner(job, batches):
        results = on_ray(job, batches)
        yield next(results)
        with pytest.raises(BankLockedError, match=f"is being written by another process .cmcaug build-bank, pid {os.getpid()} on"):
            build_bank(corpus / "images", out, resume=True, **options(corpus))
        yield from results

    build_bank(corpus / "images", out, runner=runner, **options(corpus))  # what build_bank_distributed runs
    assert file_hashes(out) == reference[0]
    with Folder.open(out) as bank, bank_lock(bank, "another build"):
        with pytest.raises(BankLockedError, match="another build, pid"):
            build_bank_distributed(corpus / "images", out, overwrite=True, **options(corpus))
    assert file_hashes(out) == reference[0]


def test_yolo_detector_and_embedder_made_per_actor(cluster, corpus: Path, tmp_path: Path) -> None:
    """A used YOLO model does not pickle: each actor makes its own from the detector's weights and options."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000001.png", "000002.png", "000003.png", "000004.png", "000005.png"):
        shutil.copy(corpus / "images" / name, images / name)
    detector = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=160, max_det=3, batch_size=2)
    yolo = {"detector": detector, "conf": 0.0, "embedder": "detector", "batch_size": 2, "progress": False}
    local = build_bank(images, tmp_path / "local", **yolo)
    build_bank_distributed(images, tmp_path / "ray", actors=1, **yolo)
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local") and local.stats["boxes"]["kept"] == 15
    # a yaml given by name, with YOLO settings, names and a crop mode: each actor makes it from the build's options
    (tmp_path / "names.txt").write_text("".join(f"c{i}\n" for i in range(80)))
    options = {"detector": "yolov8n.yaml", "conf": 0.0, "imgsz": 96, "iou": 0.6, "max_det": 2, "classes": ["c3", 0],
               "names": tmp_path / "names.txt", "crop": "tight", "batch_size": 2, "progress": False}
    local = build_bank(images, tmp_path / "local-yaml", **options)
    build_bank_distributed(images, tmp_path / "ray-yaml", actors=1, **options)
    assert file_hashes(tmp_path / "ray-yaml") == file_hashes(tmp_path / "local-yaml")
    assert local.manifest["provenance"]["detector"]["classes"] == [0, 3] and 0 < local.stats["boxes"]["kept"] <= 10


def test_cli_ray_flag_with_relative_paths(cluster, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Ray's workers started in another folder: relative inputs reach them as absolute paths, and the
    manifest records them resolved, like a local build's."""
    monkeypatch.chdir(corpus)
    args = ["images", "--annotations", "annotations.json", "--vocab", "vocab.json", "--batch-size", "5", "--min-box", "4",
            "--max-per-concept", "6"]
    assert main(["build-bank", *args, "-o", str(tmp_path / "local")]) == 0
    assert main(["build-bank", *args, "-o", str(tmp_path / "ray"), "--ray", "--ray-actors", "1"]) == 0
    assert "runner: ray (default)" in capsys.readouterr().out and file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")
    assert main(["build-bank", *args, "-o", str(tmp_path / "b2"), "--ray-gpus", "1"]) == 2
    assert "need --ray" in capsys.readouterr().err and not (tmp_path / "b2").exists()
    assert main(["build-bank", *args, "-o", str(tmp_path / "b3"), "--ray", "auto"]) == 3
    assert "already initialized" in capsys.readouterr().err


def test_worker_errors_arrive_as_cmcaug_errors(cluster, corpus: Path, tmp_path: Path) -> None:
    coco = json.loads((corpus / "annotations.json").read_text())
    first = coco["images"][0]
    del first["width"], first["height"]  # the box is then only checked against the decoded image, in a worker
    box = next(a for a in coco["annotations"] if a["image_id"] == first["id"])
    box["bbox"] = [500.0, 500.0, 10.0, 10.0]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    bad = options(corpus, annotations=str(tmp_path / "coco.json"))
    with pytest.raises(InputError, match="lies outside its 160x160 image") as local:
        build_bank(corpus / "images", tmp_path / "local", **bad)
    with pytest.raises(InputError, match="lies outside its 160x160 image") as remote:
        build_bank_distributed(corpus / "images", tmp_path / "ray", actors=1, **bad)
    assert str(remote.value) == str(local.value)
    with pytest.raises(InputError, match="has 0 GPUs"):
        build_bank_distributed(corpus / "images", tmp_path / "gpu", num_gpus_per_task=1, **options(corpus))
    with pytest.raises(InputError, match="already initialized"):
        build_bank_distributed(corpus / "images", tmp_path / "auto", address="auto", **options(corpus))
    with pytest.raises(InputError, match="exclude each other"):  # build_bank's own checks still apply
        build_bank_distributed(corpus / "images", tmp_path / "both", resume=True, overwrite=True, **options(corpus))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_cpus_per_task": 0}, "num_cpus_per_task must be > 0"),
    ({"num_gpus_per_task": -1}, "num_gpus_per_task must be >= 0"),
    ({"actors": 0}, "actors must be >= 1"),
    ({"address": " "}, "address must be None, 'auto', 'local'"),
    ({"patchsize": 32}, "unknown option.s. patchsize"),
    ({"runner": run_local}, "unknown option.s. runner"),
])
def test_bad_options(kwargs: dict, message: str, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=message):
        build_bank_distributed(corpus / "images", tmp_path / "bank", **options(corpus), **kwargs)
    assert not (tmp_path / "bank").exists()


def test_missing_ray_is_reported_before_any_work(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(MissingDependencyError, match=r"cmcaug\[distributed\]"):
        build_bank_distributed(corpus / "images", tmp_path / "bank", **options(corpus))
    assert not (tmp_path / "bank").exists()
