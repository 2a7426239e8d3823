"""The README runs as written: every ```bash line and every ```python block, in README order, in one folder.

Shell lines run first (the command-line quickstart makes the corpus, banks and tags file the Python snippets
read), each with `bash -c` and the venv's `cmcaug` on PATH. A few lines cannot run inside a test; `SKIP` says
which and why. Python blocks then run one by one, each in a fresh namespace holding only the objects the
README leaves to the reader (your tokenizer, model, encoders, images: `stand_ins`), small real ones built
here. `yolov8n.pt` is a randomly initialized `yolov8n.yaml` saved in the folder (weights are never downloaded).
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
SKIP = {  # the start of a shell line: why it does not run here
    "make ": "the set-up itself: `make test` is this suite",
    "bash benchmarks/gpu_session.sh": "needs a GPU machine",
    "cmcaug bench  ": "every benchmark at full size: minutes; their --smoke runs are in test_benchmarks.py",
    "cmcaug bench --smoke": "every benchmark's --smoke run is a test of its own in test_benchmarks.py",
}

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme"),
              pytest.mark.filterwarnings("ignore:This DataLoader will create")]  # the quickstart's 4 workers, 2 cores


def blocks(language: str) -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 2, m.group(2)) for m in BLOCK.finditer(text) if m.group(1) == language]


def skipped(line: str) -> str | None:
    return next((why for start, why in SKIP.items() if (line + " ").startswith(start)), None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's folder, after every shell line of the README has run in it."""
    from ultralytics import YOLO

    here = tmp_path_factory.mktemp("readme")
    YOLO("yolov8n.yaml").save(str(here / "yolov8n.pt"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for first, block in blocks("bash"):
        for offset, line in enumerate(block.splitlines()):
            if not line.strip() or skipped(line.strip()):
                continue
            done = subprocess.run(["bash", "-c", line], cwd=here, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"README.md:{first + offset}: {line}\n{done.stderr[-3000:]}"
    return here


def test_every_shell_line_runs_or_says_why_not(folder: Path) -> None:
    lines = [line.strip() for _, block in blocks("bash") for line in block.splitlines() if line.strip()]
    assert sum(skipped(line) is None for line in lines) >= 10
    assert {"bank", "tags.parquet", "views.html", "timix.webp", "crops.jpg"} <= {p.name for p in folder.iterdir()}


@pytest.mark.parametrize(("first", "code"), blocks("python"), ids=[f"README.md:{n}" for n, _ in blocks("python")])
def test_python_block_runs(first: int, code: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    namespace = stand_ins(folder)
    exec(compile(code, f"README.md:{first}", "exec"), namespace)


def stand_ins(folder: Path) -> dict[str, Any]:
    """What the README's snippets take from the reader, small and real, on this machine's device."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    words = sorted({w for line in (folder / "corpus" / "captions.jsonl").read_text().lower().splitlines()
                    for w in re.findall(r"[a-z]+", line)} | {"two", "dogs", "chase", "red", "frisbee"})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]) + "\n")
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{key: str(vocab)}, do_lower_case=True)
    width, k, patch = 32, 1, 64
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)).to(device)

    def encoder(tokens: int, side: int) -> torch.nn.Module:  # uint8-patch images -> [M, tokens, width]
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, tokens * width),
                                   torch.nn.Unflatten(1, (tokens, width))).to(device)

    clip_image = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, width))
    images = torch.rand(4, 3, 224, 224)
    return {
        # the command-line quickstart's training loop
        "tokenizer": tokenizer, "K": k, "model": model, "patch_encoder": encoder(k, patch), "device": device,
        "epochs": 1, "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28),
        # the splice kernel
        "input_ids": torch.zeros(2, 6, dtype=torch.int64),
        "pixels": torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, device=device),
        "CLIP_MEAN": (0.481, 0.458, 0.408), "CLIP_STD": (0.269, 0.261, 0.276), "encoder": encoder(4, 16),
        "text_emb": torch.randn(2, 6, width, device=device), "labels": torch.randint(0, 50, (2, 6), device=device),
        # TiMix, MixGen and the relevance head
        "images": images, "captions": ["a red star", "two blue hearts", "a cross", "a green circle"],
        "patch_features": torch.randn(4, 196, 768), "text_cls": torch.randn(4, 768),
        "clean_img_feats": torch.randn(4, width), "text_feats": torch.randn(4, width),
        "clip_model": type("CLIP", (), {"encode_image": staticmethod(clip_image)})(),
        "grounding_loader": [(images[:2], [torch.tensor([[10.0, 10, 100, 100]]), torch.tensor([[50.0, 60, 200, 220]])],
                              ["a red star", "two blue hearts"])],
        "vit": lambda x: torch.randn(len(x), 197, 768), "text_encoder": lambda texts: torch.randn(len(texts), 8, 768),
    }
