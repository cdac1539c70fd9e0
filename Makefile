# The two commands of the README. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist_demo

.PHONY: test demo benchmark report accelerator-check install install-data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian's copy of the original Fashion-MNIST IDX files (offline, real data).
install-data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

# The tests spend most of their time compiling tiny programs: XLA:CPU's LLVM
# optimisation off makes that ~3x faster (the whole run ~25 % shorter) with the
# same float semantics. Put before the caller's XLA_FLAGS, which win.
TEST_XLA_FLAGS = --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true

test: install
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadfile

demo: install install-data
	$(PY) -m experiments.fashion_mnist --eps=0.1 --workdir=$(WORKDIR)

benchmark: install
	$(PY) -m experiments.benchmark

report: install
	$(PY) -m experiments.report

# On a GPU/TPU machine: tests, device-vs-CPU certificates, precision census and
# step timings into docs/performance.md (experiments/accelerator_check.py).
# PY=python3 uses an interpreter that already has JAX (no venv, no network);
# CHECK_FLAGS=--dry_run runs it on the CPU at tiny shapes.
accelerator-check: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) -m experiments.accelerator_check $(CHECK_FLAGS)

clean:
	rm -rf $(VENV) runs
