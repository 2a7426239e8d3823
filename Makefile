# Every target sets up .venv first: created when missing, re-installed when pyproject.toml, this Makefile or
# the pins change. The pins (constraints.txt) are the exact versions the whole suite passed with, so a new
# release of any dependency cannot change a result or turn CI red; `make lock` moves them on purpose.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmcaug-installed
LOCK   := constraints.txt
CMCAUG := YOLO_CONFIG_DIR=$(CURDIR)/demo/.yolo $(VENV)/bin/cmcaug
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0

.PHONY: setup demo test bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) -m pip check
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

# The pytest script, not `python -m pytest`: the checkout root stays off sys.path (README, Development).
test: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadgroup -q

# Results go to ./cmcaug-bench-results; `make bench OUT=benchmarks/results` refreshes the committed ones.
OUT ?= cmcaug-bench-results
bench: $(STAMP)
	$(VENV)/bin/cmcaug bench --out $(OUT)

# Refresh the pins deliberately: resolve the newest releases pyproject.toml allows in a fresh venv, write them
# to constraints.txt, then rebuild .venv from the new pins and run the whole suite against them. Review the
# diff of constraints.txt and commit it only when the suite is green.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Exact versions the suite passed with (make lock; Python 3.11, x86_64 Linux). Used as pip -c by make."; \
	  $(VENV)-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV)-lock $(VENV)
	$(MAKE) test

clean:
	rm -rf demo build *.egg-info .pytest_cache cmcaug-bench-results $(VENV)-lock
