"""What every command line shares: quiet libraries, one-line user errors, Ctrl-C.

    def main(argv) -> Optional[int]: ...        # exit status; None = 0
    if __name__ == '__main__':
      cli.run(main)

- Libraries' INFO logs (absl, Orbax, JAX) are off unless --verbosity is given, and TensorFlow's
  C++ banners unless TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS are set: a run prints its own
  progress and results (`say`), warnings and errors.
- Orbax's own reports of a failed checkpoint write (errors logged with tracebacks by its background
  threads, and TensorStore's callbacks into its closed event loop) are left out: the run reports
  the failure once, as the `error:` line of a `StorageError`. So are its complaints about a
  step's damaged metadata file, which the restore reports in its own line.
- A `UserError`, a flag that does not parse, a missing or broken config file or an unknown config
  key prints one line `error: <message>` on stderr and exits 1, before any compilation; Ctrl-C
  outside a training loop (which saves first) exits 130 with one line. Anything else is a bug
  and keeps its traceback.
"""

import glob
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, NoReturn, Optional, Sequence

from segvit_jax.errors import UserError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def print_error(message: str) -> None:
  """Prints `error: <message>` on stderr (one line, as user errors are written)."""
  print(f'error: {str(message).strip() or "failed"}', file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` and exits 1."""
  print_error(message)
  sys.exit(EXIT_USER_ERROR)


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  for arg in argv:
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return None


def _parse_error(error: BaseException, argv: Sequence[str]) -> str:
  """A one-line message for a flag-parsing failure (absl flags + ml_collections config files)."""
  text = str(error)
  config = _flag_value(argv, 'config')
  unknown = re.search(r"Unknown command line flag '([^']+)'", text)
  if unknown:
    name = unknown.group(1)
    if name.startswith('config.') and config:
      return f'--{name}: {config} has no such key{_did_you_mean(config, name)}.'
    return f'unknown flag --{name} (--help lists the flags).'
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  if suggestion and config:
    key = re.search(r'([A-Za-z_][A-Za-z0-9_]*)', text)
    given = next((a.split('=')[0] for a in argv if key and a.startswith('--config.')
                  and a.split('=')[0].endswith('.' + key.group(1))), '--config.' + (
                      key.group(1) if key else '?'))
    return (f'{given}: {config} has no such key (did you mean '
            f'{given.rsplit(".", 1)[0]}.{suggestion.group(1)}?).')
  if config and ('No such file' in text or 'Failed loading config file' in text):
    return f'--config={config}: no such config file (expected a configs/*.py file).'
  if isinstance(error, SyntaxError) or 'Error whilst parsing config file' in text:
    return f'--config={config}: not a loadable config file ({type(error).__name__}).'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _did_you_mean(config_path: str, name: str) -> str:
  """' (did you mean config.x?)' for the closest key of the config file, '' if none is close."""
  import difflib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.spec_from_file_location('_config_for_suggestion', config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keys = ['config.' + k for k in _dotted_keys(module.get_config().to_dict())]
  except Exception:  # pylint: disable=broad-except
    return ''
  close = difflib.get_close_matches(name, keys, n=1)
  return f' (did you mean --{close[0]}?)' if close else ''


def _dotted_keys(tree: dict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in tree.items():
    keys.append(prefix + key)
    if isinstance(value, dict):
      keys.extend(_dotted_keys(value, f'{prefix}{key}.'))
  return keys


def config_value(holder):
  """The ConfigDict of an ml_collections config flag; a file that failed to load is a UserError
  (ml_collections defers that error to the first access)."""
  try:
    value = holder.value
    if value is not None and not hasattr(value, 'to_dict'):
      getattr(value, 'to_dict')  # raises the deferred error of a config file that did not load
    return value
  except (OSError, SyntaxError, AttributeError, KeyError, ValueError, TypeError) as e:
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    raise UserError(_parse_error(e, [f'--{holder.name}={path}'])) from e


def check_writable_dir(path: str, flag: str) -> None:
  """UserError unless `path` is (or can be made) a writable local folder; URLs pass.

  Tried for real (the missing folders made and a file written, then removed again): permission
  bits do not tell for root or on read-only mounts.
  """
  if '://' in str(path):
    return
  absolute = os.path.abspath(path)
  if os.path.exists(absolute) and not os.path.isdir(absolute):
    raise UserError(f'{flag}={path} is a file; give a directory.')
  first_missing = None
  probe = absolute
  while not os.path.exists(probe):
    first_missing, probe = probe, os.path.dirname(probe)
  try:
    os.makedirs(absolute, exist_ok=True)
    with tempfile.TemporaryFile(dir=absolute):
      pass
  except OSError as e:
    raise UserError(f'{flag}={path} is not writable ({e.strerror}: {e.filename or path}); '
                    'choose a directory you can write to.') from e
  finally:
    if first_missing is not None and os.path.isdir(first_missing):
      shutil.rmtree(first_missing, ignore_errors=True)


def quiet_environment() -> None:
  """Before TensorFlow / JAX are imported: their start-up banners off unless asked for.

  TensorFlow's oneDNN kernels go off too (unless TF_ENABLE_ONEDNN_OPTS is set): on CPUs with
  AVX-512 they reorder float operations, so the input pipeline's floats would depend on the host's
  CPU, and TensorFlow announces them on stderr whatever TF_CPP_MIN_LOG_LEVEL says.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


# Orbax's complaints, when it lists the steps, about a step whose metadata file is damaged: the
# restore reports that step itself, in one line naming the file, when it comes to read it.
_ORBAX_METADATA_COMPLAINTS = ('Failed to json parse Metadata file', 'Failed to read Metadata file',
                              'Metadata file does not exist')


def _quiet_storage_failures() -> None:
  """See the module docstring: Orbax's echoes of a failed write go."""
  import logging as python_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from segvit_jax import fileio  # pylint: disable=g-import-not-at-top

  def echo(record: python_logging.LogRecord) -> bool:
    if not (f'{os.sep}orbax{os.sep}' in record.pathname or record.name == 'asyncio'):
      return False
    message = record.getMessage()
    if message.startswith(_ORBAX_METADATA_COMPLAINTS):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return bool(fileio.io_failure(error if error is not None else RuntimeError(message)))

  logging.get_absl_handler().addFilter(lambda record: not echo(record))
  unraisable = sys.unraisablehook

  def hook(info):
    # TensorStore completes the writes still in flight after Orbax closed the event loop of a
    # failed save; their callbacks find the loop closed. Nothing is lost: the save failed.
    if not (isinstance(info.exc_value, RuntimeError) and
            str(info.exc_value) == 'Event loop is closed'):
      unraisable(info)

  sys.unraisablehook = hook


def run(main: Callable[[Sequence[str]], Optional[int]]) -> NoReturn:
  """absl's app.run(main) with the behaviour of the module docstring."""
  quiet_environment()
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  # Console scripts run from a wrapper file: absl's --help lists the flags of argv[0]'s module.
  for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, OSError, KeyError, AttributeError, ValueError, TypeError,
            SyntaxError) as e:
      fail(_parse_error(e, argv))

  def wrapped(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    _quiet_storage_failures()
    skip_absent_tpu()
    try:
      status = main(argv)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:
      print('error: interrupted (Ctrl-C)', file=sys.stderr, flush=True)
      sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)

  app.run(wrapped, flags_parser=parse)
  sys.exit(0)  # not reached: app.run exits


def say(message: str) -> None:
  """Prints a line for the user of a run: on process 0 (stdout, flushed, with the time of day).

  Progress, evaluation summaries, results and stops are printed whatever the verbosity (libraries'
  INFO logs are off unless --verbosity is given); every process also logs the line at INFO.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.info('%s', message)
  if jax.process_index() == 0:
    print(f'{time.strftime("%H:%M:%S")} {message}', file=sys.stdout, flush=True)


# Device files of attached accelerators: TPU chips (/dev/accel* on v4 / v5p, /dev/vfio/<n> on
# v5e / v6e), NVIDIA and AMD GPUs. Where any exists, JAX chooses its backends as usual.
_ACCELERATOR_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def skip_absent_tpu() -> None:
  """Starts JAX on the CPU when libtpu is importable but no accelerator is attached.

  With libtpu installed (TPU VMs; hosts that compile for TPU topologies with `segvit-compile`),
  JAX tries its TPU backend at start-up even without TPU chips: libtpu prints three warnings and
  adds about 0.2 s before JAX falls back to the CPU. Call before the first JAX operation. Does
  nothing when JAX_PLATFORMS (or jax_platforms) is set, without libtpu, or on a host with a TPU
  or GPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms:
    return
  if importlib.util.find_spec('libtpu') is None:
    return
  if any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES):
    return
  jax.config.update('jax_platforms', 'cpu')
