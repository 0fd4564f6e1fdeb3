r"""Semantic segmentation of image files with a trained or converted SegViT.

    python -m segvit_jax.predict --checkpoint=/tmp/ade_vitb photos/ street.jpg --output=/tmp/out
    python -m segvit_jax.predict --checkpoint=runs/demo val/ --output=/tmp/out --tta --scores

CHECKPOINT is a directory written by `python -m segvit_jax.convert` or a training workdir (its
latest step, or `--step=N`; the config comes from WORKDIR/config.json unless `--config` is
given; a damaged step is one line naming the damaged file and the earlier step that loads).
`--exported=PATH` runs a `segvit-export --format=stablehlo` artifact instead
(`segvit_jax.export.stablehlo_runner`: images resized to the artifact's size, whole-image
inference, no TTA). INPUTs are image files (JPEG, PNG, anything Pillow reads) and folders
(searched recursively for .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp, skipping OUTPUT). Files are read and test-resized as mmseg
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
Inference is evaluation's (`segvit_jax.evaluation.inference`, with the config's `InferenceSpec`):
the config's test resize, sliding windows (or the whole image, as config.eval.mode says), bilinear
resize of the scores to the original size, softmax; `--tta` adds the config's multi-scale ratios
and horizontal flips. The predictor itself (loading, preparing, batching, compiling per bucket)
is `segvit_jax.evaluation.predictor`; this module is the command line and the output files.

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
    from segvit_jax.evaluation import predictor as predictor_lib
    predictor = predictor_lib.load('/tmp/ade_vitb')   # load once, compile once per bucket
    results = predict.segment(['a.jpg', pil_image, uint8_array], predictor, tta=False)
    results[0]['labels']    # (H, W) int32; 'overlay' (H, W, 3) uint8; 'scores' with scores=True
Unreadable inputs give None in `results` (and a warning naming them).

Memory: the scores are resized to the original resolution in-graph, as in evaluation, so one
image costs H * W * K * 4 bytes of device memory there (a 12-megapixel photo with 150 classes:
about 7 GB); downscale very large photos before predicting if that is too much.
"""

import io
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from absl import flags
import numpy as np
from PIL import Image

from segvit_jax import cli
from segvit_jax import fileio
from segvit_jax.errors import UserError
from segvit_jax.evaluation import predictor as predictor_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# Side multiple of the original-resolution output bucket: few distinct output shapes.
DEFAULT_OUTPUT_BUCKET = 256


# ------------------------------------------------------------------------------------------------
# Inputs and outputs.


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


def segment(images: Iterable[Any], checkpoint: Any, *, config: Optional[Any] = None,
            tta: bool = False, batch_size: int = 1, scores: bool = False,
            scores_dtype: Any = np.float16, bucket: Optional[int] = None,
            output_bucket: int = DEFAULT_OUTPUT_BUCKET, output: Optional[str] = None,
            progress: bool = False, summary: Optional[predictor_lib.Summary] = None,
            keep_results: bool = True) -> List[Optional[Dict[str, Any]]]:
  """Segments images; the Python face of the command line.

  Args:
    images: paths, PIL images or (H, W, 3) uint8 RGB arrays, or (source, name) pairs (the name
      is used for outputs and messages).
    checkpoint: a `predictor.Predictor` (reused: no recompilation for buckets it has seen), or
      a path for `predictor.load` (converted directory or training workdir).
    config: with a path: a config to use instead of the checkpoint's (see
      `predictor.load_checkpoint`).
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
  predictor = (checkpoint if isinstance(checkpoint, predictor_lib.Predictor) else
               predictor_lib.load(checkpoint, config))
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
  summary = summary if summary is not None else predictor_lib.Summary()
  compile_before, count_before = predictor.compile_seconds, len(predictor.compiled)
  bar = _progress_bar(len(sources)) if progress else None
  results: List[Optional[Dict[str, Any]]] = [None] * len(sources)
  t0 = time.perf_counter()
  try:
    for index, name, result in predictor_lib.iter_results(
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
  summary = predictor_lib.Summary()
  if f.exported:
    from segvit_jax.export import stablehlo_runner as exported  # pylint: disable=g-import-not-at-top
    exported.segment_files(f.exported, sources, f.output, batch_size=f.batch_size,
                           scores=f.scores, scores_dtype=np.dtype(f.scores_dtype),
                           summary=summary)
  else:
    segment(sources, predictor_lib.load(f.checkpoint, f.config, f.step), tta=f.tta,
            batch_size=f.batch_size, scores=f.scores, scores_dtype=np.dtype(f.scores_dtype),
            bucket=f.bucket, output=f.output, progress=f.progress, summary=summary,
            keep_results=False)
  for name, reason in summary.skipped:
    print(f'Skipped {name}: {reason}', file=sys.stderr)
  print(summary.line(), flush=True)
  return 0 if summary.images > 0 else 1


def run():
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
