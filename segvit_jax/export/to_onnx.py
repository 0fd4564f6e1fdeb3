"""ONNX export of an inference function with jax2onnx (`segvit-export --format=onnx`).

jax2onnx traces the function itself with its own replacements of jax.numpy and Flax functions
active; one of them (`jnp.shape` returning a traced array) breaks `nn.scan`, which runs our ViT
blocks and decoder layers. So the function is traced here first, as plain JAX, to a jaxpr of lax
primitives, and jax2onnx converts a function that replays that jaxpr (`jax.core.eval_jaxpr`):
the same primitives with the same parameters, so the same numbers. The trace runs under
`jax.disable_jit()`, which inlines the jit calls inside jax.numpy functions and unrolls the scans
into one copy per block: jax2onnx's lowering of nested jit bodies fails on jax >= 0.11. The batch
dimension is symbolic in both traces (one symbol), and stays dynamic in the ONNX model.

onnxruntime session:
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    scores, = session.run(None, {'images': images})     # (B, H, W, 3) float32 NHWC
"""

import contextlib
import io
import json
import logging
from typing import Any, Callable, Dict

import jax

from segvit_jax.errors import UserError

OPSET = 23


@contextlib.contextmanager
def _quiet_converter():
  # jax2onnx logs a traceback at WARNING for each plugin of an optional library that is not
  # installed and (0.12) prints a debug line on stdout for each convolution; onnx_ir logs a
  # warning for each shape value it leaves untyped.
  loggers = [logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def import_jax2onnx():
  """jax2onnx.to_onnx, or a UserError naming what to install."""
  try:
    with _quiet_converter():
      from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
      import onnx  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    raise UserError(f'--format=onnx needs {e.name}, which is not installed: pip install '
                    "'segvit_jax[export]' (jax2onnx, onnx, onnxruntime).") from e
  return to_onnx


def onnx_model(fn: Callable[..., Any], spec: jax.ShapeDtypeStruct, info: Dict[str, Any]):
  """The onnx.ModelProto of fn at spec: input 'images', outputs named as info['outputs'], the
  sidecar `info` in metadata_props['segvit_jax']."""
  to_onnx = import_jax2onnx()
  with jax.disable_jit():
    closed = jax.make_jaxpr(fn)(spec)

  def replay(images):
    out = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, images)
    return tuple(out) if len(out) > 1 else out[0]

  with _quiet_converter():
    model = to_onnx(replay, [spec], model_name='segvit', opset=OPSET, input_names=['images'],
                    output_names=[o['name'] for o in info['outputs']])
  entry = model.metadata_props.add()
  entry.key, entry.value = 'segvit_jax', json.dumps(info)
  return model


def onnx_bytes(fn: Callable[..., Any], spec: jax.ShapeDtypeStruct, info: Dict[str, Any]) -> bytes:
  """The serialised ONNX model (protobuf: at most 2 GiB, which ViT-L in float32 fits)."""
  return onnx_model(fn, spec, info).SerializeToString()
