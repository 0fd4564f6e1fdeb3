# make demo: train + evaluate the small synthetic SegViT on CPU and draw its predictions.
# make test: the whole test suite (CPU only).
# Both create .venv (Python 3.11) on first use, install the pinned requirements and the package
# (editable) into it, and install again when a requirements file or pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# The pinned requirements `make` installs: the package's, PyTorch (converter, parity tests) and the
# test tools.
REQUIREMENTS := requirements.txt requirements-torch.txt requirements-test.txt
# libtpu (requirements-tpu.txt, 684 MB) in a directory of its own: only the test processes that
# compile for TPU topologies put it on their path (tests/test_compile.py); CPU runs never load it.
LIBTPU := .libtpu
LIBTPU_STAMP := $(LIBTPU)/.installed

.PHONY: demo test clean-venv

$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(LIBTPU_STAMP): requirements-tpu.txt | $(STAMP)
	$(PY) -m pip install --quiet --upgrade --target=$(LIBTPU) -r requirements-tpu.txt
	touch $(LIBTPU_STAMP)

demo: $(STAMP)
	$(PY) -m segvit_jax.main --config=configs/synthetic.py --workdir=$(DEMO_DIR)

test: $(STAMP) $(LIBTPU_STAMP)
	$(PY) -m pytest -q -n 2 tests

clean-venv:
	rm -rf $(VENV) $(LIBTPU)
