# Entry points for people and CI. `make demo` runs the main job, `make test` the tests;
# both set up .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on a CPU machine an unpinned torch would pull a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

LOCAL_EXPERIMENT := experiments/smollm2-ultrachat-local.yaml

.PHONY: setup demo test test-slow lint schema clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[local,azure,dev]'
	touch $@

demo: setup
	$(BIN)/automation run $(LOCAL_EXPERIMENT)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check automation tests bench
	$(BIN)/actionlint
	$(BIN)/zizmor --offline .github/workflows

schema: setup
	$(BIN)/automation schema

clean:
	rm -rf $(VENV) .automation
