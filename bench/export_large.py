r"""Export time, artifact size, load and run times of a paper config with random weights.

    .venv/bin/python -m bench.export_large [--config=configs/ade20k_large.py] [--size=640x640]
        [--formats=stablehlo] [--batches=1,2] [--workdir=/tmp/bench_export]

Writes a random-weight converted checkpoint of the config (numpy normals, not timed), then for
each format runs `segvit_jax.export.artifacts.export` from it (timed: loading the checkpoint, tracing,
lowering, serialising, writing), and loads and runs the artifact on CPU in a fresh process:
load time, then each batch size twice (the first call compiles, the second is the steady run).
Prints one JSON line per format. The figures in docs/export.md come from here.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: what a server does with the artifact.
_RUN = r'''
import json, sys, time
import numpy as np
fmt, path, h, w, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = time.perf_counter()
if fmt == 'stablehlo':
  import jax
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  run = lambda x: np.asarray(exported.call(x))
elif fmt == 'savedmodel':
  import tensorflow as tf
  serve = tf.saved_model.load(path).signatures['serving_default']
  run = lambda x: serve(images=tf.constant(x))['scores'].numpy()
else:
  import onnxruntime as ort
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  run = lambda x: session.run(None, {'images': x})[0]
out = {'load_s': time.perf_counter() - t}
for b in (int(s) for s in batches.split(',')):
  x = np.random.default_rng(0).normal(size=(b, h, w, 3)).astype(np.float32)
  for attempt in ('first', 'second'):
    t = time.perf_counter()
    scores = run(x)
    out[f'batch{b}_{attempt}_s'] = time.perf_counter() - t
  out[f'batch{b}_shape'] = list(scores.shape)
print(json.dumps(out))
'''


def random_checkpoint(config_path: str, directory: str) -> int:
  """A converted directory of the config with random weights; returns the parameter count."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax.checkpoint import parameters  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(config_path)
  abstract = nn.unbox(segvit.abstract_params(segvit.build_model(config.model)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: 0.02 * rng.standard_normal(a.shape, np.float32), abstract)
  parameters.export_params(directory, params, config, {'source': 'bench: random weights'})
  return sum(int(x.size) for x in jax.tree.leaves(params))


def _size(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path)
               for n in names)
  return os.path.getsize(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'ade20k_large.py'))
  parser.add_argument('--size', default='640x640')
  parser.add_argument('--formats', default='stablehlo')
  parser.add_argument('--batches', default='1,2')
  parser.add_argument('--workdir', default=None, help='default: a temporary folder, removed')
  args = parser.parse_args()
  from segvit_jax.export import artifacts as export  # pylint: disable=g-import-not-at-top
  size = export.parse_size(args.size)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_export_')
  try:
    ckpt = os.path.join(workdir, 'checkpoint')
    if not os.path.isdir(ckpt):
      print(json.dumps({'parameters': random_checkpoint(args.config, ckpt)}), flush=True)
    for fmt in args.formats.split(','):
      out = os.path.join(workdir, {'stablehlo': 'model.shlo', 'onnx': 'model.onnx',
                                   'savedmodel': 'savedmodel'}[fmt])
      t = time.perf_counter()
      export.export(ckpt, fmt, size, out)
      result = {'format': fmt, 'config': os.path.basename(args.config), 'size': list(size),
                'export_s': time.perf_counter() - t, 'bytes': _size(out)}
      proc = subprocess.run([sys.executable, '-c', _RUN, fmt, out, str(size[0]), str(size[1]),
                             args.batches], capture_output=True, text=True, check=False)
      if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
      result.update(json.loads(proc.stdout.splitlines()[-1]))
      print(json.dumps(result), flush=True)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
