"""`cmcaug build-bank`: the real CLI end to end (annotations and YOLO paths), exit codes and help."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bank_helpers import file_hashes

from cmcaug.bank.reader import PatchBank
from cmcaug.builder.pipeline import build_bank
from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.synth import make_corpus

CLI = [sys.executable, "-m", "cmcaug.cli.main", "build-bank"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("cli") / "corpus", 12, seed=4, image_size=128).root


def test_cli_annotations_equals_python_api(corpus: Path, tmp_path: Path) -> None:
    args = [str(corpus), "-o", str(tmp_path / "cli"), "--annotations", str(corpus / "annotations.json"),
            "--vocab", str(corpus / "vocab.json"), "--patch-size", "32", "--min-box", "8", "--max-per-concept", "3",
            "--batch-size", "5", "--workers", "2", "--seed", "3"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in ("images read", "failed: truncated", "boxes kept", "dropped: max_per_concept", "circle", "images/s"):
        assert text in done.stdout
    assert "build-bank" in done.stderr  # the progress bar
    build_bank([str(corpus)], tmp_path / "api", annotations=str(corpus / "annotations.json"), vocab=str(corpus / "vocab.json"),
               patch_size=32, min_box=8, max_per_concept=3, batch_size=5, workers=0, seed=3, progress=False)
    assert file_hashes(tmp_path / "cli") == file_hashes(tmp_path / "api")
    assert PatchBank.open(tmp_path / "cli").patch_size == 32


def test_cli_yolo_yaml_with_detector_embedder(corpus: Path, tmp_path: Path) -> None:
    images = tmp_path / "few"
    images.mkdir()
    for name in ("000001.png", "000002.png", "000003.png"):
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    args = [str(images), "-o", str(tmp_path / "bank"), "--detector", "yolov8n.yaml", "--conf", "0", "--min-box", "32",
            "--max-per-concept", "4", "--embedder", "detector", "--batch-size", "2"]
    offline = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp_path / "yolo-settings")}
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=offline, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob("*.pt"))  # a random-weights model from its yaml: nothing downloaded
    bank = PatchBank.open(tmp_path / "bank")
    assert 0 < len(bank) <= 4 * len(bank.vocab) and bank.manifest["provenance"]["detector"]["weights"] == "yolov8n.yaml"
    assert bank.manifest["stats"]["boxes"]["found"] > len(bank)


def test_yolo_yaml_with_the_default_vocabulary_and_yolo_settings(corpus: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """yolov8n.yaml's classes are COCO's, so --vocab default matches them; --imgsz, --iou, --max-det, --classes
    reach the detector and the manifest, and --crop the patches."""
    images = tmp_path / "few"
    images.mkdir()
    for name in ("000001.png", "000002.png"):
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    args = ["build-bank", str(images), "-o", str(tmp_path / "bank"), "--detector", "yolov8n.yaml", "--vocab", "default",
            "--conf", "0", "--min-box", "4", "--imgsz", "96", "--iou", "0.5", "--max-det", "4", "--classes", "person,car, 16",
            "--crop", "pad-mean", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    bank = PatchBank.open(tmp_path / "bank")
    provenance = bank.manifest["provenance"]
    assert bank.vocab.names == ConceptVocab.default().names and provenance["options"]["crop"] == "pad-mean"
    assert {k: provenance["detector"][k] for k in ("imgsz", "iou", "max_det", "classes")} == {
        "imgsz": 96, "iou": 0.5, "max_det": 4, "classes": [0, 2, 16]}
    kept = bank.manifest["stats"]["patches_per_concept"]
    assert 0 < sum(kept.values()) <= 8 and set(n for n, c in kept.items() if c) <= {"person", "car", "dog"}
    assert main([*args[:-1], "--imgsz", "128", "--resume"]) == 3  # other boxes: refused, naming the setting
    assert "differs in: detector.imgsz (96 before, 128 now)" in capsys.readouterr().err


def test_exit_codes(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["build-bank", str(corpus / "images"), "--annotations", str(corpus / "annotations.json")]
    assert main([*base, "-o", str(tmp_path / "bank"), "--batch-size", "4", "--no-progress"]) == 0
    assert "build-bank" not in capsys.readouterr().err  # no progress bar
    assert main([*base, "-o", str(tmp_path / "bank")]) == 3  # exists, no --resume / --overwrite
    assert "already holds a bank" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["build-bank", str(tmp_path / "empty"), "-o", str(tmp_path / "b2"), "--annotations", str(corpus / "annotations.json")]) == 3
    assert main(["build-bank", str(corpus / "images"), "-o", str(tmp_path / "b3"), "--detector", str(tmp_path / "no.pt")]) == 3
    (tmp_path / "bank" / "manifest.json").write_text("{damaged")
    assert main([*base, "-o", str(tmp_path / "bank"), "--batch-size", "4", "--resume"]) == 4
    assert "unreadable manifest" in capsys.readouterr().err
    for usage in (["--resume", "--overwrite"], ["--detector", "yolov8n.yaml"], ["--embedder", "clip"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, "-o", str(tmp_path / "b4"), *usage])
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["build-bank", "--help"])
    help_text = capsys.readouterr().out
    assert exc.value.code == 0 and "exit codes:" in help_text
    assert "\n  6    BANK is being written by another build" in help_text and "\n  7    the file system refused a write" in help_text


def test_bad_annotations_exit_3_with_a_message(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def with_coco(change) -> tuple[int, str]:
        coco = json.loads((corpus / "annotations.json").read_text())
        change(coco)
        path = tmp_path / "coco.json"
        path.write_text(json.dumps(coco))
        code = main(["build-bank", str(corpus / "images"), "-o", str(tmp_path / "bank"), "--annotations", str(path)])
        return code, capsys.readouterr().err

    def outside(coco: dict) -> None:
        coco["annotations"][0]["bbox"] = [1000, 1000, 5, 5]

    def missing_image(coco: dict) -> None:
        coco["images"].append({"id": 999, "file_name": "gone.png", "width": 128, "height": 128})
        coco["annotations"].append({**coco["annotations"][0], "id": 999, "image_id": 999})

    def unknown_category(coco: dict) -> None:
        coco["annotations"][0]["category_id"] = 999

    for change, message in [(outside, "lies outside its 128x128 image"),
                            (missing_image, "not among the inputs, e.g. ['gone.png']; pass the folder that holds them, remove their "
                                            "annotations, or pass --ignore-unmatched-annotations"),
                            (unknown_category, "category_id 999, which is not among the file's categories")]:
        code, err = with_coco(change)
        assert code == 3 and err.startswith("cmcaug build-bank: error: ") and message in err, err
    assert not (tmp_path / "bank").exists()  # refused before anything was written


def test_empty_bank_warns_once_after_the_summary(corpus: Path, tmp_path: Path) -> None:
    """The library logs the warning; the CLI holds that record back and prints the warning once, last."""
    args = [str(corpus / "images"), "-o", str(tmp_path / "bank"), "--annotations", str(corpus / "annotations.json"),
            "--min-box", "10000", "--no-progress"]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in `... 2>&1 | tee`
    done = subprocess.run([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, env=buffered)
    assert done.returncode == 0, done.stdout[-2000:]  # an empty bank is still a valid bank
    assert "status: built" in done.stdout and "patches: 0" in done.stdout
    assert done.stdout.count("the bank holds 0 patches") == 1 and "dropped small" in done.stdout
    last_table = done.stdout.rindex("concept")
    assert done.stdout.index("cmcaug build-bank: warning: the bank holds 0 patches") > last_table


@pytest.mark.parametrize(("flags", "message"), [
    (["--patch-size", "4"], "argument --patch-size: must be >= 8, got 4"),
    (["--conf", "1.5"], "argument --conf: must lie in [0, 1], got 1.5"),
    (["--min-box", "nan"], "argument --min-box: must be >= 0, got nan"),
    (["--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (["--ray", "--ray-cpus", "0"], "argument --ray-cpus: must be > 0, got 0.0"),
    (["--ray", "--ray-actors", "0"], "argument --ray-actors: must be >= 1, got 0"),
])
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(flags: list[str], message: str, corpus: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build-bank", str(corpus / "images"), "-o", str(tmp_path / "bank"), "--annotations", str(corpus / "annotations.json"),
              *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "bank").exists()


def test_flags_that_need_another_flag(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = ["--annotations", str(corpus / "annotations.json")]
    misplaced = [([*coco, flag, value], f"{flag} is a YOLO setting, so it needs --detector (--annotations runs no model)")
                 for flag, value in (("--device", "cpu"), ("--imgsz", "320"), ("--iou", "0"), ("--max-det", "5"),
                                     ("--classes", "person"), ("--names", "names.txt"))]
    misplaced += [(["--detector", "yolov8n.yaml", flag], f"{flag} needs --annotations")
                  for flag in ("--ignore-unmatched-annotations", "--strict")]
    for flags, message in misplaced:
        assert main(["build-bank", str(corpus / "images"), "-o", str(tmp_path / "bank"), *flags]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bank").exists()


def test_ignore_unmatched_annotations(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000001.png", "000002.png", "000003.png"):
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    args = ["build-bank", str(images), "-o", str(tmp_path / "bank"), "--annotations", str(corpus / "annotations.json"), "--no-progress"]
    assert main(args) == 3
    assert "annotates 9 image(s) that are not among the inputs" in capsys.readouterr().err
    assert main([*args, "--ignore-unmatched-annotations"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"annotated images not among the inputs +9\n", out) and "images read" in out
    assert PatchBank.open(tmp_path / "bank").manifest["stats"]["images"]["annotated_not_among_inputs"] == 9


def test_device_cpu_and_a_device_this_machine_lacks(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "few"
    images.mkdir()
    for name in ("000001.png", "000002.png"):
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    yolo = ["build-bank", str(images), "--detector", "yolov8n.yaml", "--conf", "0", "--min-box", "32", "--batch-size", "2",
            "--no-progress"]
    assert main([*yolo, "-o", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert "status: built" in capsys.readouterr().out and len(PatchBank.open(tmp_path / "cpu")) > 0
    assert main([*yolo, "-o", str(tmp_path / "gpu"), "--device", "cuda:99"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("cmcaug build-bank: error: device 'cuda:99' is not usable on this machine") and "pass 'cpu'" in err
    assert not (tmp_path / "gpu").exists()


@pytest.mark.xdist_group("ray")  # never beside test_distributed's cluster, which 'auto' would join
def test_ray_auto_without_a_cluster_exits_3_before_writing(corpus: Path, tmp_path: Path) -> None:
    """--ray auto with no cluster: exit 3 with a hint and no BANK/.build left behind."""
    services = pytest.importorskip("ray._private.services", reason="Ray is the 'distributed' extra")
    if services.find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine, so --ray auto would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp_path)}
    args = [str(corpus / "images"), "-o", str(tmp_path / "rayb"), "--annotations", str(corpus / "annotations.json"), "--ray", "auto"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "could not connect to Ray at address=auto" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "rayb").exists()


def test_a_detector_embedder_without_a_detector_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cmcaug.cli.main import main

    code = main(["build-bank", str(tmp_path), "-o", str(tmp_path / "bank"), "--annotations", "a.json",
                 "--embedder", "detector"])
    assert code == 2 and "cmcaug build-bank: error: --embedder detector pools" in capsys.readouterr().err
