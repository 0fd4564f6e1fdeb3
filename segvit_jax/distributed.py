"""Joining the processes of a multi-host job into one JAX runtime (`jax.distributed`).

- Explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (the names of
  `jax.distributed.initialize`), e.g. from `launch/gpu_slurm.sbatch` or on one machine for tests.
- Automatic: on a multi-host TPU VM slice and under a multi-task SLURM job, JAX finds the cluster
  from the environment.
- A single process needs nothing.

When a process dies, the coordination service notices the missing heartbeats within
`heartbeat_timeout_seconds` and terminates the others, so a job never waits forever in a collective.
A process that fails with an error says so first (`report_failure`), and the others end within a
second instead of waiting for the heartbeats. The first run of each program starts on all
processes together (`compiled_together`).
"""

import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import jax

HEARTBEAT_TIMEOUT_S = 30
# How long the first process to compile a program waits for the slowest: a ViT-L train step
# takes minutes to compile on a busy host.
COMPILE_BARRIER_TIMEOUT_S = 3600

# The coordination service's key a failing process sets to its index (`report_failure`), and how
# often the others look at it.
_FAILED_KEY = 'segvit/failed_process'
_FAILURE_POLL_S = 0.5

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
    _end_when_another_fails()
    return True
  cluster = _auto_cluster(os.environ if environ is None else environ)
  if cluster:
    logging.info('jax.distributed: detected a %s; initialising from its environment.', cluster)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    _barriers_without_collectives()
    _end_when_another_fails()
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


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def report_failure() -> Optional[int]:
  """Tells the other processes of the job that this one is failing, so that they end now (their
  `_end_when_another_fails` watchers) rather than when its heartbeats stop.

  Returns the index of a process that reported a failure before this one, else None: then this
  process's error is most likely the consequence (a collective whose peer has left), not a cause.
  """
  client = _client()
  if client is None:
    return None
  try:
    client.key_value_set(_FAILED_KEY, str(jax.process_index()))
    return None
  except Exception:  # pylint: disable=broad-except  (the key exists: another process was first)
    try:
      first = int(client.key_value_try_get(_FAILED_KEY))
    except Exception:  # pylint: disable=broad-except  (the service is gone)
      return None
    return None if first == jax.process_index() else first


def failure_line(failed, me: int) -> str:
  return (f'error: process {failed} of {jax.process_count()} failed (its log says why); '
          f'ending process {me}.')


def _end_when_another_fails() -> None:
  """Starts a daemon thread that exits this process (status 1) once another has reported a
  failure: this process may be waiting in a collective that can never complete."""
  me = jax.process_index()

  def watch():
    while True:
      time.sleep(_FAILURE_POLL_S)
      client = _client()
      if client is None:  # jax.distributed was shut down: the job ended normally
        return
      try:
        failed = client.key_value_try_get(_FAILED_KEY)
      except Exception:  # pylint: disable=broad-except  (not set, or the service is gone)
        continue
      if failed != str(me):
        print(failure_line(failed, me), file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access
      return

  threading.Thread(target=watch, name='segvit-failure-watch', daemon=True).start()


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
      # The coordination service's barrier: no collective, hence no communicator to set up.
      _client().wait_at_barrier(
          f'segvit compiled {what} #{next(_barrier_ids)}', COMPILE_BARRIER_TIMEOUT_S * 1000)
      pending[0] = False
    return jitted(*args)

  return call
