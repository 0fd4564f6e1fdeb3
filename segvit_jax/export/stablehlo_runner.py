"""Running a StableHLO artifact of `segvit-export` (the reference runner of a deployment).

    from segvit_jax.export import stablehlo_runner as exported
    model = exported.load('segvit.shlo')                # and its sidecar segvit.shlo.json
    labels, scores = model.segment(rgb)                 # (B, H, W, 3) uint8 at model.size
    scores = model(images)                              # the artifact's own signature

`load` and `ExportedModel` need jax and numpy only: no flax, no model code (the program and its
weights are in the artifact). `segment_files` is `segvit-predict --exported=PATH`: every image is
resized to the artifact's size (OpenCV's bilinear, as mmseg reads images; the aspect ratio is not
kept), segmented whole, and its scores resized back to the image's own size with the model's
bilinear resize before the arg-max.
"""

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from segvit_jax.errors import UserError


class ExportedModel:
  """A deserialised `jax.export.Exported` and its sidecar (see `segvit_jax.export`)."""

  def __init__(self, exported: Any, info: Dict[str, Any]):
    self.exported = exported
    self.info = info
    self.size: Tuple[int, int] = tuple(info['size'])
    self.end_to_end = info['mode'] == 'end_to_end'
    self.num_classes = int(info['num_classes'])
    self.class_names = list(info['class_names'])
    self.palette = np.asarray(info['palette'], np.uint8).reshape(self.num_classes, 3)
    self.mean = np.asarray(info['normalization']['mean'], np.float32)
    self.std = np.asarray(info['normalization']['std'], np.float32)

  def __call__(self, images):
    """The artifact's function: model mode (B, H, W, 3) float32 normalised -> scores
    (B, H, W, K); end to end (B, H, W, 3) uint8 -> (labels (B, H, W) int32, scores)."""
    return self.exported.call(images)

  def segment(self, rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(labels (B, H, W) int32, scores (B, H, W, K) float32) of uint8 RGB (B, H, W, 3) at
    `self.size`, in either mode (model mode normalises here, as the sidecar says)."""
    if self.end_to_end:
      labels, scores = self(rgb)
      return np.asarray(labels), np.asarray(scores)
    scores = np.asarray(self((rgb.astype(np.float32) - self.mean) / self.std))
    return scores.argmax(-1).astype(np.int32), scores


def load(path: str) -> ExportedModel:
  """The StableHLO artifact at `path` with its sidecar `path.json`; UserError naming what is
  missing or not an export."""
  sidecar = path + '.json'
  for p in (path, sidecar):
    if not os.path.isfile(p):
      raise UserError(f'--exported={path}: {p} does not exist (segvit-export '
                      '--format=stablehlo writes PATH and PATH.json).')
  with open(sidecar, encoding='utf-8') as f:
    info = json.load(f)
  if info.get('artifact') != 'stablehlo':
    raise UserError(f'--exported={path}: {sidecar} describes a {info.get("artifact")!r} export; '
                    'segvit-predict runs stablehlo artifacts.')
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  try:
    exported = jax.export.deserialize(data)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'--exported={path} is not a jax.export artifact this jax reads '
                    f'({type(e).__name__}: {str(e).splitlines()[0][:200]}).') from e
  return ExportedModel(exported, info)


def segment_files(path: str, sources: Sequence[Tuple[str, str]], output: str, *,
                  batch_size: int = 1, scores: bool = False, scores_dtype: Any = np.float16,
                  summary: Optional[Any] = None):
  """Segments (path, name) sources with the artifact at `path`, writing what `predict` writes
  (labels/, overlays/, scores/ under `output`). Returns the filled `predictor.Summary`."""
  import time  # pylint: disable=g-import-not-at-top
  from segvit_jax.data import mmseg_rules  # pylint: disable=g-import-not-at-top
  from segvit_jax import predict  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import predictor  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import resize  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
  model = load(path)
  summary = summary if summary is not None else predictor.Summary()
  to_size = jax.jit(resize.resize_bilinear, static_argnums=1)
  t0 = time.perf_counter()

  def flush(batch):
    images = np.stack([mmseg_rules.resize_linear(img, model.size) for _, img in batch])
    n = len(batch)
    padded = np.concatenate([images, np.repeat(images[:1], batch_size - n, 0)])
    _, probs = model.segment(padded)
    for (name, image), p in zip(batch, probs[:n]):
      s = np.asarray(to_size(p[None], image.shape[:2]))[0]
      labels = s.argmax(-1).astype(np.int32)
      result = {'labels': labels,
                'overlay': visualize.overlay(image, labels, model.palette)}
      if scores:
        result['scores'] = s.astype(scores_dtype)
      predict.write_outputs(output, name, result)
      summary.images += 1

  batch = []
  for source, name in sources:
    try:
      batch.append((name, predictor.read_image(source)))
    except Exception as e:  # pylint: disable=broad-except
      summary.skipped.append((source, f'{type(e).__name__}: {e}'))
      continue
    if len(batch) == batch_size:
      flush(batch)
      batch = []
  if batch:
    flush(batch)
  summary.seconds = time.perf_counter() - t0
  summary.buckets = [model.size]
  return summary
