# make demo: train + evaluate the small synthetic SegViT on CPU and draw its predictions.
# make test: the whole test suite (CPU only) on the lock: Python 3.11, requirements*.txt.
# make test-newest: the suite on Python 3.12 with the newest jax, jaxlib, flax, optax and
#   orbax-checkpoint that pyproject.toml admits (the rest of requirements.txt as locked), without
#   PyTorch or libtpu: every test file that needs neither, and a short training run.
# Each creates its environment on first use, and installs again when a requirements file or
# pyproject.toml changes.

PYTHON ?= python3.11
# Python 3.12 as installed under pyenv on our machines (not on the PATH by default).
PYTHON_NEWEST ?= env PYENV_VERSION=3.12.1 python3.12
VENV ?= .venv
VENV_NEWEST ?= .venv-newest
PY := $(VENV)/bin/python
PY_NEWEST := $(VENV_NEWEST)/bin/python
STAMP := $(VENV)/.installed
STAMP_NEWEST := $(VENV_NEWEST)/.installed
DEMO_DIR ?= runs/demo
# The pinned requirements `make` installs: the package's, PyTorch (converter, parity tests) and the
# test tools.
REQUIREMENTS := requirements.txt requirements-torch.txt requirements-test.txt
# What test-newest takes at its newest: every other package stays at its pin.
NEWEST_PACKAGES := jax|jaxlib|flax|optax|orbax-checkpoint
# Test files that need PyTorch (references) or libtpu (TPU compiles): left to `make test`.
NEEDS_TORCH_OR_LIBTPU := test_bench test_compile test_convert test_evaluate test_losses \
  test_optim test_parity test_resize test_gpu_check
# Known to hang with jaxlib 0.12.1: a 2-process CPU job deadlocks in the first Gloo collective of
# the train step (both processes wait in a send), an XLA:CPU fault. Left to `make test` (the lock).
NEWEST_KNOWN_FAILING := test_multihost
# libtpu (requirements-tpu.txt, 684 MB) in a directory of its own: only the test processes that
# compile for TPU topologies put it on their path (tests/test_compile.py); CPU runs never load it.
LIBTPU := .libtpu
LIBTPU_STAMP := $(LIBTPU)/.installed

.PHONY: demo test test-newest clean-venv

$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(STAMP_NEWEST): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY_NEWEST) || $(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	$(PY_NEWEST) -m pip install --quiet --upgrade pip
	grep -vE '^($(NEWEST_PACKAGES))==' requirements.txt > $(VENV_NEWEST)/constraints.txt
	$(PY_NEWEST) -m pip install --quiet --upgrade -c $(VENV_NEWEST)/constraints.txt \
	  -r requirements-test.txt -e .
	$(PY_NEWEST) -m pip list --format=freeze | grep -iE '^($(NEWEST_PACKAGES))=='
	touch $(STAMP_NEWEST)

$(LIBTPU_STAMP): requirements-tpu.txt | $(STAMP)
	$(PY) -m pip install --quiet --upgrade --target=$(LIBTPU) -r requirements-tpu.txt
	touch $(LIBTPU_STAMP)

demo: $(STAMP)
	$(PY) -m segvit_jax.main --config=configs/synthetic.py --workdir=$(DEMO_DIR)

test: $(STAMP) $(LIBTPU_STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal tests

test-newest: $(STAMP_NEWEST)
	$(PY_NEWEST) -m pytest -q -n 2 --dist worksteal -m 'not lock' \
	  $(foreach t,$(NEEDS_TORCH_OR_LIBTPU) $(NEWEST_KNOWN_FAILING),--ignore=tests/$(t).py) tests
	workdir=$$(mktemp -d) && trap 'rm -rf "$$workdir"' EXIT && \
	  $(VENV_NEWEST)/bin/segvit-train --config=configs/synthetic.py --workdir=$$workdir \
	    --config.num_train_steps=20 --config.log_every_steps=10 \
	    --config.evals.val.every_steps=20 --config.checkpoint_every_steps=20 && \
	  test -d $$workdir/checkpoints/20 -a -f $$workdir/final_metrics.json

clean-venv:
	rm -rf $(VENV) $(VENV_NEWEST) $(LIBTPU)
