"""Joining the processes of a multi-host job into one JAX runtime (`jax.distributed`).

- Explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (the names of
  `jax.distributed.initialize`), e.g. from `launch/gpu_slurm.sbatch` or on one machine for tests.
- Automatic: on a multi-host TPU VM slice and under a multi-task SLURM job, JAX finds the cluster
  from the environment.
- A single process needs nothing.

When a process dies, the coordination service notices the missing heartbeats within
`heartbeat_timeout_seconds` and terminates the others, so a job never waits forever in a collective.
"""

import os
from typing import Mapping, Optional

from absl import logging
import jax

HEARTBEAT_TIMEOUT_S = 30


def _auto_cluster(environ: Mapping[str, str]) -> Optional[str]:
  """Names the multi-host environment JAX can detect by itself, or None."""
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'TPU VM slice'
  if int(environ.get('SLURM_NTASKS', environ.get('SLURM_NPROCS', '1')) or 1) > 1:
    return 'SLURM'
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
               environ: Optional[Mapping[str, str]] = None) -> bool:
  """Initialises `jax.distributed` when the job has several processes. Returns whether it did.

  Must run before any other JAX call. Raises ValueError naming the flag that is missing when the
  explicit flags are given only in part.
  """
  explicit = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
              'process_id': process_id}
  given = {k for k, v in explicit.items() if v is not None}
  if given and given != set(explicit):
    missing = ', '.join(f'--{k}' for k in explicit if k not in given)
    raise ValueError(f'Multi-process flags are incomplete: {missing} missing (give all of '
                     '--coordinator_address, --num_processes and --process_id, or none).')
  if given:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in '
                       f'[0, --num_processes={num_processes}).')
    logging.info('jax.distributed: process %d of %d, coordinator %s.', process_id, num_processes,
                 coordinator_address)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return True
  cluster = _auto_cluster(os.environ if environ is None else environ)
  if cluster:
    logging.info('jax.distributed: detected a %s; initialising from its environment.', cluster)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return True
  return False
