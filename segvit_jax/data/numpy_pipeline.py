"""The input pipeline of in-memory sources (`input_pipeline.IN_MEMORY_SOURCES`: 'synthetic'), in
numpy: no TensorFlow, so the demo, the benchmarks and GPU machines run without it.

Batches have the layouts and the stream rules of `input_pipeline`'s docstring, as `tf_pipeline`
yields them:
- Train: {'image': (b, Ch, Cw, 3) float32 normalised, NHWC, 0 in the padding; 'label':
  (b, Ch, Cw) int32, 255 = ignore / padding}, b = config.batch_size // process_count. The global
  stream chains epochs of the whole split; example p of it belongs to step p // batch_size and
  host h keeps rows [h * b, (h + 1) * b) of each global batch. With dataset.shuffle_buffer > 1,
  epoch e is a full permutation of the split drawn by a numpy generator keyed on (config.seed, e)
  (`epoch_order`): the data is in memory, so no buffer bounds the shuffle. Example p is augmented
  with the uniforms of a numpy generator keyed on (config.seed, p) (`example_uniforms`). So a
  resumed run (`start_step`) computes its first position and goes on, transforming nothing it
  skips, and the batches do not depend on the number of hosts. The order and the draws are
  numpy's, not tf.data's: the two pipelines yield different (equally distributed) streams.
- Eval: test-resized, normalised images 0-padded to dataset.eval_pad_size, labels at the original
  size 255-padded to dataset.eval_label_pad_size, with their sizes and a `valid` flag; each host
  evaluates its contiguous block of the split (`datasets.common.even_range`) and pads its last
  batches with valid=False rows, so that every host yields the same number of batches.

The transforms are mmseg 0.24's (mmseg/datasets/pipelines/transforms.py) through `mmseg_rules`,
the rules `augment` applies in TF: Resize(img_scale, ratio_range, keep_ratio) with cv2
INTER_LINEAR for the image (bit for bit) and INTER_NEAREST for the label, RandomCrop with
cat_max_ratio, RandomFlip, PhotoMetricDistortion, Normalize, Pad. Only the crop window of the
resized image is computed. Fed the same uniforms as `augment.train_transform`, `train_transform`
gives its output, bit for bit as measured on TensorFlow 2.21: PhotoMetricDistortion keeps
augment's integer-valued float32 pixels floored after each step, and its saturation / hue steps
compute in continuous HSV as TensorFlow's CPU kernels of `tf.image.adjust_saturation` /
`adjust_hue` do (`adjust_saturation`, `adjust_hue`), then round as augment does.

A daemon thread transforms the next dataset.prefetch train batches while the device runs a step
(`Prefetcher`).
"""

import collections.abc
import itertools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from segvit_jax.data import input_pipeline
from segvit_jax.data import mmseg_rules
from segvit_jax.data.datasets import common
from segvit_jax.data.datasets import synthetic
from segvit_jax.errors import UserError
from segvit_jax.data.input_pipeline import EVAL_SPLIT, TRAIN_SPLIT
from segvit_jax.data.mmseg_rules import CROP_TRIES, IGNORE_LABEL, NUM_UNIFORMS

# config.dataset.source -> (num_examples(dataset_config, split),
#                           load(dataset_config, split) -> (images, labels), indexable by example:
#                           images[i] (H, W, 3) uint8 RGB, labels[i] (H, W) uint8, 255 = ignore).
_SOURCES = {
    'synthetic': (synthetic.num_examples, synthetic.load),
}
_POLL_S = 0.1  # how often a prefetch thread blocked on a full queue checks for close()
# The keys of the numpy generators drawn from config.seed: the shuffle and the augmentation read
# separate streams, so epoch e's order is independent of the draws at stream position e.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def _source(dataset_config: ml_collections.ConfigDict):
  source = dataset_config.source
  if source not in _SOURCES:
    raise UserError(f'config.dataset.source={source!r} is not an in-memory source; the numpy '
                    f'pipeline reads {sorted(_SOURCES)}.')
  return _SOURCES[source]


