r"""Export a trained or converted SegViT for serving: StableHLO, TF SavedModel or ONNX.

    segvit-export --checkpoint=DIR --format=stablehlo --size=512x512 --output=segvit.shlo
    segvit-export --checkpoint=DIR --format=savedmodel --size=512x512 --output=saved/ --end_to_end
    segvit-export --checkpoint=DIR --format=onnx --size=480x640 --output=segvit.onnx

DIR is what `predict --checkpoint` takes: a `segvit-convert` output or a training workdir. What is
exported is whole-image inference at one size (`--size=HxW`, default the config's img_size;
each side a multiple of the patch size), the batch size left open:

  model mode (default)   images (B, H, W, 3) float32 NHWC RGB, normalised as the config's dataset
                         says ((x - mean) / std) -> scores (B, H, W, K) float32, non-negative
                         (the model's eval output; the label is their arg-max)
  --end_to_end           images (B, H, W, 3) uint8 RGB -> labels (B, H, W) int32 and scores
                         (B, H, W, K) float32, the normalisation inside

Resizing an image to H x W and sliding windows stay with the caller (`segvit-predict` does both).

Formats (PATH is a file for stablehlo and onnx, a directory for savedmodel):

  stablehlo    `jax.export` serialisation, lowered for `--platforms` (default cpu; e.g.
               cpu,cuda,tpu); loading it needs only jax: `segvit_jax.export.stablehlo_runner` (one file, jax and
               numpy only) or `jax.export.deserialize(open(PATH, 'rb').read()).call(images)`.
  savedmodel   jax2tf with native serialisation: signature 'serving_default' (input `images`),
               weights as variables, images run one by one (see `write_savedmodel`);
               `tf.saved_model.load(PATH)` and TF Serving load it.
  onnx         jax2onnx (`segvit_jax.export.to_onnx`), opset 23; onnxruntime runs it on CPU.

Every format gets the same JSON sidecar (stablehlo and onnx: PATH.json; savedmodel:
PATH/segvit.json; onnx also in the model's metadata_props): input layout, size and dtype,
outputs, normalisation, class names, palette, platforms and the versions that made it.
`--dtype=bfloat16` computes in bfloat16 (stablehlo, savedmodel; onnxruntime's CPU kernels have no
bfloat16 matrix products). Everything is checked before anything is written, and the artifact
is written under a temporary name and renamed at the end: a failed export leaves no file.

Python:
    from segvit_jax.export import artifacts as export
    info = export.export('DIR', 'stablehlo', (512, 512), 'segvit.shlo')   # the sidecar dict
    fn, spec = export.inference_function(model, variables, config, (512, 512))
"""

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax import fileio
from segvit_jax.errors import UserError

FORMATS = ('stablehlo', 'savedmodel', 'onnx')
# jax.export's platform names (jax's 'gpu' is spelled 'cuda' or 'rocm' there).
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
DTYPES = ('float32', 'bfloat16')
SIDECAR_FORMAT = 'segvit_jax.export/1'
SAVEDMODEL_SIDECAR = 'segvit.json'
_VERSIONED = ('segvit_jax', 'jax', 'jaxlib', 'flax')
_FORMAT_PACKAGES = {'stablehlo': (), 'savedmodel': ('tensorflow-cpu', 'tensorflow'),
                    'onnx': ('jax2onnx', 'onnx')}


@dataclasses.dataclass(frozen=True)
class Request:
  """One export: everything `export` checks before it loads or writes anything."""
  format: str
  size: Tuple[int, int]
  output: str
  end_to_end: bool = False
  platforms: Tuple[str, ...] = ('cpu',)
  dtype: str = 'float32'


def parse_size(text: str, flag: str = '--size') -> Tuple[int, int]:
  """'HxW' or 'S' (square) -> (H, W); UserError otherwise."""
  m = re.fullmatch(r'\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*', str(text))
  if not m or int(m.group(1)) < 1 or int(m.group(2) or 1) < 1:
    raise UserError(f'{flag}={text} is not a size: give HxW in pixels, e.g. {flag}=512x512.')
  return int(m.group(1)), int(m.group(2) or m.group(1))


def sidecar_path(fmt: str, output: str) -> str:
  """Where the JSON sidecar of an artifact at `output` lives."""
  if fmt == 'savedmodel':
    return os.path.join(output, SAVEDMODEL_SIDECAR)
  return output + '.json'


