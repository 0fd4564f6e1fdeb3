"""The lines a run prints for its user: progress, evaluation summaries, results, stops.

Libraries' INFO logs (Orbax, JAX, TensorFlow, absl) are off by default (`segvit_jax.cli`
raises the log level unless --verbosity is given); these lines are printed whatever the
verbosity, by process 0 only, with the time of day, and also go to the absl log.
"""

import sys
import time

from absl import logging


def say(message: str) -> None:
  """Prints `message` on process 0 (stdout, flushed) and logs it at INFO on every process."""
  logging.info('%s', message)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f'{time.strftime("%H:%M:%S")} {message}', file=sys.stdout, flush=True)
