r"""Time and peak memory of converting a release-sized SegViT checkpoint (ViT-L, with optimizer).

    .venv/bin/python -m bench.convert_memory [--variant=plain|shrunk] [--workdir=/tmp/bench]

(from the repository root: the checkpoint is made with its `segvit_reference`).

Writes a random-weight ViT-L ADE-640 checkpoint laid out like the released ones (mmcv dict:
`meta` with the config text, `state_dict`, AdamW `optimizer` state with exp_avg and exp_avg_sq,
about 4.1 GB), then runs `python -m segvit_jax.convert` on it in a fresh process and reports the
wall time and that process's peak resident memory (from wait4's rusage). The converter memory-maps
the file and reads only the state dict, so the peak should stay near two copies of the
parameters (the mapped pages it read plus the converted arrays), far below the file size.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VIT_L_ADE = dict(img_size=640, embed_dims=1024, num_layers=24, num_heads=16,
                 decoder_dims=512, decoder_heads=16, num_classes=150)


def write_checkpoint(path: str, variant: str) -> dict:
  """A random-weight release-sized checkpoint; returns sizes. Runs in its own process."""
  import torch  # pylint: disable=g-import-not-at-top
  import segvit_reference as ref  # pylint: disable=g-import-not-at-top
  kwargs = dict(VIT_L_ADE, kind=variant)
  if variant == 'shrunk':
    kwargs.update(out_indices=(7, 23), shrink_idx=8)
  else:
    kwargs.update(out_indices=(7, 15, 23))
  with torch.device('meta'):  # shapes only: no memory for a module we never run
    shapes = {k: tuple(v.shape) for k, v in ref.build(**kwargs).state_dict().items()}
  gen = torch.Generator().manual_seed(0)
  state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
  params = [k for k in state if not k.endswith('empty_weight')]
  optimizer = {
      'state': {i: {'step': torch.tensor(160000.0),
                    'exp_avg': torch.randn(shapes[k], generator=gen) * 1e-4,
                    'exp_avg_sq': torch.rand(shapes[k], generator=gen) * 1e-8}
                for i, k in enumerate(params)},
      'param_groups': [{'lr': 0.0, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0.01,
                        'amsgrad': False, 'params': list(range(len(params)))}],
  }
  meta = {'config': ref.config_text(**kwargs), 'CLASSES': tuple(f'class{i}' for i in range(150)),
          'PALETTE': [[i, i, i] for i in range(150)], 'mmcv_version': '1.4.4', 'iter': 160000}
  torch.save({'meta': meta, 'state_dict': state, 'optimizer': optimizer}, path)
  n = sum(v.numel() for v in state.values())
  del state, optimizer
  return {'parameters': n, 'param_bytes': 4 * n, 'file_bytes': os.path.getsize(path)}


def run_writer(src: str, variant: str) -> dict:
  proc = subprocess.run([sys.executable, '-m', __spec__.name, '--write_only', src,
                         f'--variant={variant}'], cwd=REPO, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise SystemExit(f'writing the checkpoint failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_converter(src: str, dst: str) -> dict:
  """Runs the CLI; its peak RSS from wait4. On Linux a child's ru_maxrss starts from the
  parent's RSS at fork, which is why this parent process stays small (no torch, no arrays)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  start = time.time()
  proc = subprocess.Popen([sys.executable, '-m', 'segvit_jax.convert', src, dst], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.time() - start
  out, err = proc.stdout.read(), proc.stderr.read()
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f'conversion failed:\n{err[-3000:]}')
  return {'seconds': wall, 'peak_rss_bytes': usage.ru_maxrss * 1024,  # Linux: KiB
          'cpu_seconds': usage.ru_utime + usage.ru_stime, 'stdout': out.strip()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='plain', choices=('plain', 'shrunk'))
  parser.add_argument('--workdir', default=None, help='default: a temporary directory')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint and the output')
  parser.add_argument('--write_only', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write_only:
    print(json.dumps(write_checkpoint(args.write_only, args.variant)))
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix='segvit_convert_bench_')
  os.makedirs(workdir, exist_ok=True)
  src, dst = os.path.join(workdir, 'vit_l_random.pth'), os.path.join(workdir, 'converted')
  shutil.rmtree(dst, ignore_errors=True)
  try:
    start = time.time()
    sizes = run_writer(src, args.variant)
    sizes['write_seconds'] = time.time() - start
    result = dict(sizes, **run_converter(src, dst))
  finally:
    if not args.keep:
      shutil.rmtree(workdir, ignore_errors=True)
  gib = 2.0 ** 30
  print(json.dumps({k: v for k, v in result.items() if k != 'stdout'}, indent=2))
  print(f'{args.variant}: {result["parameters"]:,} parameters ({result["param_bytes"] / gib:.2f} '
        f'GiB), checkpoint {result["file_bytes"] / gib:.2f} GiB; conversion {result["seconds"]:.1f}'
        f' s wall, {result["cpu_seconds"]:.1f} s CPU, peak RSS {result["peak_rss_bytes"] / gib:.2f}'
        f' GiB ({result["peak_rss_bytes"] / result["param_bytes"]:.2f}x the parameters, '
        f'{result["peak_rss_bytes"] / result["file_bytes"]:.2f}x the file).')
  print(f'(this process, which forked the converter: peak RSS '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)')


if __name__ == '__main__':
  if not __package__:  # `python bench/convert_memory.py` cannot import segvit_reference
    sys.exit('Run from the repository root: python -m bench.convert_memory')
  main()
