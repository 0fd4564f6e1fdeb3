"""Joining the processes of a multi-host job into one JAX runtime (`jax.distributed`).

- Explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (the names of
  `jax.distributed.initialize`), e.g. from `launch/gpu_slurm.sbatch` or on one machine for tests.
- Automatic: on a multi-host TPU VM slice and under a multi-task SLURM job, JAX finds the cluster
  from the environment.
- A single process needs nothing.

When a process dies, the coordination service notices the missing heartbeats within
`heartbeat_timeout_seconds` and terminates the others, so a job never waits forever in a collective.
The first run of each program starts on all processes together (`compiled_together`).
"""

import itertools
import os
from typing import Any, Callable, Mapping, Optional

from absl import logging
import jax

HEARTBEAT_TIMEOUT_S = 30
# How long the first process to compile a program waits for the slowest: a ViT-L train step
# takes minutes to compile on a busy host.
COMPILE_BARRIER_TIMEOUT_S = 3600

_barrier_ids = itertools.count()


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
    _barriers_without_collectives()
    return True
  cluster = _auto_cluster(os.environ if environ is None else environ)
  if cluster:
    logging.info('jax.distributed: detected a %s; initialising from its environment.', cluster)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    _barriers_without_collectives()
    return True
  return False


def _barriers_without_collectives() -> None:
  """Orbax's barriers (checkpoint manager creation, saves) through the coordination service.

  By default they are a collective over all devices, whose first run sets up communicators
  that, on CPU, fail after 30 s when a process arrives later than that (see
  `compiled_together`).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.multihost import multihost  # pylint: disable=g-import-not-at-top
  flags.FLAGS[multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name].value = True


def compiled_together(jitted: Callable[..., Any], what: str) -> Callable[..., Any]:
  """`jitted` (a `jax.jit` function), whose first call in a multi-process job compiles the program,
  waits until every process has compiled it, and only then runs it.

  Why: a program's first run sets up its cross-process communicators, and on CPU (gloo) that
  gives up after 30 s when a peer is not there yet (`Gloo context initialization failed:
  DEADLINE_EXCEEDED`), so a process that compiles more slowly than the others (a loaded host)
  would fail the job. Later calls are `jitted`'s own (its compiled program is reused). Every
  process must make the same calls in the same order, as SPMD programs do anyway.
  """
  if jax.process_count() == 1:
    return jitted
  pending = [True]

  def call(*args):
    if pending[0] and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
      jitted.lower(*args).compile()
      from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
      # The coordination service's barrier: no collective, hence no communicator to set up.
      jax_distributed.global_state.client.wait_at_barrier(
          f'segvit compiled {what} #{next(_barrier_ids)}', COMPILE_BARRIER_TIMEOUT_S * 1000)
      pending[0] = False
    return jitted(*args)

  return call