def num_examples(dataset_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples of `split` over all hosts; a UserError when the split is empty."""
  n = int(_source(dataset_config)[0](dataset_config, split))
  if n <= 0:
    key = {TRAIN_SPLIT: 'synthetic_num_train', EVAL_SPLIT: 'synthetic_num_val'}.get(split)
    hint = f' (config.dataset.{key}={n})' if dataset_config.source == 'synthetic' and key else ''
    raise UserError(f'The {split} split of config.dataset.source={dataset_config.source!r} is '
                    f'empty{hint}; it needs at least one example.')
  return n


def load_split(dataset_config: ml_collections.ConfigDict, split: str):
  """(images, labels) of `split`: images[i] (H, W, 3) uint8 RGB, labels[i] (H, W) uint8."""
  num_examples(dataset_config, split)
  return _source(dataset_config)[1](dataset_config, split)


# ---------------------------------------------------------------------------------------------
# The stream: which example at which position, with which random numbers.


def _seed_key(seed: int) -> int:
  return int(seed) % 2**64  # numpy seeds are non-negative; negative config seeds wrap


def epoch_order(seed: int, epoch: int, num: int, shuffle: bool) -> np.ndarray:
  """(num,) int64: the example at each place of epoch `epoch` of the global stream.

  A permutation keyed on (seed, epoch) when shuffling, else 0..num-1.
  """
  if not shuffle:
    return np.arange(num)
  rng = np.random.default_rng([_SHUFFLE_STREAM, _seed_key(seed), int(epoch)])
  return rng.permutation(num)


def example_uniforms(seed: int, position: int) -> np.ndarray:
  """(NUM_UNIFORMS,) float64 in [0, 1): every random number of the example at global stream
  position `position`, in `mmseg_rules`' slot layout, keyed on (seed, position)."""
  rng = np.random.default_rng([_AUGMENT_STREAM, _seed_key(seed), int(position)])
  return rng.random(NUM_UNIFORMS)


def host_positions(step: int, global_batch: int, process_index: int,
                   local_batch: int) -> range:
  """Global stream positions of this host's rows of global step `step`."""
  first = step * global_batch + process_index * local_batch
  return range(first, first + local_batch)


# ---------------------------------------------------------------------------------------------
# PhotoMetricDistortion's HSV steps as TensorFlow computes them (float32, CPU kernels).


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  """TensorFlow's `hsv_to_rgb` of adjust_saturation_op.cc, float32: h in [0, 1], s, v."""
  f32 = np.float32
  c = s * v
  m = v - c
  dh = h * f32(6)
  sextant = dh.astype(np.int32)  # truncation; dh == 6 (h rounded up to 1) has no sextant: 0s
  # The kernel's fmod(dh, 2) by loops: up to 0 -> 2, then -2 while >= 2 (dh <= 6: 3 times).
  f = np.where(dh <= 0, dh + f32(2), dh)
  for _ in range(3):
    f = np.where(f >= 2, f - f32(2), f)
  x = c * (f32(1) - np.abs(f - f32(1)))
  zero = np.zeros_like(c)
  table = ((c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x))
  masks = [sextant == k for k in range(6)]
  return np.stack([np.select(masks, [t[i] for t in table], f32(0)) + m for i in range(3)], -1)


def adjust_saturation(image: np.ndarray, factor) -> np.ndarray:
  """`tf.image.adjust_saturation` of float32 RGB (..., 3) on TensorFlow's CPU: to HSV (H in
  [0, 1)), S * factor clipped to [0, 1], back to RGB; float32 as the kernel computes it."""
  f32 = np.float32
  r, g, b = (image[..., i] for i in range(3))
  v = np.maximum(r, np.maximum(g, b))
  spread = v - np.minimum(r, np.minimum(g, b))
  with np.errstate(divide='ignore', invalid='ignore'):
    s = np.where(v > 0, spread / v, f32(0))
    norm = f32(1) / (f32(6) * spread)
    # The kernel adds 2/6 and 4/6 as doubles: the float32 product, a double sum, one rounding.
    h = np.where(r == v, norm * (g - b), np.where(
        g == v, (norm * (b - r)).astype(np.float64) + 2.0 / 6.0,
        (norm * (r - g)).astype(np.float64) + 4.0 / 6.0).astype(f32))
  h = np.where(spread <= 0, f32(0), h)  # grey: the kernel's 0 * inf is replaced by 0
  h = np.where(h < 0, h + f32(1), h)
  s = np.minimum(f32(1), np.maximum(f32(0), s * f32(factor)))
  return _hsv_to_rgb(h, s, v)


def adjust_hue(image: np.ndarray, delta) -> np.ndarray:
  """`tf.image.adjust_hue` of float32 RGB (..., 3) on TensorFlow's CPU (adjust_hue_op.cc): the
  hue as sextant + fraction in [0, 6) between the min and max channel, shifted by 6 * delta
  (`delta` in turns, [-1, 1]); float32 as the kernel computes it."""
  f32 = np.float32
  r, g, b = (image[..., i] for i in range(3))
  # The sextant from the channel order, ties broken as the kernel's if / else chain does.
  r_lt_g = r < g
  order = [r_lt_g & (b < r), r_lt_g & (b > g), r_lt_g, b < g, b > r]
  sextant = np.select(order, [1, 3, 2, 0, 4], 5)
  v_max = np.select(order, [g, b, g, r, b], r)
  v_mid = np.select(order, [r, g, b, g, r], b)
  v_min = np.select(order, [b, r, r, b, g], g)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = (v_mid - v_min) / (v_max - v_min)
  h = sextant.astype(f32) + np.where(sextant % 2 == 0, ratio, f32(1) - ratio)
  h = np.where(v_max == v_min, f32(0), h)
  h = h + f32(delta) * f32(6)
  # The kernel's while loops into [0, 6): twice each covers any delta in [-1, 1].
  for _ in range(2):
    h = np.where(h < 0, h + f32(6), h)
  for _ in range(2):
    h = np.where(h >= 6, h - f32(6), h)
  sextant = h.astype(np.int32)
  ratio = h - sextant.astype(f32)
  ratio = np.where(sextant % 2 == 0, ratio, f32(1) - ratio)
  v_mid = v_min + ratio * (v_max - v_min)
  table = ((v_max, v_mid, v_min), (v_mid, v_max, v_min), (v_min, v_max, v_mid),
           (v_min, v_mid, v_max), (v_mid, v_min, v_max))
  masks = [sextant == k for k in range(5)]  # 5 and anything else: (max, min, mid)
  default = (v_max, v_min, v_mid)
  return np.stack([np.select(masks, [t[i] for t in table], default[i]) for i in range(3)], -1)


def photometric_distortion(image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
  """mmseg 0.24 PhotoMetricDistortion on (h, w, 3) float32 RGB holding integers in [0, 255].

  `params`: `mmseg_rules.photometric_params`. Order: brightness, contrast (if contrast_first),
  saturation, hue, contrast (otherwise); each step clips and truncates as mmseg's uint8 images
  do; saturation and hue in TensorFlow's continuous HSV, rounded (`augment`'s rule).
  """
  p = params

  def contrast(x):
    return mmseg_rules.convert_pixels(x, alpha=p['contrast']) if p['contrast_on'] else x

  x = image
  if p['brightness_on']:
    x = mmseg_rules.convert_pixels(x, beta=p['brightness'])
  if p['contrast_first']:
    x = contrast(x)
  if p['saturation_on']:
    x = mmseg_rules.round_pixels(adjust_saturation(x, p['saturation']))
  if p['hue_on']:
    x = mmseg_rules.round_pixels(adjust_hue(x, np.float32(p['hue']) / np.float32(180)))
  if not p['contrast_first']:
    x = contrast(x)
  return x


# ---------------------------------------------------------------------------------------------
# Train transform of one example.


def pad_bottom_right(x: np.ndarray, size: Sequence[int], value) -> np.ndarray:
  """`x` padded at the bottom / right of its first two dims to `size` with `value` (mmseg Pad)."""
  h, w = x.shape[:2]
  if (h, w) == tuple(size):
    return x
  out = np.full(tuple(size) + x.shape[2:], value, x.dtype)
  out[:h, :w] = x
  return out


def _crop_ok(window: np.ndarray, cat_max_ratio: float) -> bool:
  counts = np.bincount(window.ravel(), minlength=256)
  counts[IGNORE_LABEL] = 0  # mmseg counts the classes without ignore_index
  return bool(mmseg_rules.crop_accepted(counts, cat_max_ratio))


def choose_crop(label: np.ndarray, new_hw: Sequence[int], crop_hw: Sequence[int],
                offsets: np.ndarray, cat_max_ratio: float):
  """mmseg RandomCrop's choice among (CROP_TRIES + 1, 2) candidate (y0, x0) offsets.

  The first of the first CROP_TRIES candidates whose crop of the resized label passes
  `mmseg_rules.crop_accepted`, else the last one, unchecked (mmseg keeps the box it draws after
  the 10th rejection); with cat_max_ratio >= 1 the first, unchecked. `label` (H, W) is the label
  BEFORE resizing to `new_hw`: crops read it through cv2's nearest rule.

  Returns:
    ((y0, x0) ints, the (min(crop_h, new_h), min(crop_w, new_w)) window of the resized label).
  """
  ch, cw = min(crop_hw[0], new_hw[0]), min(crop_hw[1], new_hw[1])
  rows = mmseg_rules.nearest_source_index(np.arange(new_hw[0]), label.shape[0], new_hw[0])
  cols = mmseg_rules.nearest_source_index(np.arange(new_hw[1]), label.shape[1], new_hw[1])

  def window(k):
    y0, x0 = int(offsets[k][0]), int(offsets[k][1])
    return (y0, x0), label[np.ix_(rows[y0:y0 + ch], cols[x0:x0 + cw])]

  if cat_max_ratio >= 1.0:
    return window(0)
  for k in range(CROP_TRIES):
    y0x0, win = window(k)
    if _crop_ok(win, cat_max_ratio):
      return y0x0, win
  return window(CROP_TRIES)


def train_transform(image: np.ndarray, label: np.ndarray, u: np.ndarray, *,
                    crop_size: Sequence[int], img_scale: Sequence[int],
                    ratio_range: Sequence[float], cat_max_ratio: float, flip_prob: float,
                    photometric: bool, mean: Sequence[float], std: Sequence[float],
                    min_size: int = 0) -> dict[str, np.ndarray]:
  """mmseg's training transform of one example, from its uniforms: a pure function.

  Args:
    image: (H, W, 3) uint8 RGB.  label: (H, W) uint8 (255 = ignore).
    u: (NUM_UNIFORMS,) uniforms in [0, 1) (`example_uniforms`; `augment.example_uniforms` gives
      augment.train_transform's, so the two can be compared).
    The rest: config.dataset's (as augment.train_transform).
  Returns:
    {'image': (Ch, Cw, 3) float32 normalised, 0 in the padding;
     'label': (Ch, Cw) int32, 255 in the padding}, (Ch, Cw) = crop_size.
  """
  image, label = np.asarray(image), np.asarray(label)
  if image.shape[:2] != label.shape[:2]:
    raise ValueError(f'train_transform: image and label sizes differ: {image.shape[:2]} vs '
                     f'{label.shape[:2]}.')
  u = np.asarray(u, np.float64)
  scale = mmseg_rules.random_scale(u[mmseg_rules.SLOT_RATIO], img_scale, ratio_range)
  new_hw = tuple(int(s) for s in mmseg_rules.rescale_size(label.shape[:2], scale, min_size))
  offsets = mmseg_rules.crop_offsets(u[mmseg_rules.SLOT_CROP:].reshape(CROP_TRIES + 1, 2),
                                     new_hw, crop_size)
  (y0, x0), lab = choose_crop(label, new_hw, crop_size, offsets, cat_max_ratio)
  rows, cols = y0 + np.arange(lab.shape[0]), x0 + np.arange(lab.shape[1])
  if u[mmseg_rules.SLOT_FLIP] < flip_prob:
    cols, lab = cols[::-1], lab[:, ::-1]  # the flipped crop, read directly
  img = mmseg_rules.resize_linear_window(image, new_hw, rows, cols).astype(np.float32)
  if photometric:
    img = photometric_distortion(img, mmseg_rules.photometric_params(u))
  img = mmseg_rules.normalize(img, mean, std)
  return {'image': pad_bottom_right(img, crop_size, 0.0),
          'label': pad_bottom_right(lab.astype(np.int32), crop_size, IGNORE_LABEL)}


def _train_kwargs(d: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(crop_size=tuple(int(s) for s in d.crop_size),
              img_scale=tuple(d.img_scale), ratio_range=tuple(d.ratio_range),
              cat_max_ratio=float(d.cat_max_ratio), flip_prob=float(d.flip_prob),
              photometric=bool(d.photometric), mean=tuple(d.mean), std=tuple(d.std))


# ---------------------------------------------------------------------------------------------
# Train stream.


class Prefetcher:
  """Iterates `batches` in a daemon thread, up to `size` items ahead of the consumer.

  An exception raised by `batches` is raised again by `next()` in the consumer. `close()` (or
  garbage collection) stops the thread within a fraction of a second; the bounded queue keeps
  it from running ahead.
  """

  def __init__(self, batches: Iterable[Any], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(int(size), 1))
    self._stop = threading.Event()
    self._finished = False
    # The thread holds the queue and the event, not `self`: a dropped iterator is collected.
    self._thread = threading.Thread(target=_produce, args=(iter(batches), self._queue, self._stop),
                                    name='numpy_pipeline-prefetch', daemon=True)
    self._thread.start()

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _End):
      self._finished = True
      if item.error is not None:
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the thread (a batch being transformed is finished first, then dropped)."""
    self._finished = True
    self._stop.set()
    self._thread.join(timeout=10 * _POLL_S)

  def __del__(self):
    self._stop.set()


class _End:
  """The producer's last item: the end of `batches`, or the exception it raised."""

  def __init__(self, error: Optional[BaseException] = None):
    self.error = error


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
  while not stop.is_set():
    try:
      out.put(item, timeout=_POLL_S)
      return True
    except queue.Full:
      continue
  return False


def _produce(batches: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
  try:
    for batch in batches:
      if not _put(out, batch, stop):
        return
  except BaseException as e:  # pylint: disable=broad-except  # surfaces in the consumer
    _put(out, _End(e), stop)
    return
  _put(out, _End(), stop)


def _train_batches(images, labels, *, seed: int, shuffle: bool, global_batch: int,
                   process_index: int, local_batch: int, start_step: int,
                   transform: Callable[..., dict[str, np.ndarray]]) -> Iterator[dict]:
  """This host's batches from global step `start_step` on (the stream rules of the docstring)."""
  num = len(labels)
  epoch, order = -1, None  # positions only grow: one epoch's order at a time
  for step in itertools.count(start_step):
    rows = []
    for position in host_positions(step, global_batch, process_index, local_batch):
      if position // num != epoch:
        epoch = position // num
        order = epoch_order(seed, epoch, num, shuffle)
      k = order[position % num]
      rows.append(transform(images[k], labels[k], example_uniforms(seed, position)))
    yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def create_train_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                         process_count: int, start_step: int = 0) -> Prefetcher:
  """This host's infinite iterator of training batches from global step `start_step` on.

  Batches: {'image': (b, Ch, Cw, 3) float32, 'label': (b, Ch, Cw) int32}, numpy, transformed
  in a background thread dataset.prefetch batches ahead. Config mistakes raise here, errors
  while transforming at the `next()` that would have returned the batch.
  """
  d = config.dataset
  global_batch = int(config.batch_size)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count, 'config.batch_size')
  images, labels = load_split(d, TRAIN_SPLIT)
  kwargs = _train_kwargs(d)

  def transform(image, label, u):
    return train_transform(image, label, u, **kwargs)

  batches = _train_batches(images, labels, seed=int(config.seed),
                           shuffle=int(d.shuffle_buffer) > 1, global_batch=global_batch,
                           process_index=process_index, local_batch=local_batch,
                           start_step=int(start_step), transform=transform)
  return Prefetcher(batches, int(d.prefetch))


# ---------------------------------------------------------------------------------------------
# Eval.


def eval_transform(image: np.ndarray, label: np.ndarray, *, img_scale: Sequence[int],
                   min_size: int, mean: Sequence[float], std: Sequence[float],
                   pad_size: Sequence[int], label_pad_size: Sequence[int],
                   scales: Sequence[float] = (1.0,), name: str = '') -> dict[str, np.ndarray]:
  """The test transform of one example, padded to the static buckets (tf_pipeline.eval_transform).

  Returns {'image': pad_size + (3,) float32, test-resized (mmseg Resize(keep_ratio=True),
  cv2 INTER_LINEAR), normalised, 0-padded; 'image_size': (2,) int32 resized (h, w);
  'scaled_size': (len(scales), 2) int32 resized (h, w) at each test ratio (MultiScaleFlipAug);
  'label': label_pad_size int32 at the original size, 255-padded; 'label_size': (2,) int32;
  'valid': True}. A UserError naming the example and the config key when a resized image or an
  original label does not fit its bucket: never crops silently.
  """
  image_hw = image.shape[:2]
  new_hw = tuple(int(s) for s in mmseg_rules.rescale_size(image_hw, img_scale, min_size))
  for key, size, bucket in (('eval_pad_size', new_hw, pad_size),
                            ('eval_label_pad_size', label.shape[:2], label_pad_size)):
    if size[0] > bucket[0] or size[1] > bucket[1]:
      what = 'resized image' if key == 'eval_pad_size' else 'label'
      raise UserError(f'Eval example {name}: its {what} (h, w)={tuple(size)} does not fit '
                      f'config.dataset.{key}={tuple(bucket)}; raise that bucket.')
  resized = mmseg_rules.resize_linear(image, new_hw).astype(np.float32)
  scaled = [mmseg_rules.rescale_size(image_hw, mmseg_rules.ratio_scale(img_scale, float(r)),
                                     min_size) for r in scales]
  return {
      'image': pad_bottom_right(mmseg_rules.normalize(resized, mean, std), pad_size, 0.0),
      'image_size': np.asarray(new_hw, np.int32),
      'scaled_size': np.asarray(scaled, np.int32).reshape(len(scales), 2),
      'label': pad_bottom_right(np.asarray(label, np.int32), label_pad_size, IGNORE_LABEL),
      'label_size': np.asarray(label.shape[:2], np.int32),
      'valid': np.bool_(True),
  }


def _padding_example(pad_size, label_pad_size, num_scales: int) -> dict[str, np.ndarray]:
  return {
      'image': np.zeros(tuple(pad_size) + (3,), np.float32),
      'image_size': np.zeros(2, np.int32),
      'scaled_size': np.zeros((num_scales, 2), np.int32),
      'label': np.full(tuple(label_pad_size), IGNORE_LABEL, np.int32),
      'label_size': np.zeros(2, np.int32),
      'valid': np.bool_(False),
  }


class EvalBatches(collections.abc.Sequence):
  """This host's eval batches, transformed when read: a re-iterable sequence of known length.

  Batch i holds rows [i * b, (i + 1) * b) of the host's examples, then padding (valid=False).
  """

  def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray, str]], local_batch: int,
               num_batches: int, transform: Callable[..., dict[str, np.ndarray]],
               padding: dict[str, np.ndarray]):
    self._examples = examples
    self._local_batch = local_batch
    self._num_batches = num_batches
    self._transform = transform
    self._padding = padding

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index < 0:
      index += self._num_batches
    if not 0 <= index < self._num_batches:
      raise IndexError(f'eval batch {index} of {self._num_batches}')
    rows = []
    for j in range(index * self._local_batch, (index + 1) * self._local_batch):
      if j < len(self._examples):
        image, label, name = self._examples[j]
        rows.append(self._transform(image, label, name=name))
      else:
        rows.append(self._padding)
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def eval_shard_sizes(config: ml_collections.ConfigDict, process_count: int) -> list[int]:
  """Examples each host evaluates (after config.eval.num_examples), host 0 first."""
  n = num_examples(config.dataset, EVAL_SPLIT)
  sizes = [stop - start for start, stop in (common.even_range(n, i, process_count)
                                            for i in range(process_count))]
  return input_pipeline.limit_eval_shards(sizes, config)


