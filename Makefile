# Quick start: `make demo` and `make test` work on a fresh machine with python3 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SYNTH := data/synthetic
DEMO_WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean-demo

venv: $(STAMP)

# Rebuilt only when the package metadata or the pinned versions change.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,torch]'
	touch $(STAMP)

$(SYNTH)/.complete: $(STAMP) input_pipeline/synthetic.py
	$(BIN)/python -m input_pipeline.synthetic --out $(SYNTH)

demo: $(STAMP) $(SYNTH)/.complete
	$(BIN)/python -m reid_jax.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR) \
	  --config.data_dir=$(SYNTH)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS) tests

# Smoke runs of the speed benchmarks (--quick: minutes in all, not the figures of
# BENCHMARKS.md; run each script without --quick on an idle machine for those).
bench: $(STAMP)
	$(BIN)/python benchmarks/input_throughput.py --quick
	$(BIN)/python benchmarks/loop_overhead.py --quick
	$(BIN)/python benchmarks/train_throughput.py --quick

clean-demo:
	rm -rf $(DEMO_WORKDIR)
