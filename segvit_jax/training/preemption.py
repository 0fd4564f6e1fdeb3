"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) become a request to save and stop.

    stop = preemption.StopRequest()
    stop.install()            # in the main thread; elsewhere the signals keep their handlers
    ...
    if stop.requested(step):  # every process, once per step: save `step`, then stop
    ...
    stop.uninstall()

The handler only records the signal (a signal handler must not touch JAX); the loop acts on it
after its current step. A second Ctrl-C raises KeyboardInterrupt at once. In a multi-process job
every process stops at the same step (JAX's preemption sync point).
"""

import signal
import threading
from typing import Any, Optional

import jax

from segvit_jax import cli


class StopRequest:
  """Set by SIGTERM (preemption) or SIGINT (Ctrl-C); the loop checks it after each step. A second
  SIGINT raises KeyboardInterrupt at once."""

  def __init__(self):
    self.event = threading.Event()
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = self.signal_name or name
    cli.say(f'{name} received: saving a checkpoint after the current step '
            f'(Ctrl-C again to stop at once).' if name == 'SIGINT' else
            f'{name} received: saving a checkpoint after the current step.')
    self.event.set()

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process must call it at every step."""
    if jax.process_count() > 1:
      # Every host must agree on the step at which to stop (JAX's preemption service).
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or 'SIGTERM'
          return True
      except RuntimeError:
        pass
    return self.event.is_set()
