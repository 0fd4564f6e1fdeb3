"""Argument handling of `segvit_jax.distributed.initialize` (the real multi-process run is in
tests/test_multihost.py)."""

import pytest

from segvit_jax import distributed


@pytest.mark.parametrize('kwargs,missing', [
    (dict(coordinator_address='localhost:1234'), '--num_processes, --process_id'),
    (dict(num_processes=2, process_id=0), '--coordinator_address'),
])
def test_partial_flags_name_what_is_missing(kwargs, missing):
  with pytest.raises(ValueError, match=f'{missing} missing'):
    distributed.initialize(**kwargs, environ={})


def test_process_id_out_of_range():
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    distributed.initialize('localhost:1234', 2, 2, environ={})


@pytest.mark.parametrize('environ,expected', [
    ({}, None),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),  # a single-host TPU VM
    ({'TPU_WORKER_HOSTNAMES': 't1k-w-0,t1k-w-1'}, 'TPU VM slice'),
    ({'SLURM_NTASKS': '1'}, None),
    ({'SLURM_NTASKS': '4'}, 'SLURM'),
])
def test_cluster_detection(environ, expected):
  assert distributed._auto_cluster(environ) == expected


def test_single_process_does_nothing():
  assert distributed.initialize(environ={}) is False
