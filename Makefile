# make demo: train + evaluate the small synthetic SegViT on CPU and draw its predictions.
# make test: the whole test suite (CPU only).
# Both create .venv (Python 3.11) and install the pinned requirements on first use.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test bench clean-venv

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m segvit_jax.main --config=configs/synthetic.py --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-venv:
	rm -rf $(VENV)
