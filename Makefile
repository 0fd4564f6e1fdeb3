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
# test tools. An environment that also compiles for TPUs adds requirements-tpu.txt here.
REQUIREMENTS := requirements.txt requirements-torch.txt requirements-test.txt

.PHONY: demo test clean-venv

$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m segvit_jax.main --config=configs/synthetic.py --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-venv:
	rm -rf $(VENV)
