# Two entry points: `make demo` and `make test`. Both install into $(VENV) first.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# CI and the dev machines use the local CPU wheel; on a GPU box use e.g. TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
DEMO      ?= cache/demo
# transformers==4.57.1, the official code's pin, configs only (no torch, ~1 min once): the suite reads
# the tiny checkpoint and a head-export of it with that version (tests/test_release_configs.py)
TF457     ?= .venv-tf457

.PHONY: install test demo lint clean-demo tf457

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

tf457: $(TF457)/.installed

$(TF457)/.installed:
	test -x $(TF457)/bin/python || $(PY) -m venv $(TF457)
	$(TF457)/bin/pip install -q "transformers==4.57.1"
	touch $@

test: install tf457
	ALPAMAYO_TF457_PYTHON=$(abspath $(TF457))/bin/python $(BIN)/python -m pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check shared cache_builder head_trainer tests bench

# End to end on the embedded default: tiny random-weight checkpoint + synthetic world.
demo: install
	bash scripts/demo.sh $(DEMO)

clean-demo:
	rm -rf $(DEMO)
