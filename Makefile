# Every target sets up .venv first (created when missing, re-installed when pyproject.toml is newer).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmcaug-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	YOLO_CONFIG_DIR=$(CURDIR)/demo/.yolo $(PY) -m cmcaug.demo demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf demo build *.egg-info .pytest_cache
