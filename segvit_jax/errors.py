"""The one error type for mistakes a user can fix.

Raise `UserError` for a wrong flag, config key, file or value, with a message that names it and
says what would work ("config.batch_size=6 does not divide over data x fsdp = 4 devices; use 4
or 8"). The command lines print it as one line, `error: <message>`, and exit 1 without a
traceback, before any compilation where possible. Any other exception is a bug and keeps its
traceback.

It subclasses ValueError so that library callers that catch ValueError keep working.
"""


class UserError(ValueError):
  """A mistake in the user's input; the message is one line that names it and the fix."""


class StorageError(UserError):
  """A file of the run could not be written (a full disk, an I/O error). The message is one line
  naming the path, the reason and the space there; what was completely written before is kept,
  so the command line leaves the workdir as it is and the same command continues after the
  storage is fixed."""


_TENSORFLOW_MODULES = ('tensorflow', 'tensorflow_datasets')


def import_tensorflow_module(name: str, needed_for: str):
  """Imports module `name` of the data layer (it imports TensorFlow / TFDS), or raises a
  UserError naming `needed_for` and what to install when TensorFlow or TFDS is missing. Every
  other import error is a bug and propagates."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if (e.name or '').split('.')[0] not in _TENSORFLOW_MODULES:
      raise
    raise UserError(f'{needed_for} needs {e.name}, which is not installed: pip install '
                    'tensorflow-cpu tensorflow-datasets') from e
