# The README's two commands: `make demo` and `make test`.
# Both build .venv from nothing. torch is installed first and pinned: an
# unpinned torch pulls a multi-GB CUDA build on a CPU machine. The venv is made
# without pip (ensurepip alone took 4.9 s of a 21.5 s install), the system's
# pip puts uv into it, and uv installs torch and then the
# dependencies, several times faster than pip (benchmarks/newcomer.sh). uv reads
# no pip configuration, so the places pip is told to find wheels in (a machine's
# local torch build) are handed to it. Where that fails, or with `make demo UV=`,
# the venv gets pip and pip installs everything as before.
# Python writes each module's bytecode at its first import here, whatever the shell says: the install skips
# compiling the ~2000 files of torch (20 s of the 27 s its install took), and a process then compiles only
# what it imports, once. With PYTHONDONTWRITEBYTECODE set, every process compiled them all again: import
# torch 3.0 s against 1.5 s, and the demo and the tests start dozens of processes (benchmarks/newcomer.sh).
unexport PYTHONDONTWRITEBYTECODE

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
UV     ?= uv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.viker-installed
PIP_LINKS = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.find-links='\(.*\)'$$/\1/p")
UV_PIP    = $(BIN)/uv pip install -q --python $(BIN)/python

.PHONY: demo test setup clean-cache test-image-env test-floors

$(STAMP): pyproject.toml
	@if [ -n "$(UV)" ] && $(PYTHON) -m venv --without-pip $(VENV) && \
	    $(PYTHON) -m pip --python $(BIN)/python install -q "$(UV)" && \
	    $(UV_PIP) $(addprefix --find-links ,$(sort $(PIP_LINKS))) "$(TORCH)" && \
	    $(UV_PIP) -e ".[test]"; then \
	  echo "[setup] torch and the dependencies installed with uv"; \
	else \
	  echo "[setup] with pip$(if $(UV), ($(UV) could not be installed or failed))"; \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --no-compile "$(TORCH)" && \
	    $(BIN)/pip install -q -e ".[test]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/viker demo

# The suite runs in one process per core (pytest-xdist; at most 4: each holds its own torch and tiny models),
# each on one torch thread (tests/conftest.py); a file's tests stay in one process, so a file's shared
# fixtures are built once. `make test XDIST=` runs it in this process alone.
XDIST ?= -n auto --maxprocesses 4 --dist loadfile
test: $(STAMP)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q $(XDIST)

clean-cache:
	rm -rf cache/mini cache/models cache/refs cache/runs

# --- the GPU box's install and the Docker image's Python environment, without a GPU or a Docker engine ---
# A fresh venv with the base image's torch (read from the Dockerfile's FROM tag; PyPI's wheel without its
# nvidia-* libraries runs the CPU tests) stands for a GPU box's CUDA torch. First the README's GPU-box
# install, a plain `pip install .`, which must keep that torch; then docker/install.sh exactly as the
# Dockerfile runs it; then `viker --help` and the fast end-to-end CLI test.
TORCH_PURE_DEPS = filelock typing-extensions sympy networkx jinja2 fsspec setuptools
IMAGE_VENV ?= .venv-image
IMAGE_TORCH = $(shell sed -n 's|^FROM pytorch/pytorch:\([0-9.]*\)-.*|\1|p' Dockerfile)

test-image-env:
	rm -rf $(IMAGE_VENV)
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/pip install -q --no-compile --no-deps "torch==$(IMAGE_TORCH)"
	$(IMAGE_VENV)/bin/pip install -q $(TORCH_PURE_DEPS)
	$(IMAGE_VENV)/bin/pip install -q .
	$(IMAGE_VENV)/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	  sys.exit(0 if v == '$(IMAGE_TORCH)' else f'README GPU-box install: pip install . replaced torch $(IMAGE_TORCH) by {v}')"
	@echo "[test-image-env] README GPU-box install (pip install . over torch $(IMAGE_TORCH)): ok"
	PATH=$(CURDIR)/$(IMAGE_VENV)/bin:$$PATH sh docker/install.sh .
	$(IMAGE_VENV)/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	  sys.exit(0 if v == '$(IMAGE_TORCH)' else f'pip replaced the base torch $(IMAGE_TORCH) by {v}')"
	HF_HUB_OFFLINE=1 $(IMAGE_VENV)/bin/viker --help > /dev/null
	cd / && $(CURDIR)/$(IMAGE_VENV)/bin/python -c "from pipeline.jobs import prebuilt as p; import sys; \
	  sys.exit(0 if 'site-packages' in str(p.SHIPPED) and (p.SHIPPED / p.PROVENANCE).is_file() \
	  and (p.SHIPPED / 'vanilla' / 'model.safetensors').is_file() else f'the demo models are not installed: {p.SHIPPED}')"
	$(IMAGE_VENV)/bin/pip install -q "pytest>=7"
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  tests/test_cli.py tests/test_image.py

# --- the declared minimum versions (pyproject.toml) running the fast suite ----
# PyPI has only CUDA builds of torch for x86_64: the wheel goes in with --no-deps
# (no nvidia-* libraries, ~0.5 GB), enough for the CPU tests. The torch floor is
# the Docker base image's torch (transformers 5 itself needs >= 2.6).
FLOOR_VENV ?= .venv-floors
FLOOR_TORCH = torch==2.9.0
FLOORS = transformers==5.17.0 peft==0.18.0 accelerate==1.1.0 h5py==3.11.0

test-floors:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q --no-deps "$(FLOOR_TORCH)"
	$(FLOOR_VENV)/bin/pip install -q $(TORCH_PURE_DEPS)
	echo "$(FLOOR_TORCH)" > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/pip install -q -c $(FLOOR_VENV)/constraints.txt $(FLOORS) ".[test]"
	$(FLOOR_VENV)/bin/pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|h5py) "
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider
