r"""Semantic segmentation of image files with a trained or converted SegViT.

    python -m segvit_jax.predict --checkpoint=/tmp/ade_vitb photos/ street.jpg --output=/tmp/out
    python -m segvit_jax.predict --checkpoint=runs/demo val/ --output=/tmp/out --tta --scores

CHECKPOINT is a directory written by `python -m segvit_jax.convert` or a training workdir (its
latest step, or `--step=N`; the config comes from WORKDIR/config.json unless `--config` is
given; a damaged step is one line naming the damaged file and the earlier step that loads).
`--exported=PATH` runs a `segvit-export --format=stablehlo` artifact instead (`segvit_jax.export.stablehlo_runner`:
images resized to the artifact's size, whole-image inference, no TTA). INPUTs are image files
(JPEG, PNG, anything Pillow reads) and folders (searched recursively for
.jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp, skipping OUTPUT). Files are read and test-resized as mmseg
reads them, with the functions training and evaluation use (`mmseg_rules`: OpenCV's decoding, with
the EXIF orientation applied, alpha dropped and 16-bit samples reduced to 8 bits; OpenCV's
bilinear resize), so an image gets the labels evaluation would give it. For every image, OUTPUT
gets

  labels/<name>.png     class indices at the image's own resolution (8-bit grey PNG when the model
                        has at most 256 classes, 16-bit otherwise); read back with
                        `np.asarray(PIL.Image.open(path))`
  overlays/<name>.png   the image blended 50 / 50 with the checkpoint's class colours
  scores/<name>.npy     with --scores: (H, W, K) class probabilities (float16 unless
                        --scores_dtype=float32), what the labels are the argmax of

where <name> is the file's path relative to the folder it was found in (or its bare name).
Inference is evaluation's (`evaluate.predict_probs`): the config's test resize, sliding windows
(or the whole image, as config.eval.mode says), bilinear resize of the scores to the original size,
softmax; `--tta` adds the config's multi-scale ratios and horizontal flips.

Speed: images are decoded and test-resized on the host, padded to a shape bucket (each side
rounded up to a multiple of `--bucket`; default the window size in 'slide' mode, where the
padding costs no model calls, and `config.dataset.eval_bucket` in 'whole' mode) and batched with
images of the same bucket, so a folder of differently sized images compiles once per bucket, not
per image. Results are fetched one batch behind the dispatch, so decoding and writing overlap the
device's work.

An unreadable file (not an image, truncated, ...) is reported by name and skipped; everything
else is still written. Exit status: 0 when at least one image was segmented (skipped files are
listed in the log and the summary), 1 when none was (no inputs found, or all unreadable).

Notebooks:
    from segvit_jax import predict
    predictor = predict.load('/tmp/ade_vitb')         # load once, compile once per bucket
    results = predict.segment(['a.jpg', pil_image, uint8_array], predictor, tta=False)
    results[0]['labels']    # (H, W) int32; 'overlay' (H, W, 3) uint8; 'scores' with scores=True
Unreadable inputs give None in `results` (and a warning naming them).

Memory: the scores are resized to the original resolution in-graph, as in evaluation, so one
image costs H * W * K * 4 bytes of device memory there (a 12-megapixel photo with 150 classes:
about 7 GB); downscale very large photos before predicting if that is too much.
"""

