"""The predictor: a model, its variables and config, loaded once, segmenting images of any size
as evaluation does (`inference.predict_probs` with the config's `InferenceSpec`), compiled once
per shape bucket. `segvit-predict` (segvit_jax/predict.py) and notebooks run it:

    predictor = load('/tmp/ade_vitb')      # a segvit-convert output or a training workdir
    for index, name, result in iter_results(predictor, [(path, name), ...], tta=False, ...):
      result['labels']                     # (H, W) int32 at the image's own size; None: unreadable

Images are decoded and test-resized on the host with mmseg's rules (`mmseg_rules`, as training
and evaluation read them), padded to a shape bucket and batched with images of the same bucket;
results are fetched one batch behind the dispatch, so decoding overlaps the device's work.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from segvit_jax.data import mmseg_rules
from segvit_jax.evaluation import inference
from segvit_jax.evaluation import visualize


# ------------------------------------------------------------------------------------------------
# Loading a checkpoint.


def load_checkpoint(path: str, config: Optional[Any] = None, step: int = 0):
  """(model, variables, config) of an exported directory or a training workdir.

  Args:
    path: a `segvit_jax.convert` output, a training workdir, or its `checkpoints/` folder.
    config: a ConfigDict or a config file (configs/*.py or a config.json) to use instead of
      the one stored with the checkpoint (required for a workdir without config.json).
    step: the step of a training workdir; 0: its latest.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax.checkpoint import parameters  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  if isinstance(config, str):
    config = config_lib.load_config(config)
  if config is None:
    config = parameters.saved_config(path, flag='--checkpoint')
  model = segvit.build_model(config.model)
  abstract = nn.unbox(segvit.abstract_params(model))
  params, _ = parameters.load_params(path, abstract, config=config, flag='--checkpoint',
                                         step=step, step_flag='--step')
  return model, {'params': jax.tree.map(jnp.asarray, params)}, config


# ------------------------------------------------------------------------------------------------
# Host-side preprocessing: mmseg's rules (`mmseg_rules`), the same functions as training and
# evaluation use.


def _round_up(x: int, multiple: int) -> int:
  return -(-int(x) // multiple) * multiple


def read_image(source: Any) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a path, a PIL image or an array, as mmseg would read the file.

  Files are decoded by `mmseg_rules.decode_image` (OpenCV's IMREAD_COLOR: EXIF orientation
  applied, alpha dropped, 16-bit samples reduced to their high byte). Raises OSError /
  ValueError (with the reason) for anything that is not a readable image.
  """
  if isinstance(source, np.ndarray):
    arr = source
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
      raise ValueError(f'an image array must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}.')
    if arr.dtype != np.uint8:
      raise ValueError(f'an image array must be uint8 (0..255); got {arr.dtype}.')
    return np.ascontiguousarray(arr[..., :3])
  if isinstance(source, Image.Image):
    return mmseg_rules.image_to_rgb(source)
  with open(source, 'rb') as f:
    return mmseg_rules.decode_image(f.read())


# ------------------------------------------------------------------------------------------------
# The predictor: compiled functions per bucket.


@dataclasses.dataclass
class Prepared:
  """One decoded, test-resized image waiting for its batch."""
  index: int  # position in the input sequence
  name: str
  image: np.ndarray  # (H, W, 3) uint8, the original
  model_input: np.ndarray  # (h, w, 3) float32, resized and normalised
  scaled_size: np.ndarray  # (len(spec.scales), 2) int32: test-resized (h, w) per ratio
  key: Tuple[Tuple[int, int], Tuple[int, int]]  # (input bucket, output bucket)


class Predictor:
  """A model, its variables and config, and the compiled prediction function of every bucket.

  Keep one around to predict repeatedly without recompiling (`predict.segment(images,
  predictor)`). `spec` holds the config's inference settings; `tta` adds multi-scale and flips.
  """

  def __init__(self, model, variables, config: ml_collections.ConfigDict, *,
               source: str = '<memory>'):
    self.model = model
    self.config = config
    self.source = source
    self.spec = inference.InferenceSpec.from_config(config)
    self.num_classes = self.spec.num_classes
    self.palette = visualize.classes(config).colors
    self.variables = jax.device_put(variables)
    self.compiled: Dict[Any, Any] = {}
    self.compile_seconds = 0.0

  # -- configuration ---------------------------------------------------------------------------

  def input_bucket(self, size: Tuple[int, int], bucket: Optional[int]) -> Tuple[int, int]:
    """The (h, w) bucket of a test-resized image of `size`: each side rounded up to a multiple of
    `bucket` (default: the window in 'slide' mode, config.dataset.eval_bucket in 'whole' mode)
    and of the patch size."""
    if bucket is None:
      if self.spec.mode == 'slide':
        multiples = self.spec.crop_size
      else:
        m = int(self.config.dataset.get('eval_bucket', 64))
        multiples = (m, m)
    else:
      multiples = (int(bucket), int(bucket))
    patch = int(self.config.model.patch_size)
    multiples = tuple(_round_up(m, patch) for m in multiples)  # 'whole' needs patch multiples
    return _round_up(size[0], multiples[0]), _round_up(size[1], multiples[1])

  def prepare(self, index: int, name: str, image: np.ndarray, bucket: Optional[int],
              output_bucket: int) -> Prepared:
    """mmseg's test transform of one image: Resize(keep_ratio) with OpenCV's bilinear, Normalize."""
    spec = self.spec
    h, w = image.shape[:2]
    img_scale, min_size = spec.test_img_scale, spec.test_min_size
    size = tuple(max(int(s), 1) for s in mmseg_rules.rescale_size((h, w), img_scale, min_size))
    x = mmseg_rules.resize_linear(image, size).astype(np.float32)
    x = mmseg_rules.normalize(x, spec.mean, spec.std)
    scaled = [mmseg_rules.rescale_size((h, w), mmseg_rules.ratio_scale(img_scale, r), min_size)
              for r in spec.scales]
    key = (self.input_bucket(size, bucket),
           (_round_up(h, output_bucket), _round_up(w, output_bucket)))
    return Prepared(index, name, image, x.astype(np.float32),
                    np.asarray(scaled, np.int32).reshape(-1, 2), key)

  # -- the jitted function ---------------------------------------------------------------------

  def _function(self, spec: inference.InferenceSpec, output_shape,
                with_scores: bool) -> Callable[..., Any]:
    model, k = self.model, self.num_classes
    label_dtype = jnp.uint8 if k <= 256 else jnp.int32

    def fn(variables, images, image_size, scaled_size, label_size):
      score_fn = lambda x: model.apply(variables, x, train=False)
      batch = {'image': images, 'image_size': image_size, 'scaled_size': scaled_size,
               'label_size': label_size}
      probs = inference.predict_probs(score_fn, batch, spec, output_shape=output_shape)
      labels = jnp.argmax(probs, axis=-1).astype(label_dtype)
      return (labels, probs) if with_scores else (labels, None)

    return fn

  def compiled_for(self, key, batch_size: int, tta: bool, with_scores: bool, scores_dtype):
    """The compiled function of a bucket (compiled on first use, ahead of time)."""
    full_key = (key, batch_size, tta, with_scores, np.dtype(scores_dtype).name)
    if full_key not in self.compiled:
      (hb, wb), (ho, wo) = key
      spec = self.spec.with_tta() if tta else self.spec
      base = self._function(spec, (ho, wo), with_scores)

      def fn(variables, images, image_size, scaled_size, label_size):
        labels, probs = base(variables, images, image_size, scaled_size, label_size)
        return labels, (None if probs is None else probs.astype(scores_dtype))

      t0 = time.perf_counter()
      self.compiled[full_key] = jax.jit(fn).lower(
          self.variables,
          jax.ShapeDtypeStruct((batch_size, hb, wb, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
          jax.ShapeDtypeStruct((batch_size, len(self.spec.scales), 2), jnp.int32),
          jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)).compile()
      seconds = time.perf_counter() - t0
      self.compile_seconds += seconds
      logging.info('Compiled the prediction of bucket %dx%d -> %dx%d (batch %d%s) in %.1f s.',
                   hb, wb, ho, wo, batch_size, ', TTA' if tta else '', seconds)
    return self.compiled[full_key]

  def run_batch(self, items: Sequence[Prepared], batch_size: int, tta: bool,
                with_scores: bool, scores_dtype) -> Tuple[Any, Any]:
    """Dispatches one batch (padded with copies of its first image); returns device arrays."""
    key = items[0].key
    (hb, wb), _ = key
    images = np.zeros((batch_size, hb, wb, 3), np.float32)
    image_size = np.zeros((batch_size, 2), np.int32)
    scaled_size = np.zeros((batch_size, *items[0].scaled_size.shape), np.int32)
    label_size = np.zeros((batch_size, 2), np.int32)
    for i in range(batch_size):
      p = items[i] if i < len(items) else items[0]
      h, w = p.model_input.shape[:2]
      images[i, :h, :w] = p.model_input
      image_size[i] = (h, w)
      scaled_size[i] = p.scaled_size
      label_size[i] = p.image.shape[:2]
    fn = self.compiled_for(key, batch_size, tta, with_scores, scores_dtype)
    return fn(self.variables, images, image_size, scaled_size, label_size)


def load(checkpoint: str, config: Optional[Any] = None, step: int = 0) -> Predictor:
  """A Predictor of a converted directory or a training workdir (see `load_checkpoint`)."""
  model, variables, config = load_checkpoint(checkpoint, config, step)
  return Predictor(model, variables, config, source=checkpoint)


# ------------------------------------------------------------------------------------------------
# Running over many images.


@dataclasses.dataclass
class Summary:
  """Counts and times of one `segment` call (the command line prints `line()`)."""
  images: int = 0
  skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
  seconds: float = 0.0
  compile_seconds: float = 0.0
  compilations: int = 0
  buckets: List[Any] = dataclasses.field(default_factory=list)

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds > 0 else 0.0

  def line(self) -> str:
    skipped = f', {len(self.skipped)} skipped' if self.skipped else ''
    return (f'Segmented {self.images} images{skipped} in {self.seconds:.1f} s: '
            f'{self.images_per_second:.2f} images/s ({self.compilations} compilations for '
            f'{len(self.buckets)} shape buckets, {self.compile_seconds:.1f} s of the total).')



def iter_results(predictor: Predictor, sources: Sequence[Tuple[Any, str]], *, tta: bool,
                  batch_size: int, with_scores: bool, scores_dtype, bucket: Optional[int],
                  output_bucket: int, summary: Summary,
                  progress: Optional[Any]) -> Iterator[Tuple[int, str, Optional[Dict[str, Any]]]]:
  """Yields (index, name, result or None) for every (image source, name), in completion order.

  A result is {'labels': (H, W) int32, 'overlay': (H, W, 3) uint8, 'scores': (H, W, K) with
  `with_scores`} at the source's own size; None for a source that cannot be read (logged and
  added to `summary.skipped`). Sources are batched `batch_size` per shape bucket (see
  `Predictor.input_bucket`; `output_bucket`: side multiple of the output buckets); `progress`
  (a tqdm bar or None) advances once per source.
  """
  pending: Dict[Any, List[Prepared]] = {}
  in_flight: List[Tuple[List[Prepared], Any]] = []  # dispatched, not yet fetched
  buckets = set()

  def finish(items, outputs):
    labels, probs = jax.device_get(outputs)
    for i, p in enumerate(items):
      h, w = p.image.shape[:2]
      lab = np.asarray(labels[i, :h, :w], np.int32)
      result = {'labels': lab, 'overlay': visualize.overlay(p.image, lab, predictor.palette)}
      if with_scores:
        result['scores'] = np.asarray(probs[i, :h, :w])
      summary.images += 1
      if progress is not None:
        progress.update(1)
      yield p.index, p.name, result

  def dispatch(items):
    buckets.add(items[0].key)
    outputs = predictor.run_batch(items, batch_size, tta, with_scores, scores_dtype)
    in_flight.append((items, outputs))
    # One batch behind: the device works on this batch while the host writes the previous one.
    while len(in_flight) > 1:
      yield from finish(*in_flight.pop(0))

  for index, (source, name) in enumerate(sources):
    try:
      image = read_image(source)
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {e}'
      where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else name
      logging.warning('Skipping %s: cannot read it as an image (%s).', where, reason)
      summary.skipped.append((where, reason))
      if progress is not None:
        progress.update(1)
      yield index, name, None
      continue
    p = predictor.prepare(index, name, image, bucket, output_bucket)
    group = pending.setdefault(p.key, [])
    group.append(p)
    if len(group) == batch_size:
      del pending[p.key]
      yield from dispatch(group)
  for group in pending.values():
    yield from dispatch(group)
  while in_flight:
    yield from finish(*in_flight.pop(0))
  summary.buckets = sorted(buckets)

