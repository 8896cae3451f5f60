# `make train` and `make test` set themselves up on a fresh machine:
# they create .venv, install dpcnn with its extras into it, then run.
VENV    ?= .venv
PYTHON  ?= python3
NP      ?= 4
ARGS    ?=
PYTEST_ARGS ?=
PY      := $(VENV)/bin/python
# One BLAS thread per rank: ranks share the cores, BLAS threads would fight them.
export OMP_NUM_THREADS      ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS      ?= 1

.PHONY: install train test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: install
	$(VENV)/bin/mpirun -n $(NP) $(PY) -m dpcnn.train $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache outputs multirun