import dataclasses
import io
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from segvit_jax import cli
from segvit_jax.evaluation import evaluate
from segvit_jax import fileio
from segvit_jax.data import mmseg_rules
from segvit_jax.evaluation import visualize
from segvit_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# Side multiple of the original-resolution output bucket: few distinct output shapes.
DEFAULT_OUTPUT_BUCKET = 256


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
  from segvit_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  if isinstance(config, str):
    config = checkpoint_lib.load_config(config)
  if config is None:
    config = checkpoint_lib.saved_config(path, flag='--checkpoint')
  model = segvit.build_model(config.model)
  abstract = nn.unbox(segvit.abstract_params(model))
  params, _ = checkpoint_lib.load_params(path, abstract, config=config, flag='--checkpoint',
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
  scaled_size: np.ndarray  # (len(config.eval.scales), 2) int32: test-resized (h, w) per ratio
  key: Tuple[Tuple[int, int], Tuple[int, int]]  # (input bucket, output bucket)


class Predictor:
  """A model, its variables and config, and the compiled prediction function of every bucket.

  Keep one around to predict repeatedly without recompiling (`segment(images, predictor)`).
  """

  def __init__(self, model, variables, config: ml_collections.ConfigDict, *,
               source: str = '<memory>'):
    self.model = model
    self.config = config
    self.source = source
    self.num_classes = int(config.model.num_classes)
    self.palette = visualize.classes(config).colors
    self.variables = jax.device_put(variables)
    self.compiled: Dict[Any, Any] = {}
    self.compile_seconds = 0.0

  # -- configuration ---------------------------------------------------------------------------

  def eval_config(self, tta: bool) -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict(self.config.eval.to_dict())
    if tta:
      e.multi_scale = True
      e.flip = True
    return e

  def input_bucket(self, size: Tuple[int, int], bucket: Optional[int]) -> Tuple[int, int]:
    e = self.config.eval
    if bucket is None:
      if e.mode == 'slide':
        multiples = tuple(int(s) for s in e.crop_size)
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
    d = self.config.dataset
    h, w = image.shape[:2]
    img_scale, min_size = tuple(d.test_img_scale), int(d.get('test_min_size', 0))
    size = tuple(max(int(s), 1) for s in mmseg_rules.rescale_size((h, w), img_scale, min_size))
    x = mmseg_rules.resize_linear(image, size).astype(np.float32)
    x = mmseg_rules.normalize(x, tuple(d.mean), tuple(d.std))
    scaled = [mmseg_rules.rescale_size((h, w), mmseg_rules.ratio_scale(img_scale, float(r)),
                                       min_size) for r in self.config.eval.scales]
    key = (self.input_bucket(size, bucket),
           (_round_up(h, output_bucket), _round_up(w, output_bucket)))
    return Prepared(index, name, image, x.astype(np.float32),
                    np.asarray(scaled, np.int32).reshape(-1, 2), key)

  # -- the jitted function ---------------------------------------------------------------------

  def _function(self, eval_config, output_shape, with_scores: bool) -> Callable[..., Any]:
    model, k = self.model, self.num_classes
    d = self.config.dataset
    test_img_scale = tuple(int(s) for s in d.test_img_scale)
    test_min_size = int(d.get('test_min_size', 0))
    label_dtype = jnp.uint8 if k <= 256 else jnp.int32

    def fn(variables, images, image_size, scaled_size, label_size):
      score_fn = lambda x: model.apply(variables, x, train=False)
      batch = {'image': images, 'image_size': image_size, 'scaled_size': scaled_size,
               'label_size': label_size}
      probs = evaluate.predict_probs(score_fn, batch, eval_config=eval_config, num_classes=k,
                                     test_img_scale=test_img_scale, test_min_size=test_min_size,
                                     output_shape=output_shape)
      labels = jnp.argmax(probs, axis=-1).astype(label_dtype)
      return (labels, probs) if with_scores else (labels, None)

    return fn

  def compiled_for(self, key, batch_size: int, tta: bool, with_scores: bool, scores_dtype):
    """The compiled function of a bucket (compiled on first use, ahead of time)."""
    full_key = (key, batch_size, tta, with_scores, np.dtype(scores_dtype).name)
    if full_key not in self.compiled:
      (hb, wb), (ho, wo) = key
      base = self._function(self.eval_config(tta), (ho, wo), with_scores)

      def fn(variables, images, image_size, scaled_size, label_size):
        labels, probs = base(variables, images, image_size, scaled_size, label_size)
        return labels, (None if probs is None else probs.astype(scores_dtype))

      t0 = time.perf_counter()
      self.compiled[full_key] = jax.jit(fn).lower(
          self.variables,
          jax.ShapeDtypeStruct((batch_size, hb, wb, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
          jax.ShapeDtypeStruct((batch_size, len(self.config.eval.scales), 2), jnp.int32),
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
# The loop over inputs.


def find_inputs(inputs: Sequence[str], exclude: Optional[str] = None) -> List[Tuple[str, str]]:
  """(path, output name without extension) of every image under `inputs`, in order.

  Folders are searched recursively for IMAGE_EXTENSIONS (sorted), skipping the folder `exclude`
  (the output folder: a rerun must not segment its own outputs); a file named explicitly is
  tried whatever its extension. Names are relative to the folder given; a name that would repeat
  gets a '-1', '-2', ... suffix. A missing input is an error naming it.
  """
  skip = os.path.realpath(exclude) if exclude else None
  found = []
  for item in inputs:
    if os.path.isdir(item):
      if os.path.realpath(item) == skip:
        continue
      for dirpath, dirnames, filenames in os.walk(item):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.realpath(os.path.join(dirpath, d)) != skip)
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            path = os.path.join(dirpath, f)
            found.append((path, os.path.splitext(os.path.relpath(path, item))[0]))
    elif os.path.exists(item):
      found.append((item, os.path.splitext(os.path.basename(item))[0]))
    else:
      raise FileNotFoundError(f'Input {item!r} does not exist.')
  seen, out = {}, []
  for path, name in found:
    n = seen.get(name, 0)
    seen[name] = n + 1
    out.append((path, name if n == 0 else f'{name}-{n}'))
  return out


def write_outputs(output: str, name: str, result: Mapping[str, Any]) -> None:
  """labels/<name>.png, overlays/<name>.png and, when present, scores/<name>.npy under output;
  each file whole or not at all (`fileio.replace_file`)."""
  labels = result['labels']
  images = {'labels': (Image.fromarray(labels.astype(np.uint8), mode='L')
                       if labels.max(initial=0) < 256 else
                       Image.fromarray(labels.astype(np.uint16))),
            'overlays': Image.fromarray(result['overlay'])}
  for kind, image in images.items():
    png = io.BytesIO()
    image.save(png, format='PNG')
    _write(os.path.join(output, kind, name + '.png'), png.getvalue())
  if result.get('scores') is not None:
    npy = io.BytesIO()
    np.save(npy, result['scores'])
    _write(os.path.join(output, 'scores', name + '.npy'), npy.getvalue())


def _write(path: str, data: bytes) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError as e:
    raise fileio.cannot_write(path, e) from e
  fileio.replace_file(path, data)


@dataclasses.dataclass
class Summary:
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


def _iter_results(predictor: Predictor, sources: Sequence[Tuple[Any, str]], *, tta: bool,
                  batch_size: int, with_scores: bool, scores_dtype, bucket: Optional[int],
                  output_bucket: int, summary: Summary,
                  progress: Optional[Any]) -> Iterator[Tuple[int, str, Optional[Dict[str, Any]]]]:
  """Yields (index, name, result or None) for every source, in completion order."""
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


def segment(images: Iterable[Any], checkpoint: Any, *, config: Optional[Any] = None,
            tta: bool = False, batch_size: int = 1, scores: bool = False,
            scores_dtype: Any = np.float16, bucket: Optional[int] = None,
            output_bucket: int = DEFAULT_OUTPUT_BUCKET, output: Optional[str] = None,
            progress: bool = False, summary: Optional[Summary] = None,
            keep_results: bool = True) -> List[Optional[Dict[str, Any]]]:
  """Segments images; the Python face of the command line.

  Args:
    images: paths, PIL images or (H, W, 3) uint8 RGB arrays, or (source, name) pairs (the name
      is used for outputs and messages).
    checkpoint: a `Predictor` (reused: no recompilation for buckets it has seen), or a path
      for `load` (converted directory or training workdir).
    config: with a path: a config to use instead of the checkpoint's (see `load_checkpoint`).
    tta: multi-scale + flip test-time augmentation (config.eval.scales).
    batch_size: images per model call; images of one shape bucket are batched together.
    scores: also return (H, W, K) class probabilities as `scores_dtype`.
    bucket: side multiple of the input buckets (default: see the module docstring).
    output_bucket: side multiple of the original-resolution output buckets.
    output: when set, also write labels/overlays(/scores) there as the command line does.
    progress: show a tqdm progress bar over the inputs.
    summary: a `Summary` to fill with counts and times.
    keep_results: False returns only None entries (the command line: outputs go to files and
      memory stays bounded by the batches in flight).

  Returns:
    One entry per input, in input order: {'labels': (H, W) int32 class indices at the input's
    resolution, 'overlay': (H, W, 3) uint8, 'name': str, 'scores': (H, W, K) if requested}, or
    None for an input that could not be read (a warning names it).
  """
  predictor = checkpoint if isinstance(checkpoint, Predictor) else load(checkpoint, config)
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
  sources = []
  for i, item in enumerate(images):
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
      sources.append(item)
    elif isinstance(item, (str, os.PathLike)):
      sources.append((os.fspath(item), os.fspath(item)))
    else:
      sources.append((item, f'image_{i}'))
  summary = summary if summary is not None else Summary()
  compile_before, count_before = predictor.compile_seconds, len(predictor.compiled)
  bar = _progress_bar(len(sources)) if progress else None
  results: List[Optional[Dict[str, Any]]] = [None] * len(sources)
  t0 = time.perf_counter()
  try:
    for index, name, result in _iter_results(
        predictor, sources, tta=tta, batch_size=batch_size, with_scores=scores,
        scores_dtype=scores_dtype, bucket=bucket, output_bucket=output_bucket,
        summary=summary, progress=bar):
      if result is None:
        continue
      result['name'] = name
      if output is not None:
        write_outputs(output, name, result)
      if keep_results:
        results[index] = result
  finally:
    if bar is not None:
      bar.close()
  summary.seconds = time.perf_counter() - t0
  summary.compile_seconds = predictor.compile_seconds - compile_before
  summary.compilations = len(predictor.compiled) - count_before
  return results


def _progress_bar(total: int):
  """A tqdm bar on stderr, or None where tqdm is not installed (it comes with TFDS; a minimal
  environment segments without a bar, and the summary line still follows)."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, unit='img', desc='segment', file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
  """The command line's flags, defined only when predict runs as a program (so that the module
  imports next to segvit_jax.main, whose --config it would clash with)."""
  flags.DEFINE_string('checkpoint', None,
                      'A segvit_jax.convert output directory or a training workdir.')
  flags.DEFINE_string('output', None, 'Output folder (labels/, overlays/, scores/).')
  flags.DEFINE_string('config', None,
                      "Config file (configs/*.py or config.json) instead of the checkpoint's.")
  flags.DEFINE_integer('step', 0, 'The step of a training workdir to read; 0: its latest.')
  flags.DEFINE_bool('tta', False, 'Multi-scale + flip test-time augmentation.')
  flags.DEFINE_integer('batch_size', 1, 'Images per model call (same shape bucket).')
  flags.DEFINE_bool('scores', False, 'Also write (H, W, K) class probabilities (.npy).')
  flags.DEFINE_enum('scores_dtype', 'float16', ['float16', 'float32'],
                    'Precision of the written scores.')
  flags.DEFINE_integer(
      'bucket', None, 'Side multiple of the input shape buckets (default: the eval window in '
      'slide mode, config.dataset.eval_bucket in whole mode).')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')
  flags.DEFINE_string('exported', None, 'A segvit-export --format=stablehlo artifact to run '
                      'instead of a checkpoint (each image resized to its size; see '
                      'segvit_jax.export.stablehlo_runner).')


USAGE = ('python -m segvit_jax.predict --checkpoint=DIR|--exported=PATH INPUT... --output=OUT '
         '[--tta] [--batch_size=N] [--scores]')


def main(argv: Sequence[str]) -> int:
  f = flags.FLAGS
  inputs = list(argv[1:])
  if bool(f.checkpoint) == bool(f.exported):
    raise UserError(f'give one of --checkpoint=DIR and --exported=PATH: {USAGE}')
  if f.exported and (f.tta or f.config or f.step):
    raise UserError('--tta, --config and --step need --checkpoint: an exported model is fixed.')
  if not f.output:
    raise UserError(f'--output=OUT is required: {USAGE}')
  if not inputs:
    raise UserError(f'no INPUT images or folders given: {USAGE}')
  if f.batch_size < 1:
    raise UserError(f'--batch_size={f.batch_size} must be at least 1.')
  cli.check_writable_dir(f.output, '--output')
  try:
    sources = find_inputs(inputs, exclude=f.output)
  except FileNotFoundError as e:
    raise UserError(str(e)) from e
  if not sources:
    raise UserError(f'no images found in {inputs} (extensions {", ".join(IMAGE_EXTENSIONS)}).')
  summary = Summary()
  if f.exported:
    from segvit_jax.export import stablehlo_runner as exported  # pylint: disable=g-import-not-at-top
    exported.segment_files(f.exported, sources, f.output, batch_size=f.batch_size,
                           scores=f.scores, scores_dtype=np.dtype(f.scores_dtype),
                           summary=summary)
  else:
    segment(sources, load(f.checkpoint, f.config, f.step), tta=f.tta, batch_size=f.batch_size,
            scores=f.scores, scores_dtype=np.dtype(f.scores_dtype), bucket=f.bucket,
            output=f.output, progress=f.progress, summary=summary, keep_results=False)
  for name, reason in summary.skipped:
    print(f'Skipped {name}: {reason}', file=sys.stderr)
  print(summary.line(), flush=True)
  return 0 if summary.images > 0 else 1


def run():
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
