# Two commands for a fresh machine:  make demo   (set up + run the CPU demo)
#                                    make test   (set up + run every test)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; on a GPU machine use e.g. TORCH_SPEC='torch' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test unit setup clean-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orchestrate demo prepare --dir .demo
	$(VENV)/bin/orchestrate submit configs/demo.yaml
	@echo "orchestrate is installed in $(VENV): run 'source $(VENV)/bin/activate' to have it on your PATH"

# Everything: unit tests, real-torchrun integration tests and the SLURM tests (what CI runs;
# the SLURM ones skip with a reason unless SLURM_CONF points at a cluster: scripts/slurm-lab.sh).
test: $(STAMP)
	$(PY) -m pytest -v -m "integration or slurm or not integration"

# Only the fast unit tests (pytest's default selection).
unit: $(STAMP)
	$(PY) -m pytest
