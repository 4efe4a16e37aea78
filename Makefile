# Two commands for a fresh machine:  make demo   (set up + run the CPU demo)
#                                    make test   (set up + run every test)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; on a GPU machine use e.g. TORCH_SPEC='torch' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0

# The oldest transformers pyproject.toml supports (the first with TrainingArguments.activation_checkpointing,
# which the plan sets): CI also runs the script runner's tests against it, installed in front of the venv's
# newer one, nothing else changed (see test-transformers-low).
TRANSFORMERS_LOW ?= 5.23.0
LOW := $(VENV)/transformers-$(TRANSFORMERS_LOW)

.PHONY: demo test unit setup clean-demo test-transformers-low

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

# The script runner relies on transformers' private save methods: its tests at the low end of the range.
test-transformers-low: $(STAMP)
	test -d $(LOW) || $(PY) -m pip install -q --no-deps --target $(LOW) 'transformers==$(TRANSFORMERS_LOW)'
	PYTHONPATH=$(abspath $(LOW)) $(PY) -c 'import transformers as t; print("transformers", t.__version__, t.__file__)'
	PYTHONPATH=$(abspath $(LOW)) $(PY) -m pytest -v -m "integration or not integration" \
		tests/test_script_runner.py tests/test_script_integration.py -k "runner or dpo"