def check_request(r: Request) -> None:
  """UserError naming the flag of a request that cannot work (the checkpoint aside)."""
  if r.format not in FORMATS:
    raise UserError(f'--format={r.format} is not one of {", ".join(FORMATS)}.')
  if r.dtype not in DTYPES:
    raise UserError(f'--dtype={r.dtype} is not one of {", ".join(DTYPES)}.')
  if r.format == 'onnx' and r.dtype != 'float32':
    raise UserError('--dtype=bfloat16 is not available for --format=onnx (onnxruntime has no '
                    'bfloat16 matrix products on CPU); use --dtype=float32, or stablehlo / '
                    'savedmodel for bfloat16.')
  bad = [p for p in r.platforms if p not in PLATFORMS]
  if bad or not r.platforms:
    raise UserError(f'--platforms={",".join(r.platforms)}: each must be one of '
                    f'{", ".join(PLATFORMS)}.')
  if r.format == 'onnx' and tuple(r.platforms) != ('cpu',):
    raise UserError('--platforms is for stablehlo and savedmodel; an ONNX model picks its '
                    'device in the runtime (leave --platforms out).')
  if not r.output:
    raise UserError('--output=PATH is required (a file for stablehlo and onnx, a directory '
                    'for savedmodel).')
  out = r.output.rstrip(os.sep) or r.output
  if r.format == 'savedmodel':
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
      raise UserError(f'--output={r.output} already exists and is not an empty directory; '
                      'remove it or choose another.')
  elif os.path.isdir(out):
    raise UserError(f'--output={r.output} is a directory; --format={r.format} writes a file.')
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise UserError(f'--output={r.output}: the folder {parent} does not exist.')
  if not os.access(parent, os.W_OK):
    raise UserError(f'--output={r.output}: the folder {parent} is not writable.')


def check_size(size: Tuple[int, int], patch: int, flag: str = '--size') -> None:
  if any(s % patch for s in size):
    fix = 'x'.join(str(-(-s // patch) * patch) for s in size)
    raise UserError(f'{flag}={size[0]}x{size[1]} is not a multiple of the patch size {patch} '
                    f'on each side; e.g. {flag}={fix}.')


# ------------------------------------------------------------------------------------------------
# The function exported.


def export_model(config: ml_collections.ConfigDict, dtype: str = 'float32',
                 fmt: str = 'stablehlo'):
  """The model an export of format `fmt` traces: `config.model` with the portable attention
  ('xla': the Pallas and cuDNN kernels are custom calls of one platform, 'per_head' only saves
  training memory) and the compute dtype asked for; for savedmodel, GELU's erf written out
  (`vit.rational_erf`: TensorFlow cannot read jax's erf). Parameters stay float32."""
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  m = ml_collections.ConfigDict(config.model.to_dict())
  m.attention, m.dtype = 'xla', dtype
  m.gelu_erf = 'rational' if fmt == 'savedmodel' else 'lax'
  return segvit.build_model(m)


def inference_function(model, variables, config: ml_collections.ConfigDict,
                       size: Tuple[int, int], end_to_end: bool = False,
                       batch: Any = None) -> Tuple[Callable[..., Any], jax.ShapeDtypeStruct]:
  """(fn, input spec) of whole-image inference at `size` = (H, W).

  Model mode: fn(images (B, H, W, 3) float32, normalised) -> scores (B, H, W, K) float32.
  End to end: fn(images (B, H, W, 3) uint8 RGB) -> (labels (B, H, W) int32, scores).
  `variables` are closed over (constants of the traced program). `batch`: the batch dimension
  of the spec, an int or a symbolic dimension (default: a fresh symbolic 'batch').
  """
  from segvit_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  if batch is None:
    batch = jax.export.symbolic_shape('batch')[0]
  h, w = size
  spec = inference.InferenceSpec.from_config(config)
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)

  def scores(images):
    return model.apply(variables, images, train=False).astype(jnp.float32)

  if not end_to_end:
    return scores, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)

  def end_to_end_fn(images):
    # As the host pipeline (mmseg_rules.normalize): float32 subtraction, then division.
    x = (images.astype(jnp.float32) - mean) / std
    s = scores(x)
    return jnp.argmax(s, axis=-1).astype(jnp.int32), s

  return end_to_end_fn, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)


