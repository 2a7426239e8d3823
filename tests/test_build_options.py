"""`BuildOptions` and `RayOptions`: each build option's type, default and range are defined once, and
`build_bank`, `build_bank_distributed` and `cmcaug build-bank` all take them from there."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from import_helpers import assert_loads_none_of

from cmcaug.builder.detect import UltralyticsDetector
from cmcaug.builder.distributed import build_bank_distributed
from cmcaug.builder.options import (CROPS, DEFAULT_CONF, DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET, EMBEDDERS, BuildOptions,
                                    RayOptions, Rule, resolve_conf)
from cmcaug.builder.pipeline import build_bank
from cmcaug.cli.main import build_parser
from cmcaug.errors import InputError

FLAGS = {"patch_size": "--patch-size", "min_box": "--min-box", "conf": "--conf", "max_per_concept": "--max-per-concept",
         "batch_size": "--batch-size", "workers": "--workers", "max_file_bytes": "--max-file-bytes", "imgsz": "--imgsz",
         "iou": "--iou", "max_det": "--max-det",
         "num_cpus_per_task": "--ray-cpus", "num_gpus_per_task": "--ray-gpus", "actors": "--ray-actors"}
DESTS = {"num_cpus_per_task": "ray_cpus", "num_gpus_per_task": "ray_gpus", "actors": "ray_actors"}  # the rest: the option's name


def ranged() -> list[tuple[type, str, Rule]]:
    return [(cls, f.name, f.metadata["rule"]) for cls in (BuildOptions, RayOptions) for f in dataclasses.fields(cls)
            if f.metadata.get("rule") is not None and f.metadata["rule"].low is not None]


def bounds() -> list[tuple[type, str, int | float, int | float]]:
    """(options class, option, the value at a bound that is still accepted, the nearest value refused) for
    each end of each range."""
    cases = []
    for cls, name, rule in ranged():
        step = 1 if rule.kind is int else 0.5
        ends = [(rule.low + step, rule.low) if rule.above else (rule.low, rule.low - step)]
        if rule.high is not None:
            ends.append((rule.high, rule.high + step))
        cases += [(cls, name, rule.kind(inside), rule.kind(outside)) for inside, outside in ends]
    return cases


def parse(*flags: str):
    return build_parser().parse_args(["build-bank", "images", "-o", "bank", "--annotations", "coco.json", *flags])


def test_every_ranged_option_is_a_flag() -> None:
    assert {name for _, name, _ in ranged()} == set(FLAGS)


@pytest.mark.parametrize(("cls", "name", "inside", "outside"), bounds(), ids=lambda v: v if isinstance(v, str) else None)
def test_python_and_the_cli_refuse_each_bound_in_the_same_words(cls: type, name: str, inside: float, outside: float,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = build_bank if cls is BuildOptions else build_bank_distributed
    with pytest.raises(InputError) as python:  # refused before the inputs are even listed
        build(tmp_path / "images", tmp_path / "bank", annotations=tmp_path / "coco.json", **{name: outside})
    assert str(python.value).startswith(f"{name} must ") and not (tmp_path / "bank").exists()
    with pytest.raises(SystemExit) as cli:
        parse(FLAGS[name], str(outside))
    words = str(python.value).removeprefix(f"{name} ")
    assert cli.value.code == 2 and f"argument {FLAGS[name]}: {words}\n" in capsys.readouterr().err
    assert getattr(cls(**{name: inside}), name) == inside == getattr(parse(FLAGS[name], str(inside)), DESTS.get(name, name))


def test_the_wording_users_know() -> None:
    for kwargs, message in [({"patch_size": 4}, "patch_size must be >= 8, got 4"), ({"conf": float("nan")}, r"conf must lie in \[0, 1\], got nan"),
                            ({"embedder": "clip"}, "unknown embedder 'clip'; choose one of pixels, detector"),
                            ({"resume": True, "overwrite": True}, "resume and overwrite exclude each other")]:
        with pytest.raises(InputError, match=message):
            BuildOptions(**kwargs)
    with pytest.raises(InputError, match="num_cpus_per_task must be > 0, got 0"):
        RayOptions(num_cpus_per_task=0)


def test_the_cli_takes_choices_and_defaults_from_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert EMBEDDERS == BuildOptions.rule("embedder").choices and all(parse("--embedder", e).embedder == e for e in EMBEDDERS)
    assert CROPS == BuildOptions.rule("crop").choices and all(parse("--crop", c).crop == c for c in CROPS)
    with pytest.raises(SystemExit) as refused:
        parse("--embedder", "clip")
    assert refused.value.code == 2 and "argument --embedder: invalid choice: 'clip'" in capsys.readouterr().err
    args, defaults = parse(), BuildOptions()
    for name in ("patch_size", "min_box", "max_per_concept", "embedder", "batch_size", "workers", "seed", "max_file_bytes", "crop",
                 "imgsz", "iou", "max_det", "classes", "names", "device"):
        assert getattr(args, name) == getattr(defaults, name)
    assert (args.ray_cpus, args.ray_gpus, args.ray_actors) == dataclasses.astuple(RayOptions())
    assert args.conf is None and defaults.conf == DEFAULT_CONF  # None: build_bank resolves it (resolve_conf)


def test_build_bank_takes_its_defaults_from_the_options() -> None:
    parameters, defaults = inspect.signature(build_bank).parameters, BuildOptions()
    for f in dataclasses.fields(BuildOptions):
        if f.name != "conf":
            assert parameters[f.name].default == getattr(defaults, f.name), f.name
    assert parameters["conf"].default is None and parameters["min_box"].default == 16  # the signature as it always was
    ray = inspect.signature(build_bank_distributed).parameters
    assert tuple(ray[f.name].default for f in dataclasses.fields(RayOptions)) == dataclasses.astuple(RayOptions())


def test_options_are_frozen_keyword_only_and_converted() -> None:
    options = BuildOptions(patch_size=32.0, min_box=4, conf=1, max_per_concept=3, batch_size=5, seed=7, workers=2, device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.patch_size = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RayOptions().actors = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        BuildOptions(64)  # type: ignore[misc]
    assert isinstance(options.patch_size, int) and isinstance(options.min_box, float) and isinstance(options.conf, float)
    # what a resume compares, as state.json and the manifest store it (max_file_bytes since issue 12)
    assert json.dumps(options.fingerprinted(), sort_keys=True) == (
        '{"batch_size": 5, "conf": 1.0, "max_file_bytes": 268435456, "max_per_concept": 3, "max_pixels": 89478485, '
        '"min_box": 4.0, "patch_size": 32, "seed": 7}')
    # crop (issue 13) is recorded only when it is not "square", every earlier bank's crop: their fingerprints hold
    assert dataclasses.replace(options, crop="square").fingerprinted() == options.fingerprinted()
    assert dataclasses.replace(options, crop="tight").fingerprinted() == {**options.fingerprinted(), "crop": "tight"}
    # the YOLO settings are compared through the detector's description, which records the values in force
    yolo = BuildOptions(imgsz=320, iou=0.5, max_det=10, classes=["person", 16], names=[f"c{i}" for i in range(3)], device="cpu")
    assert yolo.fingerprinted() == BuildOptions().fingerprinted() and yolo.classes == ("person", 16)
    assert yolo.detector_settings() == {"device": "cpu", "imgsz": 320, "iou": 0.5, "max_det": 10, "classes": ("person", 16),
                                        "names": ("c0", "c1", "c2")}
    assert BuildOptions().detector_settings() == {}
    for bad in ("person", [], 3):
        with pytest.raises(InputError, match="classes must be a non-empty list"):
            BuildOptions(classes=bad)


def test_each_option_for_one_box_source_is_refused_with_another() -> None:
    for detector, annotations in ((None, None), ("yolov8n.yaml", "coco.json")):
        with pytest.raises(InputError, match="pass exactly one box source"):
            BuildOptions().check_source(detector, annotations)
    yolo_only = {"device": "cpu", "imgsz": 320, "iou": 0.0, "max_det": 9, "classes": ["dog"], "names": ["a"]}  # 0 is set
    for name, value in yolo_only.items():
        options = BuildOptions(**{name: value})
        options.check_source("yolov8n.yaml", None)
        options.check_source(Path("best.pt"), None)
        for detector, annotations in ((None, "coco.json"), (object(), None)):  # annotations, a Detector object
            with pytest.raises(InputError, match=f"^{name}=.* is for a YOLO detector given as weights or a yaml"):
                options.check_source(detector, annotations)
    for name in ("strict", "ignore_unmatched_annotations"):
        BuildOptions(**{name: True}).check_source(None, "coco.json")
        with pytest.raises(InputError, match=f"^{name} \\(--{name.replace('_', '-')}\\) is for annotations"):
            BuildOptions(**{name: True}).check_source("yolov8n.yaml", None)


def test_yolo_defaults_are_ultralytics_own() -> None:
    """None runs YOLO as ultralytics would, so a build from before these options existed keeps its boxes."""
    from ultralytics.utils import DEFAULT_CFG

    ours = (DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET)
    assert ours == (DEFAULT_CFG.imgsz, DEFAULT_CFG.iou, DEFAULT_CFG.max_det) == (640, 0.7, 300)
    defaults = inspect.signature(UltralyticsDetector).parameters
    assert (defaults["imgsz"].default, defaults["iou"].default, defaults["max_det"].default) == (640, 0.7, 300)
    assert defaults["conf"].default == DEFAULT_CONF


def test_conf_defaults_to_the_detectors_own() -> None:
    detector = UltralyticsDetector("yolov8n.yaml", conf=0.0001)
    assert resolve_conf(None, detector) == 0.0001 and resolve_conf(0.5, detector) == 0.5
    assert resolve_conf(None, "yolov8n.yaml") == resolve_conf(None, lambda: detector) == DEFAULT_CONF == 0.25


def test_the_cli_parses_options_without_loading_numpy() -> None:
    """The options module is what the parser needs; the numeric libraries load only when a build runs."""
    assert_loads_none_of(("numpy", "PIL", "torch"), (
        "import argparse; from cmcaug.cli import build_bank as cli; parser = argparse.ArgumentParser(); "
        "cli.register(parser.add_subparsers()); parser.parse_args(['build-bank', 'x', '-o', 'y', '--annotations', 'a', "
        "'--patch-size', '32', '--conf', '0.5', '--ray-cpus', '2', '--embedder', 'detector', '--crop', 'pad-mean', "
        "'--imgsz', '320', '--classes', 'person,dog'])"))
