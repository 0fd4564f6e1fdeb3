"""Paths that are local folders or cloud buckets (`gs://bucket/run`, the TPU-pod workdir).

Local paths go through the standard library; URLs (anything with `://`) through `tf.io.gfile`,
which TensorFlow ships with GCS support. Orbax and TensorBoard writers take URLs by themselves;
these helpers cover the files the trainer writes itself (metrics.jsonl, JSON summaries, PNGs)
and the checks for existing checkpoints.
"""

import builtins
import os
from typing import IO


def is_url(path: str) -> bool:
  return '://' in str(path)


def _gfile():
  from segvit_jax import errors  # pylint: disable=g-import-not-at-top
  return errors.import_tensorflow_module('tensorflow', 'A gs:// or other URL path').io.gfile


def absolute(path: str) -> str:
  """`os.path.abspath` for local paths; URLs unchanged (abspath would turn gs://b into ./gs:/b)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names (no trailing slashes), [] when `path` is not a folder."""
  if not isdir(path):
    return []
  if is_url(path):
    return [name.rstrip('/') for name in _gfile().listdir(path)]
  return os.listdir(path)


def open_file(path: str, mode: str = 'r') -> IO:
  """A file object; text modes read and write UTF-8."""
  if is_url(path):
    return _gfile().GFile(path, mode)
  if 'b' in mode:
    return builtins.open(path, mode)
  return builtins.open(path, mode, encoding='utf-8')