def _versions(fmt: str) -> Dict[str, str]:
  out = {}
  for name in _VERSIONED + _FORMAT_PACKAGES[fmt]:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def sidecar(config: ml_collections.ConfigDict, r: Request, source: str) -> Dict[str, Any]:
  """The JSON description of an export (what a server needs besides the artifact)."""
  from segvit_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
  h, w = r.size
  spec = inference.InferenceSpec.from_config(config)
  k = int(config.model.num_classes)
  classes = visualize.classes(config)
  scores = {'name': 'scores', 'shape': [None, h, w, k], 'dtype': 'float32',
            'meaning': 'per-class scores (non-negative); the label is their arg-max'}
  outputs = ([{'name': 'labels', 'shape': [None, h, w], 'dtype': 'int32'}, scores]
             if r.end_to_end else [scores])
  return {
      'format': SIDECAR_FORMAT,
      'artifact': r.format,
      'mode': 'end_to_end' if r.end_to_end else 'model',
      'input': {'name': 'images', 'layout': 'NHWC', 'shape': [None, h, w, 3],
                'dtype': 'uint8' if r.end_to_end else 'float32', 'channels': 'RGB'},
      'outputs': outputs,
      'size': [h, w],
      'normalization': {'mean': list(spec.mean), 'std': list(spec.std),
                        'formula': '(rgb - mean) / std',
                        'applied': 'inside' if r.end_to_end else 'by the caller'},
      'num_classes': k,
      'class_names': list(classes.names),
      'palette': classes.colors.tolist(),
      'model': {'name': config.model.name, 'patch_size': int(config.model.patch_size),
                'img_size': [int(s) for s in config.model.img_size], 'dtype': r.dtype},
      'platforms': list(r.platforms) if r.format != 'onnx' else ['onnxruntime'],
      'source': os.path.abspath(source) if source else None,
      'versions': _versions(r.format),
  }


# ------------------------------------------------------------------------------------------------
# The writers: each writes its artifact at a temporary path.


def stablehlo_bytes(fn: Callable[..., Any], spec: jax.ShapeDtypeStruct,
                    platforms: Sequence[str]) -> bytes:
  """The serialised `jax.export.Exported` of fn at spec (the batch symbolic)."""
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  return bytes(exported.serialize())


def write_savedmodel(model, params, config, r: Request, directory: str) -> None:
  """jax2tf (native serialisation) of fn(params, image) with the params as tf.Variables, so the
  weights live in the SavedModel's variables, not inside the serialised module.

  The module is lowered for one image and the signature maps it over the batch (`tf.map_fn`):
  with a symbolic batch, jax >= 0.11 adds shape-assertion custom calls in a StableHLO form newer
  than TensorFlow 2.21 reads.
  """
  from segvit_jax.errors import import_tensorflow_module  # pylint: disable=g-import-not-at-top
  tf = import_tensorflow_module('tensorflow', '--format=savedmodel')
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  h, w = r.size
  leaves, treedef = jax.tree.flatten(params)

  def one_image(flat, image):
    fn, _ = inference_function(model, {'params': jax.tree.unflatten(treedef, flat)}, config,
                               r.size, r.end_to_end, batch=1)
    out = fn(image[None])
    return tuple(o[0] for o in out) if r.end_to_end else out[0]

  converted = jax2tf.convert(one_image, native_serialization_platforms=r.platforms,
                             with_gradient=False)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  in_dtype = tf.uint8 if r.end_to_end else tf.float32
  k = int(config.model.num_classes)
  scores_spec = tf.TensorSpec((h, w, k), tf.float32)
  out_spec = (tf.TensorSpec((h, w), tf.int32), scores_spec) if r.end_to_end else scores_spec

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec((None, h, w, 3), in_dtype, name='images')])
  def serve(images):
    out = tf.map_fn(lambda image: converted(module.params, image), images,
                    fn_output_signature=out_spec)
    if r.end_to_end:
      return {'labels': out[0], 'scores': out[1]}
    return {'scores': out}

  module.serve = serve
  tf.saved_model.save(module, directory, signatures={'serving_default': serve})


# ------------------------------------------------------------------------------------------------
# The whole export.


def export(checkpoint: str, format: str,  # pylint: disable=redefined-builtin
           size: Tuple[int, int], output: str, *, end_to_end: bool = False,
           platforms: Sequence[str] = ('cpu',),
           dtype: str = 'float32', config: Optional[Any] = None) -> Dict[str, Any]:
  """Exports the checkpoint (a converted directory or a training workdir) to `output`.

  Returns the sidecar dict (also written next to the artifact). Raises UserError for a request
  that cannot work, before anything is written.
  """
  from segvit_jax.evaluation import predictor  # pylint: disable=g-import-not-at-top
  r = Request(format, tuple(int(s) for s in size), os.fspath(output), bool(end_to_end),
              tuple(platforms), dtype)
  check_request(r)
  # A missing converter is one line before the checkpoint is read.
  if r.format == 'onnx':
    from segvit_jax.export import to_onnx as export_onnx  # pylint: disable=g-import-not-at-top
    export_onnx.import_jax2onnx()
  elif r.format == 'savedmodel':
    from segvit_jax.errors import import_tensorflow_module  # pylint: disable=g-import-not-at-top
    import_tensorflow_module('tensorflow', '--format=savedmodel')
  if not os.path.isdir(checkpoint):
    raise UserError(f'--checkpoint={checkpoint} is not a directory: give a segvit-convert '
                    'output or a training workdir.')
  _, variables, config = predictor.load_checkpoint(checkpoint, config)
  check_size(r.size, int(config.model.patch_size))
  model = export_model(config, r.dtype, r.format)
  info = sidecar(config, r, checkpoint)
  write(model, variables, config, r, info)
  return info


