"""TensorBoard event files of scalars, written without TensorFlow.

An event file is a sequence of TFRecords (length, masked CRC-32C, serialised `Event`, CRC) whose
first event names the file version; `tensorboard --logdir WORKDIR` reads the scalars. The records
and protos come from the `tensorboard` package's own pure-Python parts (not its `compat.tf`
layer, which would import TensorFlow where it is installed); files go through `fileio`, so a
`gs://` workdir works where TensorFlow is there to write it.
"""

import os
import socket
import time
from typing import Mapping, Optional

from segvit_jax import fileio


def available() -> bool:
  """Whether the `tensorboard` package (its protos and record writer) is importable."""
  try:
    import tensorboard.compat.proto.event_pb2  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


class EventFile:
  """Appends scalar summaries to WORKDIR/events.out.tfevents.<time>.<host>, flushed per write;
  a write that fails leaves no part of its record (`fileio.AppendFile`)."""

  def __init__(self, logdir: str, now: Optional[float] = None):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    now = time.time() if now is None else now
    fileio.makedirs(logdir)
    self.path = os.path.join(logdir, f'events.out.tfevents.{int(now)}.{socket.gethostname()}')
    self._records = record_writer.RecordWriter(fileio.AppendFile(self.path))
    self._add(event_pb2.Event(wall_time=now, file_version='brain.Event:2'))

  def _add(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._records.close()
