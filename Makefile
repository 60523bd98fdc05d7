# Two entry points: `make demo` and `make test`. Both install into $(VENV) first.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# CI and the dev machines use the local CPU wheel; on a GPU box use e.g. TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
DEMO      ?= cache/demo

.PHONY: install test demo lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check shared cache_builder head_trainer tests bench

# End to end on the embedded default: tiny random-weight checkpoint + synthetic world.
demo: install
	bash scripts/demo.sh $(DEMO)

clean-demo:
	rm -rf $(DEMO)
