# effdstl — two commands set everything up:  `make demo` (the offline Fig. 5 study on digits)
# and `make test`.  The venv is created here; nothing else needs installing by hand.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv test test-fast demo demo-cifar10 findings bench slurm-start slurm-stop clean-results

help:
	@echo "make demo         offline Fig. 5 replacement study on digits (CPU, under a minute)"
	@echo "make test         the full test suite (starts a local Slurm cluster when it can)"
	@echo "make test-fast    tests without Slurm"
	@echo "make findings     every small-data study (digits, CIFAR-10 1k/class) and docs/FINDINGS.md (2 CPU cores, ~80 min)"
	@echo "                  DATASET=npz:data/cifar10.npz runs the CIFAR-10 ones on a local copy"
	@echo "make bench        effdstl bench on this machine's device"
	@echo "make slurm-start  a real one-node Slurm cluster on localhost (root, Debian)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	bash scripts/run-tests.sh $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slurm" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/effdstl demo

# the report of what the studies show: trains what is not done yet (run hashes), then writes
# docs/FINDINGS.md and docs/findings/ from the runs; not part of `make test`
DATASET ?=
findings: $(STAMP)
	$(BIN)/python scripts/findings.py $(if $(DATASET),--dataset $(DATASET),)

bench: $(STAMP)
	$(BIN)/effdstl bench

slurm-start:
	bash scripts/local-slurm.sh start

slurm-stop:
	bash scripts/local-slurm.sh stop

clean-results:
	rm -rf results/*/
