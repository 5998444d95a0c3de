# Two commands on a fresh machine, each setting up what it needs first in the
# environment of $(PYTHON), whatever it is (torch's CPU build where no torch is installed,
# an installed torch used as it is; then this package, editable, with the job's extras).
# scripts/ensure-deps says which interpreter and environment that is and what it installs:
#
#   make demo    the main job: fine-tune a built-in ResNet with frozen BatchNorm,
#                compiled without and with the pass, and compare
#   make test    the test suite, as CI runs it: JOBS pytest-xdist workers (default 2),
#                one file's tests on one worker, one OpenMP thread each
#
# PYTHON=... picks the interpreter (default python3); TORCH_INSTALL=... what to install
# where torch is missing (default torch==2.13.0, the CPU build on this project's machines;
# elsewhere e.g. TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu").

PYTHON ?= python3
PYTEST_ARGS ?=
JOBS ?= 2
export PYTHON

.PHONY: demo test

demo:
	@scripts/ensure-deps examples
	$(PYTHON) examples/finetune.py

test:
	@scripts/ensure-deps test,bench,examples
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -q -n $(JOBS) --dist loadfile $(PYTEST_ARGS)