def create_eval_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                        process_count: int, batch_shards: Optional[int] = None) -> EvalBatches:
  """This host's finite eval batches (input_pipeline's layout); as many on every host.

  `batch_shards`: data x fsdp of the mesh the batches go to (default: config.mesh over all
  devices); the global batch is `input_pipeline.eval_batch_size(config, process_count,
  batch_shards)`.
  """
  d = config.dataset
  global_batch = input_pipeline.eval_batch_size(config, process_count, batch_shards)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count,
                                               'config.eval.batch_size')
  pad_size, label_pad_size = input_pipeline.eval_pad_sizes(config)
  sizes = eval_shard_sizes(config, process_count)
  n = num_examples(d, EVAL_SPLIT)
  start, _ = common.even_range(n, process_index, process_count)
  images, labels = load_split(d, EVAL_SPLIT)
  examples = [(images[i], labels[i], f'{d.name} {EVAL_SPLIT} #{i}')
              for i in range(start, start + sizes[process_index])]
  scales = tuple(float(r) for r in config.eval.scales)
  kwargs = dict(img_scale=tuple(d.test_img_scale), min_size=int(d.test_min_size),
                mean=tuple(d.mean), std=tuple(d.std), pad_size=pad_size,
                label_pad_size=label_pad_size, scales=scales)

  def transform(image, label, name):
    return eval_transform(image, label, name=name, **kwargs)

  num_batches = -(-max(sizes) // local_batch)
  return EvalBatches(examples, local_batch, num_batches, transform,
                     _padding_example(pad_size, label_pad_size, len(scales)))