def write(model, variables, config, r: Request, info: Dict[str, Any]) -> None:
  """Writes the artifact and its sidecar whole: a SavedModel directory is built under a temporary
  name and renamed; a file and its sidecar are each replaced whole (`fileio.replace_file`)."""
  out = r.output.rstrip(os.sep) or r.output
  text = json.dumps(info, indent=1)
  if r.format == 'savedmodel':
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(out) + '.', dir=parent)
    try:
      staged = os.path.join(tmp, 'savedmodel')
      write_savedmodel(model, variables['params'], config, r, staged)
      with open(os.path.join(staged, SAVEDMODEL_SIDECAR), 'w', encoding='utf-8') as f:
        f.write(text)
      if os.path.isdir(out):
        os.rmdir(out)  # empty: check_request said so
      os.rename(staged, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  fn, spec = inference_function(model, variables, config, r.size, r.end_to_end)
  if r.format == 'stablehlo':
    data = stablehlo_bytes(fn, spec, r.platforms)
  else:
    from segvit_jax.export import to_onnx as export_onnx  # pylint: disable=g-import-not-at-top
    data = export_onnx.onnx_bytes(fn, spec, info)
  fileio.replace_file(sidecar_path(r.format, out), text)
  fileio.replace_file(out, data)


# ------------------------------------------------------------------------------------------------
# Command line.


USAGE = ('segvit-export --checkpoint=DIR --format={stablehlo,savedmodel,onnx} --size=HxW '
         '--output=PATH [--end_to_end] [--platforms=cpu,cuda,tpu] [--dtype=bfloat16]')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'A segvit-convert output directory or a training '
                      'workdir.')
  flags.DEFINE_string('format', None, f'One of {", ".join(FORMATS)}.')
  flags.DEFINE_string('size', None, "HxW of the exported input (default: the config's "
                      'model.img_size); multiples of the patch size.')
  flags.DEFINE_string('output', None, 'The artifact: a file (stablehlo, onnx) or a directory '
                      '(savedmodel).')
  flags.DEFINE_string('config', None, "Config file instead of the checkpoint's config.json.")
  flags.DEFINE_bool('end_to_end', False, 'uint8 RGB in, labels and scores out (normalisation '
                    'inside).')
  flags.DEFINE_list('platforms', ['cpu'], f'stablehlo / savedmodel: lower for these '
                    f'({", ".join(PLATFORMS)}).')
  flags.DEFINE_string('dtype', 'float32', f'Compute dtype: {" or ".join(DTYPES)}.')


def main(argv: Sequence[str]) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])}: {USAGE}')
  for name in ('checkpoint', 'format', 'output'):
    if not f[name].value:
      raise UserError(f'--{name} is required: {USAGE}')
  size = parse_size(f.size) if f.size else None
  if size is None:
    from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from segvit_jax.checkpoint import parameters  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(f.checkpoint):
      raise UserError(f'--checkpoint={f.checkpoint} is not a directory.')
    config = (config_lib.load_config(f.config) if f.config
              else parameters.saved_config(f.checkpoint, flag='--checkpoint'))
    size = tuple(int(s) for s in config.model.img_size)
  t0 = time.perf_counter()
  info = export(f.checkpoint, f.format, size, f.output, end_to_end=f.end_to_end,
                platforms=tuple(f.platforms), dtype=f.dtype, config=f.config)
  seconds = time.perf_counter() - t0
  path = f.output.rstrip(os.sep) or f.output
  nbytes = (sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)
            if os.path.isdir(path) else os.path.getsize(path))
  print(f'Exported {f.checkpoint} -> {path} ({f.format}, {info["mode"]}, '
        f'{size[0]}x{size[1]}, {info["model"]["dtype"]}, {",".join(info["platforms"])}): '
        f'{nbytes / 2**20:.1f} MiB in {seconds:.1f} s; sidecar '
        f'{sidecar_path(f.format, path)}.', flush=True)
  return 0


def run():
  from segvit_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
