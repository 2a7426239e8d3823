# Every target sets up .venv first (created when missing, re-installed when pyproject.toml is newer).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmcaug-installed
CMCAUG := YOLO_CONFIG_DIR=$(CURDIR)/demo/.yolo $(VENV)/bin/cmcaug
TORCH  := torch==2.14.1 torchvision==0.29.1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job on built-in data: a generated shapes-world corpus -> patch bank -> summary -> preview image.
demo: $(STAMP)
	$(CMCAUG) synth demo/corpus --images 200 --seed 0 --overwrite
	$(CMCAUG) build-bank demo/corpus/images -o demo/bank --annotations demo/corpus/annotations.json \
		--vocab demo/corpus/vocab.json --overwrite
	$(CMCAUG) inspect demo/bank
	$(CMCAUG) preview demo/bank -o demo/bank-preview.png
	$(CMCAUG) preview --timix demo/corpus -o demo/timix-preview.png
	$(CMCAUG) tag-text demo/corpus/captions.jsonl -o demo/tags.parquet --bank demo/bank
	$(CMCAUG) preview demo/bank --captions demo/tags.parquet -o demo/cmc-views.html
	@echo "demo: bank in demo/bank, patches in demo/bank-preview.png, caption tags in demo/tags.parquet," \
		"cross-modal CutMix views in demo/cmc-views.html, TiMix mixes in demo/timix-preview.png"

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf demo build *.egg-info .pytest_cache
