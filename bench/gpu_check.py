r"""One prepared check of segvit_jax on one NVIDIA GPU: correctness against the PyTorch reference,
speed next to it and a real training run, in under 8 minutes on an H100 or H200.

  python -m bench.gpu_check --out /tmp/gpu_check                 # one H100 / H200
  python -m bench.gpu_check --dry_run --out /tmp/gc_dry          # the same code paths: CPU, tiny
  python -m bench.gpu_check --out OUT --sections=parity,train_step   # some sections again

Run from the repository root (`-m`: the root's `segvit_jax`, `segvit_reference` and `configs/`).
Writes OUT/gpu_check.json (everything measured, rewritten after each section) and
OUT/gpu_check.md (the table it prints last); exits 1 when a correctness check failed or any
section errored, else 0. docs/gpu.md says how to run it on a borrowed machine without TensorFlow
and without network, and how to read the table. Nothing here imports TensorFlow; every worker and
command-line run records whether something did (`tensorflow_imported`).

Sections (the JSON's keys), in the order they run:
  environment     Python and package versions, the devices, GPU memory, CUDA / cuDNN, the date.
  matmul_ceiling  bf16 8192^3 matmul TFLOP/s (normal random inputs, median of timed calls), JAX
                  and PyTorch: what the chip gives a plain matmul, the second MFU reference.
  parity          a small plain (ViT + ATMHead) and Shrunk (vit_shrink + TPNATMHead) model built by
                  `segvit_reference` (written from the official code) with noisy weights, saved as
                  an mmcv checkpoint and converted by `segvit_jax.convert`; the eval scores, every
                  train output, the ATM loss and its gradients with respect to every parameter and
                  the input image, JAX against PyTorch on the same device. Relative error of a
                  tensor: max |jax - torch| / max |torch|. float32, TF32 off on both sides: the
                  worst <= 1e-4. bfloat16 (JAX model dtype, torch.autocast): JAX's worst error
                  against the float32 reference <= max(2e-2, 3 x PyTorch bf16's own worst), forward
                  outputs and gradients apart (`_verdict`); the direct bf16-to-bf16 errors are
                  reported too.
  attention       `models.attention.attend`, cuDNN against XLA (on CPU: per_head against XLA),
                  outputs and q/k/v gradients in bfloat16 at the models' shapes; bar 2e-2 (bf16
                  keeps 8 bits: one rounding is up to 4e-3 relative, and the two paths round
                  logits, weights and sums at different places).
  train_run       `segvit_jax.main` on configs/synthetic.py, preempted (SIGTERM) halfway; the same
                  command again resumes from the step it saved and finishes (evaluation,
                  final_metrics.json, predictions.png); `segvit_jax.predict` segments a PNG with
                  the run's checkpoint.
  train_step      configs/ade20k_large.py and ade20k_large_shrunk.py (640 crops, 150 classes) in
                  bfloat16 (attention 'auto': cuDNN) and float32 ('auto': XLA), at the largest of
                  16, 8, 4, 2 images that fits (XLA's memory plan of the compiled step against the
                  device, then out-of-memory at run time): compile s, median step s, images/s,
                  peak GPU memory, MFU against the chip's dense bf16 peak and against the measured
                  matmul ceiling (analytic FLOPs, training = 3 x forward); then the PyTorch
                  reference's step (mmseg's: forward, loss, backward, clipping, AdamW) at the same
                  batch and dtype, eager, and with regional torch.compile when it compiles within
                  its budget. float32: JAX's default GPU precision computes f32 matmuls in TF32,
                  so PyTorch gets allow_tf32 as well. Also: whether the official per-GPU batch (2
                  images in float32, no remat) fits.
  slide_eval      ade20k_large's eval step (sliding windows, config.eval) on ADE20K-sized images
                  (512x683, test-resized by the config: 640x854), images/s, JAX and PyTorch.

Processes. The parent imports neither JAX nor PyTorch: every measurement runs in a worker,
`python -m bench.gpu_check --worker=JOB --spec=FILE`, one at a time, each with one framework on
the GPU (PyTorch workers run with JAX_PLATFORMS=cpu; the PyTorch parity worker converts its
reference with JAX on CPU, the JAX one reads it from files), so that
- JAX's preallocation (75% of the GPU by default) never meets PyTorch's allocator, and two
  frameworks' CUDA and cuDNN libraries never share a process; JAX workers set
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (the memory the batch search may plan with);
- each JAX train step has a process of its own: `peak_bytes_in_use` is a per-process maximum;
- a crash, an out-of-memory or a hang costs one worker: the parent kills it at its time limit,
  keeps what it had written (a worker rewrites its result file after each item) and goes on.

Time. The check has a total budget (450 s; 115 s with --dry_run; --budget_s scales every limit)
and each section a share (`Profile.budgets`): a section gets at most its share and never eats the
minimum the later sections need (`Profile.reserves`). Within train_step a (config, dtype) pair, a
batch candidate or torch.compile that would not fit in what is left is skipped, and recorded so.
Without PyTorch, every PyTorch part is left out (one line says so) and recorded as skipped.

--dry_run runs every section the same way on CPU with tiny models and compiles for compile speed
(XLA:CPU at -O0, as the tests do): parity of the Shrunk variant, attention per_head against XLA,
a tiny model's train step in bfloat16 and float32, a 40-step command-line run.
"""

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', None, 'Folder for gpu_check.json and gpu_check.md.',
                           flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'CPU, tiny models: the same code paths.',
                             flag_values=FLAGS)
_SECTIONS = flags.DEFINE_list('sections', [], 'Only these sections (environment always runs).',
                              flag_values=FLAGS)
_BUDGET = flags.DEFINE_float('budget_s', None, 'Total time budget (default: the profile\'s).',
                             flag_values=FLAGS)
_WORKER = flags.DEFINE_string('worker', None, 'Internal: the job a worker process runs.',
                              flag_values=FLAGS)
_SPEC = flags.DEFINE_string('spec', None, 'Internal: the JSON file of a worker\'s job.',
                            flag_values=FLAGS)

SECTIONS = ('environment', 'matmul_ceiling', 'parity', 'attention', 'train_run', 'train_step',
            'slide_eval')
F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
GIB = 2.0**30
TORCH_ABSENT = 'PyTorch parts left out'

# ------------------------------------------------------------------------------------------------
# What a run measures: the GPU check and its tiny CPU twin.

# The parity models (segvit_reference.build arguments); per variant the layout of its taps.
_VARIANTS = {
    'plain': dict(kind='plain', out_indices=(1, 2, 3)),
    'shrunk': dict(kind='shrunk', out_indices=(1, 3), shrink_idx=2),
}

# Tiny configs/synthetic.py overrides for the dry run's train steps and slide evaluation: patch
# 16 and square crops (what the PyTorch reference supports), every tap a stage.
_TINY = {
    'model.img_size': (64, 64), 'model.patch_size': 16, 'model.embed_dim': 32, 'model.depth': 2,
    'model.num_heads': 2, 'model.out_indices': (0, 1), 'model.use_stages': 2,
    'model.decoder_dim': 16, 'model.decoder_heads': 2, 'model.decoder_layers': 2,
    'model.num_classes': 5, 'dataset.crop_size': (64, 64), 'dataset.test_img_scale': (128, 64),
    'eval.mode': 'slide', 'eval.crop_size': (64, 64), 'eval.stride': (48, 48),
}

# The dry run's training CLI run: as tests/tiny_runs.py's, on one device.
_TINY_RUN = {
    'batch_size': 4, 'evals.val.every_steps': -1,
    'evals.figure.num_images': 2, 'keep_checkpoints': 2, 'model.img_size': (32, 32),
    'model.patch_size': 8, 'model.embed_dim': 32, 'model.depth': 2, 'model.num_heads': 2,
    'model.out_indices': (0, 1), 'model.use_stages': 2, 'model.decoder_dim': 16,
    'model.decoder_heads': 2, 'model.decoder_layers': 2, 'model.num_classes': 3,
    'optim.warmup_steps': 2, 'dataset.num_classes': 3, 'dataset.synthetic_image_size': 32,
    'dataset.synthetic_num_train': 16, 'dataset.synthetic_num_val': 4,
    'dataset.crop_size': (32, 32), 'dataset.img_scale': (64, 32),
    'dataset.test_img_scale': (32, 32), 'dataset.eval_pad_size': (32, 32),
    'dataset.eval_label_pad_size': (32, 32), 'dataset.shuffle_buffer': 16,
    'eval.batch_size': 4, 'eval.crop_size': (32, 32), 'eval.mode': 'whole',
}


# XLA:CPU options of the dry run (unless XLA_FLAGS sets them): compile fast rather than run fast;
# on the dry run's tiny programs compiling is most of the time. Both are known to every XLA in the
# jax range (not `--xla_cpu_use_fusion_emitters`: jaxlib >= 0.11 rejects it, fatally).
_FAST_CPU_COMPILE = ('--xla_backend_optimization_level=0',
                     '--xla_cpu_enable_concurrency_optimized_scheduler=false')


@dataclasses.dataclass(frozen=True)
class Profile:
  """The sizes, settings and time budgets (seconds) of one kind of run."""
  name: str
  total_s: float
  budgets: Dict[str, float]  # the most a section may take
  reserves: Dict[str, float]  # the least a section needs: earlier ones leave it
  jax_platforms: Optional[str]  # JAX_PLATFORMS of the workers; None: JAX's choice
  xla_flags: Tuple[str, ...]  # added to XLA_FLAGS where it does not set them
  torch_device: str
  matmul_n: int
  parity_model: Dict[str, Any]  # segvit_reference.build arguments besides the variant's
  parity_variants: Tuple[str, ...]  # of _VARIANTS
  attention_shapes: Tuple[Tuple[int, int, int, int, int], ...]  # (B, Nq, Nk, heads, head dim)
  attention_candidate: str  # compared with 'xla'
  train_configs: Dict[str, Tuple[str, Dict[str, Any]]]  # label -> (config file, overrides)
  train_pairs: Tuple[Tuple[str, str], ...]  # (config label, dtype) in the order they run
  batches: Tuple[int, ...]  # train batch candidates, largest first
  steps: int  # timed steps (after the warm-up ones)
  first_compile_s: float  # the compile time expected before one was measured
  worker_overhead_s: float  # a worker's start-up (imports, device) plus a few steps
  torch_compile: int  # how many pairs, the first ones, get torch.compile
  torch_compile_s: Tuple[float, float]  # (least worth trying, most) seconds for torch.compile
  slide: Dict[str, Any]  # label of a train config, dtype, batch, original image (h, w), steps
  train_run: Dict[str, Any]  # steps, log interval, config overrides


GPU = Profile(
    name='gpu', total_s=450.0,
    budgets={'environment': 40, 'matmul_ceiling': 0, 'parity': 90, 'attention': 40,
             'train_run': 90, 'train_step': 290, 'slide_eval': 70},
    reserves={'environment': 15, 'matmul_ceiling': 0, 'parity': 30, 'attention': 15,
              'train_run': 40, 'train_step': 90, 'slide_eval': 35},
    jax_platforms=None, xla_flags=(), torch_device='cuda', matmul_n=8192,
    parity_model=dict(img_size=256, embed_dims=512, num_layers=4, num_heads=8, decoder_dims=256,
                      decoder_heads=8, decoder_layers=2, num_classes=24),
    parity_variants=('plain', 'shrunk'),
    # ViT-L self-attention at 640 (40x40 tokens), the ATM cross-attention of 150 class queries
    # (decoder 512 / 16 heads), the Shrunk QU queries over the 1/32 tap, long keys.
    attention_shapes=((2, 1600, 1600, 16, 64), (2, 150, 1600, 16, 32), (2, 1600, 400, 16, 32),
                      (2, 150, 4096, 16, 64)),
    attention_candidate='cudnn',
    train_configs={'ade20k_large': ('configs/ade20k_large.py', {}),
                   'ade20k_large_shrunk': ('configs/ade20k_large_shrunk.py', {})},
    # In order of what matters when time runs short: the paper model in bfloat16 (what a GPU
    # trains in), then in float32 (the official recipe's dtype: does its batch of 2 fit?).
    train_pairs=(('ade20k_large', 'bfloat16'), ('ade20k_large', 'float32'),
                 ('ade20k_large_shrunk', 'bfloat16'), ('ade20k_large_shrunk', 'float32')),
    batches=(16, 8, 4, 2), steps=5, first_compile_s=60.0, worker_overhead_s=15.0,
    torch_compile=1,
    torch_compile_s=(45.0, 150.0),
    slide=dict(config='ade20k_large', dtype='bfloat16', batch=2, original_hw=(512, 683), steps=3),
    train_run=dict(steps=300, log_every=10, overrides={
        'checkpoint_every_steps': 100, 'evals.val.every_steps': -1,
        'evals.figure.num_images': 4}),
)

DRY_RUN = Profile(
    name='dry_run', total_s=115.0,
    budgets={'environment': 15, 'matmul_ceiling': 0, 'parity': 40, 'attention': 12,
             'train_run': 40, 'train_step': 45, 'slide_eval': 18},
    reserves={'environment': 5, 'matmul_ceiling': 0, 'parity': 15, 'attention': 5,
              'train_run': 15, 'train_step': 15, 'slide_eval': 8},
    jax_platforms='cpu', xla_flags=_FAST_CPU_COMPILE, torch_device='cpu', matmul_n=256,
    parity_model=dict(img_size=64, embed_dims=64, num_layers=4, num_heads=4, decoder_dims=32,
                      decoder_heads=4, decoder_layers=1, num_classes=7),
    # One variant: the code path is the same for both, and tests/test_parity.py holds the
    # float32 parity of both on CPU.
    parity_variants=('shrunk',),
    # Both large enough for the per-head loop (Nq * Nk >= attention.PER_HEAD_MIN_SIZE).
    attention_shapes=((1, 256, 256, 2, 16), (2, 300, 240, 2, 8)),
    attention_candidate='per_head',
    train_configs={'tiny': ('configs/synthetic.py', _TINY)},
    # One pair: a second runs the same code with another dtype, and every worker start costs
    # seconds of the test suite's time (tests/test_gpu_check.py). float32, so that the official
    # batch's verdict (float32, no remat) has its measurement.
    train_pairs=(('tiny', 'float32'),),
    # torch.compile of even a tiny model takes a minute on 2 cores: the dry run gives it a
    # second, which exercises the worker and its time limit only.
    batches=(4, 2), steps=2, first_compile_s=4.0, worker_overhead_s=4.0, torch_compile=1,
    torch_compile_s=(1.0, 1.0),
    slide=dict(config='tiny', dtype='bfloat16', batch=2, original_hw=(48, 72), steps=2),
    train_run=dict(steps=40, log_every=1, overrides=dict(_TINY_RUN, checkpoint_every_steps=10)),
)


def with_budget(profile: Profile, total_s: float) -> Profile:
  """The profile with every time budget scaled to a total of `total_s` (a slower or busier
  machine: more time everywhere, the same shares)."""
  scale = total_s / profile.total_s
  return dataclasses.replace(
      profile, total_s=total_s, budgets={k: v * scale for k, v in profile.budgets.items()},
      reserves={k: v * scale for k, v in profile.reserves.items()},
      torch_compile_s=tuple(v * scale for v in profile.torch_compile_s))


# ------------------------------------------------------------------------------------------------
# Shared helpers.


def one_line(error: BaseException) -> str:
  """'Type: first line of the message' of an exception."""
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0] if text else ""}'.rstrip(': ')


def rel_err(got, want) -> float:
  """max |got - want| / max |want| over a tensor, in float64 (0 for two zero tensors)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise ValueError(f'shapes differ: {got.shape} vs {want.shape}')
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  diff = float(np.max(np.abs(got - want))) if want.size else 0.0
  return diff / scale if scale > 0 else diff


def load_config(path: str, overrides: Dict[str, Any]):
  """The ConfigDict of a configs/*.py file (relative to the root) with dotted-key overrides;
  JSON lists become tuples."""
  spec = importlib.util.spec_from_file_location('gpu_check_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def eval_resized_hw(config, original_hw) -> Tuple[int, int]:
  """An original (h, w) after the config's test resize (mmseg's Resize, keep_ratio)."""
  from segvit_jax.data import mmseg_rules  # pylint: disable=g-import-not-at-top
  d = config.dataset
  h, w = mmseg_rules.rescale_size(tuple(original_hw), tuple(d.test_img_scale),
                                  int(d.test_min_size))
  return int(h), int(w)


class Clock:
  """Seconds since a start, and what is left of a budget."""

  def __init__(self, budget_s: float):
    self.start = time.monotonic()
    self.budget_s = budget_s

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()


# ------------------------------------------------------------------------------------------------
# Worker side: one job per process, its results rewritten to a JSON file as they come.


class Report(dict):
  """A worker's results; `put` rewrites the file, so a killed worker's finished items remain."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def put(self, key: str, value: Any) -> None:
    self[key] = value
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self, f, indent=1, default=_json_default)
    os.replace(tmp, self.path)


def _json_default(value):
  """numpy scalars and arrays, tuples inside them: JSON."""
  if hasattr(value, 'tolist'):
    return value.tolist()
  return str(value)


_WORKER_CLOCK = Clock(0.0)


def say(message: str) -> None:
  """A progress line of a worker (the parent shows it indented)."""
  print(f'[{_WORKER_CLOCK.elapsed():6.1f} s] {message}', flush=True)


def guarded(report: Report, key: str, fn: Callable[[], Any]) -> Any:
  """report[key] = fn(), or {'status': 'error', 'error': one line} (traceback on stdout)."""
  try:
    value = fn()
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc(file=sys.stdout)
    value = {'status': 'error', 'error': one_line(e)}
  report.put(key, value)
  return value


def run_worker_job(job: str, spec_path: str) -> None:
  """The worker's main: runs JOBS[job] on the spec; records whether TensorFlow got imported."""
  with open(spec_path) as f:
    spec = json.load(f)
  report = Report(spec['result'])
  _WORKER_CLOCK.budget_s = spec.get('budget_s', 0.0)
  report.put('job', job)
  try:
    JOBS[job](spec, report)
  finally:
    report.put('tensorflow_imported', 'tensorflow' in sys.modules)
    report.put('wall_s', _WORKER_CLOCK.elapsed())


# ------------------------------------------------------------------------------------------------
# Jobs: environment and the matmul ceiling.


def _jax_environment() -> Dict[str, Any]:
  """JAX's view of the machine: devices, their memory, the CUDA / cuDNN it loaded."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.extend  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  d = devices[0]
  stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
  out = {'platform': d.platform, 'device_kind': d.device_kind, 'device_count': len(devices),
         'devices': [str(x) for x in devices],
         'backend_version': jax.extend.backend.get_backend().platform_version,
         'bytes_limit_gib': stats['bytes_limit'] / GIB if stats and 'bytes_limit' in stats
                            else None,
         'jax_default_matmul_precision': getattr(jax.config, 'jax_default_matmul_precision',
                                                 None)}
  try:  # private: the CUDA plugin's version queries (absent on CPU-only installs)
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    if cuda_versions is not None:
      for name in ('cuda_runtime_get_version', 'cuda_driver_get_version', 'cudnn_get_version',
                   'cublas_get_version'):
        if hasattr(cuda_versions, name):
          out[name.replace('_get_version', '')] = getattr(cuda_versions, name)()
  except Exception as e:  # pylint: disable=broad-except
    out['cuda_versions_error'] = one_line(e)
  return out


def _median_seconds(fn: Callable[[], Any], reps: int, inner: int) -> Dict[str, float]:
  """Median over `reps` of the seconds per call of `inner` calls back to back; `fn` returns a
  callable that waits for the last call."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner - 1):
      fn()
    fn()()
    times.append((time.perf_counter() - start) / inner)
  return {'median_s': float(np.median(times)), 'min_s': float(np.min(times))}


def _jax_matmul(n: int) -> Dict[str, Any]:
  """bf16 (n, n) @ (n, n) TFLOP/s: 2 n^3 FLOPs per call; normal random inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  c = matmul(a, b).block_until_ready()  # compiles and warms up
  finite = bool(jnp.isfinite(c).all()) and float(jnp.abs(c).max()) > 0

  def call():
    out = matmul(a, b)
    return out.block_until_ready
  timing = _median_seconds(call, reps=10, inner=20)
  return {'n': n, 'dtype': 'bfloat16', 'finite_nonzero': finite, **timing,
          'tflops': 2 * n**3 / timing['median_s'] / 1e12}


def job_basics_jax(spec: Dict[str, Any], report: Report) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  report.put('jax', jax.__version__)
  guarded(report, 'environment', _jax_environment)
  say(f'JAX on {report["environment"].get("device_kind")}; matmul {spec["matmul_n"]}^3 bf16')
  guarded(report, 'matmul', lambda: _jax_matmul(spec['matmul_n']))


def _torch_environment(torch, device: str) -> Dict[str, Any]:
  cuda = torch.device(device).type == 'cuda'
  out = {'torch': torch.__version__, 'device': device, 'cuda_available': torch.cuda.is_available(),
         'torch_cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version()}
  if cuda:
    props = torch.cuda.get_device_properties(device)
    out.update(device_name=props.name, total_memory_gib=props.total_memory / GIB,
               capability=f'{props.major}.{props.minor}',
               multiprocessors=props.multi_processor_count)
  return out


def _torch_matmul(torch, device: str, n: int) -> Dict[str, Any]:
  gen = torch.Generator(device=device).manual_seed(0)
  a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
  b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
  cuda = torch.device(device).type == 'cuda'
  wait = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
  c = a @ b
  wait()
  finite = bool(torch.isfinite(c).all()) and float(c.abs().max()) > 0

  def call():
    torch.matmul(a, b)
    return wait
  timing = _median_seconds(call, reps=10, inner=20)
  return {'n': n, 'dtype': 'bfloat16', 'finite_nonzero': finite, **timing,
          'tflops': 2 * n**3 / timing['median_s'] / 1e12}


def job_basics_torch(spec: Dict[str, Any], report: Report) -> None:
  """Whether PyTorch imports at all ('available'), then its environment and matmul."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    report.put('available', False)
    report.put('reason', one_line(e))
    return
  device = spec['torch_device']
  guarded(report, 'environment', lambda: _torch_environment(torch, device))
  if device == 'cuda' and not torch.cuda.is_available():  # a CPU build: nothing to compare on
    report.put('available', False)
    report.put('reason', f'torch {torch.__version__} sees no CUDA device')
    return
  report.put('available', True)
  say(f'PyTorch {torch.__version__} on {device}; matmul {spec["matmul_n"]}^3 bf16')
  guarded(report, 'matmul', lambda: _torch_matmul(torch, device, spec['matmul_n']))


# ------------------------------------------------------------------------------------------------
# Job: parity with the PyTorch reference.

# A gradient tensor is judged when its largest entry in the float32 reference is at least this
# fraction of the largest entry of all parameter gradients. Below it are the gradients that vanish
# in exact arithmetic, where both sides hold rounding noise only: the attention key biases
# (softmax ignores a constant per row) and the class-token slot (mmseg's with_cls_token=False
# drops it before the blocks).
GRAD_FLOOR = 1e-4
# bfloat16: JAX's bf16 result may be as far from the exact (float32 reference) one as the bar, or,
# where PyTorch's own bf16 result is further off than that, this many times PyTorch's distance.
# More than 1 by design: a JAX bf16 model keeps its activations in bf16 between layers, where
# autocast keeps them in float32 and rounds only matmul inputs (measured on CPU: JAX's worst
# errors 1.5-2.2x PyTorch's). A defect (a wrong kernel, a lost cast) makes errors of order 1.
BF16_SLACK = 3.0


def _torch_exact(torch) -> Dict[str, bool]:
  """TF32 off for float32 matmuls and convolutions (the parity bar is float32's)."""
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return {'matmul_allow_tf32': False, 'cudnn_allow_tf32': False}


def _parity_inputs(img: int, num_classes: int):
  """(2, 3, H, W) float32 normal images and (2, H, W) int64 ADE-like labels (255 = ignore)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench import throughput  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 3, img, img)).astype(np.float32)
  labels = throughput.ade_like_labels(rng, 2, img, img, num_classes,
                                      classes=min(8, num_classes)).astype(np.int64)
  return images, labels


def _torch_reference(torch, model, images, labels, num_classes: int, dtype: str, device: str):
  """The reference's eval scores, train outputs, loss and the loss's gradients.

  Returns (outputs: name -> numpy, 4-D ones NHWC as JAX's; gradient state dict: official key ->
  CPU tensor, the buffers included). Train mode with dropout and drop-path at 0, as built.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import segvit_reference as ref  # pylint: disable=g-import-not-at-top
  kind = torch.device(device).type
  amp = lambda: torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
  x = torch.from_numpy(images).to(device)
  y = torch.from_numpy(labels).to(device)
  model.eval()
  with torch.no_grad(), amp():
    scores = model.forward_all(x)['scores']
  model.train()
  model.zero_grad(set_to_none=True)
  x = x.clone().requires_grad_(True)
  with amp():
    out = model.forward_all(x)
    with torch.device(device):  # whatever the reference loss creates lands on the device
      loss = sum(ref.atm_loss(out, y, num_classes).values())
  loss.backward()

  def host(t):
    a = t.detach().float().cpu().numpy()
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a

  outputs = {'scores': host(scores), 'class logits': host(out['pred_logits']),
             'mask logits': host(out['masks'][-1]), 'loss': host(loss),
             'image gradient': host(x.grad)}
  for i, aux in enumerate(out['aux_outputs']):
    outputs[f'aux {i} class logits'] = host(aux['pred_logits'])
    outputs[f'aux {i} mask logits'] = host(aux['pred_masks'])
  grads = {key: value.detach().cpu() for key, value in model.state_dict().items()}
  for name, p in model.named_parameters():
    grads[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu()
  return outputs, grads


def _jax_outputs(params, config, images, labels, dtype: str):
  """The same quantities from the converted model (NHWC), the loss's parameter gradients and
  the attention implementation used. float32 at 'highest' matmul precision (no TF32), bfloat16
  at JAX's default."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from segvit_jax import losses  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  m = config.model.copy_and_resolve_references()
  m.dtype = dtype
  m.decoder_dropout = 0.0
  m.drop_path_rate = 0.0
  model = segvit.build_model(m)
  k, eos = m.num_classes, config.loss.no_object_weight

  def loss_fn(p, x, y):
    out = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(0)})
    total, _ = losses.atm_loss(out, y, num_classes=k, no_object_weight=eos)
    return total, out

  def fn(p, x, y):
    scores = model.apply({'params': p}, x, train=False)
    (loss, out), (grads, x_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        p, x, y)
    return scores, loss, out, grads, x_grad

  precision = (jax.default_matmul_precision('highest') if dtype == 'float32'
               else contextlib.nullcontext())
  with precision:
    scores, loss, out, grads, x_grad = jax.device_get(jax.jit(fn)(
        params, np.transpose(images, (0, 2, 3, 1)), labels.astype(np.int32)))
  outputs = {'scores': scores, 'class logits': out['class_logits'],
             'mask logits': out['mask_logits'], 'loss': loss, 'image gradient': x_grad}
  for i, aux in enumerate(out['aux']):
    outputs[f'aux {i} class logits'] = aux['class_logits']
    outputs[f'aux {i} mask logits'] = aux['mask_logits']
  return outputs, grads, model.attention


def _flat(tree) -> Dict[str, Any]:
  """'a/b/c' -> numpy leaf of a params-like tree."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {'/'.join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _judged(exact_grads: Dict[str, Any]) -> List[str]:
  """The gradient tensors worth a relative error (GRAD_FLOOR), by the float32 reference's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  peaks = {k: float(np.max(np.abs(v))) for k, v in exact_grads.items()}
  largest = max(peaks.values())
  return sorted(k for k, v in peaks.items() if v >= GRAD_FLOOR * largest)


def _errors(got, want, got_grads, want_grads, judged) -> Tuple[Dict, Dict]:
  """(forward errors, gradient errors) per tensor; the image gradient counts as a gradient."""
  forward = {k: rel_err(got[k], want[k]) for k in want if k != 'image gradient'}
  gradients = {k: rel_err(got_grads[k], want_grads[k]) for k in judged}
  gradients['image gradient'] = rel_err(got['image gradient'], want['image gradient'])
  return forward, gradients


def _worst(errors: Dict[str, float]) -> Tuple[str, float]:
  return max(errors.items(), key=lambda kv: kv[1])


def _verdict(direct, jax_exact=None, torch_exact=None) -> Dict[str, Any]:
  """float32 (direct only): the worst error <= F32_TOLERANCE. bfloat16: JAX's worst error
  against the float32 reference <= max(BF16_TOLERANCE, BF16_SLACK x PyTorch bf16's), for the
  forward tensors and for the gradients separately (bf16 rounding makes both sides noisy; what
  counts is that JAX adds no error of its own). `direct` is JAX against PyTorch in the dtype."""
  (forward, gradients) = direct
  out = {'forward_worst': _worst(forward), 'gradient_worst': _worst(gradients),
         'forward_errors': forward,
         'gradient_top3': sorted(gradients.items(), key=lambda kv: -kv[1])[:3]}
  if jax_exact is None:
    out['bar'] = F32_TOLERANCE
    out['pass'] = max(out['forward_worst'][1], out['gradient_worst'][1]) <= F32_TOLERANCE
    return out
  checks = {}
  for part, j, t in zip(('forward', 'gradient'), jax_exact, torch_exact):
    bar = max(BF16_TOLERANCE, BF16_SLACK * _worst(t)[1])
    checks[part] = {'jax_vs_float32': _worst(j), 'torch_vs_float32': _worst(t), 'bar': bar,
                    'pass': _worst(j)[1] <= bar}
  direct_worst = max(out['forward_worst'][1], out['gradient_worst'][1])
  out.update({'vs_float32': checks, 'bar': BF16_TOLERANCE,
              'direct_within_bar': direct_worst <= BF16_TOLERANCE,
              'pass': all(c['pass'] for c in checks.values())})
  return out


def _converted(torch, state, config, path: str) -> Dict[str, Any]:
  """A state dict (official keys) in the JAX parameter layout, flat: saved as a .pth and read by
  `segvit_jax.convert`, whose layouts (transposes, splits) are linear maps: they carry gradients
  as they carry weights."""
  from segvit_jax.convert import checkpoints as convert  # pylint: disable=g-import-not-at-top
  torch.save({'meta': {}, 'state_dict': state}, path)
  return _flat(convert.convert_checkpoint(path, config=config)[0])


def _parity_reference(torch, variant: str, spec: Dict[str, Any], tmp: str) -> Dict[str, Any]:
  """One variant's reference: weights, inputs, and per dtype the outputs and gradients, all in
  JAX's layouts, in an .npz file for the JAX worker (`_load_reference`); its config in JSON.

  The conversion runs after the CUDA work, with JAX on CPU (JAX_PLATFORMS=cpu): no process
  holds both frameworks on the GPU, whose CUDA and cuDNN libraries may differ.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import segvit_reference as ref  # pylint: disable=g-import-not-at-top
  kwargs = dict(spec['model'], **_VARIANTS[variant])
  device, k = spec['torch_device'], kwargs['num_classes']
  torch.manual_seed(0)
  model = ref.init_with_noise(ref.build(**kwargs, dropout=0.0), seed=1)
  weights = os.path.join(tmp, f'{variant}.pth')
  ref.save_mmcv_checkpoint(model, weights, ref.config_text(**kwargs), with_optimizer=False)
  model.to(device)
  images, labels = _parity_inputs(kwargs['img_size'], k)
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    say(f'parity {variant} {dtype}: PyTorch on {device}')
    runs[dtype] = _torch_reference(torch, model, images, labels, k, dtype, device)
  from segvit_jax.convert import checkpoints as convert  # pylint: disable=g-import-not-at-top
  params, config, _ = convert.convert_checkpoint(weights)
  arrays = {'input/images': images, 'input/labels': labels}
  arrays.update({f'params/{key}': v for key, v in _flat(params).items()})
  for dtype, (outputs, grad_state) in runs.items():
    arrays.update({f'{dtype}/out/{name}': v for name, v in outputs.items()})
    grads = _converted(torch, grad_state, config, os.path.join(tmp, f'{variant}_{dtype}.pth'))
    arrays.update({f'{dtype}/grad/{key}': v for key, v in grads.items()})
  path = os.path.join(spec['tmp'], f'parity_{variant}')
  np.savez(path + '.npz', **arrays)
  with open(path + '.json', 'w') as f:
    json.dump(config.to_dict(), f, default=_json_default)
  return {'file': path + '.npz', 'tensors': len(arrays)}


def job_parity_torch(spec: Dict[str, Any], report: Report) -> None:
  import tempfile  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  report.put('torch_settings', _torch_exact(torch))
  with tempfile.TemporaryDirectory(dir=spec['tmp']) as tmp:
    for variant in spec['variants']:
      guarded(report, variant, lambda variant=variant: _parity_reference(torch, variant, spec, tmp))


def _load_reference(tmp: str, variant: str):
  """(params tree, config, images, labels, {dtype: (outputs, flat gradients)}) of a variant."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from segvit_jax.convert import keymap  # pylint: disable=g-import-not-at-top
  path = os.path.join(tmp, f'parity_{variant}')
  with open(path + '.json') as f:
    config = ml_collections.ConfigDict(json.load(f))
  with np.load(path + '.npz') as data:
    arrays = {k: data[k] for k in data.files}
  part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  runs = {dtype: (part(f'{dtype}/out/'), part(f'{dtype}/grad/'))
          for dtype in ('float32', 'bfloat16')}
  return (keymap.unflatten(part('params/')), config, arrays['input/images'],
          arrays['input/labels'], runs)


def _parity_compare(variant: str, spec: Dict[str, Any], report: Report) -> None:
  """JAX's outputs and gradients of a variant against the reference: float32, then bfloat16."""
  params, config, images, labels, runs = _load_reference(spec['tmp'], variant)
  exact_out, exact_grads = runs['float32']
  judged = _judged(exact_grads)
  for dtype in ('float32', 'bfloat16'):
    def one(dtype=dtype):
      say(f'parity {variant} {dtype}: JAX')
      got, got_grads, attention = _jax_outputs(params, config, images, labels, dtype)
      got_grads = _flat(got_grads)
      want, want_grads = runs[dtype]
      direct = _errors(got, want, got_grads, want_grads, judged)
      if dtype == 'float32':
        result = _verdict(direct)
      else:
        result = _verdict(direct, _errors(got, exact_out, got_grads, exact_grads, judged),
                          _errors(want, exact_out, want_grads, exact_grads, judged))
      return dict(result, jax_attention=attention, gradients_judged=len(judged),
                  gradients_below_floor=sorted(set(exact_grads) - set(judged)),
                  status='ok' if result['pass'] else 'failed')
    guarded(report, f'{variant}/{dtype}', one)


def job_parity_jax(spec: Dict[str, Any], report: Report) -> None:
  for variant in spec['variants']:
    guarded(report, f'{variant}/load', lambda variant=variant: _parity_compare(
        variant, spec, report) or 'ok')


# ------------------------------------------------------------------------------------------------
# Job: the attention implementations.

# Logits of standard deviation 3: peaked softmax rows, as trained attention has, rather than the
# near-uniform rows of unit-variance q, k whose averages hide errors in the weights.
LOGIT_STD = 3.0


def _attention_inputs(shape, seed: int):
  """q (already scaled), k, v and an output cotangent, float32 numpy, (B, N, H, hd)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  b, nq, nk, h, hd = shape
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, nq, h, hd)) * (LOGIT_STD / np.sqrt(hd))
  k = rng.standard_normal((b, nk, h, hd))
  v = rng.standard_normal((b, nk, h, hd))
  d_out = rng.standard_normal((b, nq, h, hd))
  return [a.astype(np.float32) for a in (q, k, v, d_out)]


def _attention_run(implementation: str, inputs, dtype: str, reps: int):
  """(out, dq, dk, dv) as float32 numpy, and the median seconds of the jitted forward+backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import attention  # pylint: disable=g-import-not-at-top

  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(lambda a, b, c: attention.attend(a, b, c, implementation), q, k, v)
    return (out,) + vjp(d_out)

  args = [jnp.asarray(a, dtype) for a in inputs]
  with jax.default_matmul_precision('highest'):  # float32 means float32 here, not TF32
    compiled = jax.jit(fwd_bwd).lower(*args).compile()
  results = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return [np.asarray(r, np.float32) for r in results], float(np.median(times))


def _attention_case(shape, candidate: str, reps: int) -> Dict[str, Any]:
  """The candidate against 'xla' in bfloat16, and both against 'xla' in float32 (the same bf16
  inputs, upcast: the exact answer to the question both bf16 paths answer)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  inputs = [a.astype(ml_dtypes.bfloat16).astype('float32')
            for a in _attention_inputs(shape, seed=sum(shape))]
  cand, cand_s = _attention_run(candidate, inputs, 'bfloat16', reps)
  xla, xla_s = _attention_run('xla', inputs, 'bfloat16', reps)
  exact, _ = _attention_run('xla', inputs, 'float32', 1)
  names = ('out', 'dq', 'dk', 'dv')
  errors = {n: rel_err(c, x) for n, c, x in zip(names, cand, xla)}
  return {'shape': list(shape), 'errors': errors, 'worst': max(errors.values()),
          'candidate_vs_f32': {n: rel_err(c, e) for n, c, e in zip(names, cand, exact)},
          'xla_vs_f32': {n: rel_err(x, e) for n, x, e in zip(names, xla, exact)},
          'candidate_ms': 1e3 * cand_s, 'xla_ms': 1e3 * xla_s}


def job_attention(spec: Dict[str, Any], report: Report) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  candidate = spec['candidate']
  report.put('candidate', candidate)
  report.put('reference', 'xla')
  report.put('platform', jax.devices()[0].platform)
  if candidate != 'cudnn':
    report.put('note', f'{jax.devices()[0].platform}: cuDNN is unavailable; compares the '
               f'{candidate!r} path with the XLA one instead')
  for shape in spec['shapes']:
    name = 'x'.join(map(str, shape))
    say(f'attention {candidate} vs xla, (B, Nq, Nk, H, hd) = {name}')
    guarded(report, f'case/{name}', lambda shape=shape: _attention_case(shape, candidate,
                                                                        spec['reps']))


# ------------------------------------------------------------------------------------------------
# Jobs: train steps.

_OOM = re.compile(r'RESOURCE_EXHAUSTED|[Oo]ut of memory|OutOfMemory')
# Of the allocator's limit, what a planned step may use: the rest absorbs fragmentation.
PLAN_FRACTION = 0.95


def _usable_bytes(device) -> Optional[float]:
  """What a step may plan to use on `device` (None: the device does not say, e.g. CPU)."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'bytes_limit' not in stats:
    return None
  return PLAN_FRACTION * stats['bytes_limit'] - stats.get('bytes_in_use', 0)


def _compile_train(config, device, batch: int):
  """(setup, compiled train step, compile s, XLA's memory plan {total, temp, argument} bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from segvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import build  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config.batch_size = batch
  run = build.setup(config, [device])
  h, w = config.dataset.crop_size
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((batch, h, w, 3), np.float32,
                                    sharding=sharding.batch_sharding(run.mesh, 4)),
      'label': jax.ShapeDtypeStruct((batch, h, w), np.int32,
                                    sharding=sharding.batch_sharding(run.mesh, 3))}
  with jax.set_mesh(run.mesh):
    start = time.perf_counter()
    step = step_lib.make_train_step(run.model, run.tx, run.schedule, config, run.mesh, run.spec)
    compiled = step.lower(run.spec.abstract, abstract_batch).compile()
    seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  plan = {'argument': m.argument_size_in_bytes, 'temp': m.temp_size_in_bytes,
          'total': (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes + m.generated_code_size_in_bytes)}
  return run, compiled, seconds, plan


def _time_train(run, compiled, config, batch: int, steps: int) -> Dict[str, Any]:
  """Two warm-up steps, then `steps` timed ones, each waited for (its loss fetched)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench import throughput  # pylint: disable=g-import-not-at-top
  from segvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  crop = tuple(config.dataset.crop_size)
  host = {'image': throughput.random_images(rng, batch, crop),
          'label': throughput.ade_like_labels(rng, batch, *crop, config.model.num_classes)}
  with jax.set_mesh(run.mesh):
    held = {'state': state_lib.create_state(run.model, run.tx, config, run.spec)}
    data = {k: jax.device_put(v, sharding.batch_sharding(run.mesh, v.ndim))
            for k, v in host.items()}

    def step() -> float:
      held['state'], metrics = compiled(held['state'], data)  # the state is donated
      return float(metrics['loss'])  # waits for the step

    start = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - start
    losses.append(step())
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      losses.append(step())
      times.append(time.perf_counter() - start)
  median = float(np.median(times))
  return {'first_step_s': first, 'median_s': median, 'times_s': times,
          'images_per_s': batch / median, 'losses': losses,
          'loss_finite': bool(np.all(np.isfinite(losses)))}


def _next_batches(candidates: List[int], batch: int, plan: Dict[str, float],
                  usable: float) -> List[int]:
  """The smaller candidates worth compiling after `batch` planned too much: those whose
  predicted plan (fixed part + temporaries scaled by the batch) fits, else the smallest."""
  per_image = plan['temp'] / batch
  fixed = plan['total'] - plan['temp']
  smaller = [c for c in candidates if c < batch]
  fitting = [c for c in smaller if fixed + per_image * c <= usable]
  return fitting or smaller[-1:]


def _peak_gib(device) -> Optional[float]:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return stats['peak_bytes_in_use'] / GIB if stats and 'peak_bytes_in_use' in stats else None


def _try_batch(config, device, batch: int, steps: int, usable: Optional[float]):
  """One candidate: compile, check XLA's plan against the memory, run. (entry, plan)."""
  import gc  # pylint: disable=g-import-not-at-top
  say(f'batch {batch}: compiling')
  start = time.perf_counter()
  try:
    run, compiled, compile_s, plan = _compile_train(config, device, batch)
  except Exception as e:  # pylint: disable=broad-except
    if not _OOM.search(str(e)):
      raise
    return {'batch': batch, 'compile_s': time.perf_counter() - start, 'fits': False,
            'why': 'out of memory while compiling', 'error': one_line(e)}, None
  entry = {'batch': batch, 'compile_s': compile_s, 'planned_gib': plan['total'] / GIB,
           'planned_temp_gib': plan['temp'] / GIB, 'attention': run.model.attention}
  if usable is not None and plan['total'] > usable:
    say(f'batch {batch}: XLA plans {plan["total"] / GIB:.1f} GiB > {usable / GIB:.1f} usable')
    return dict(entry, fits=False, why='planned memory'), plan
  say(f'batch {batch}: compiled in {compile_s:.1f} s; running')
  try:
    entry.update(_time_train(run, compiled, config, batch, steps), fits=True)
  except Exception as e:  # pylint: disable=broad-except
    if not _OOM.search(str(e)):
      raise
    entry.update(fits=False, why='out of memory at run time', error=one_line(e))
  gc.collect()
  return entry, plan


def job_train_step_jax(spec: Dict[str, Any], report: Report) -> None:
  """The largest candidate batch that fits, compiled, checked against the memory, timed."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import throughput  # pylint: disable=g-import-not-at-top
  config = load_config(spec['config'], spec['overrides'])
  config.model.dtype = spec['dtype']
  config.mesh = 'data:1'
  device = jax.devices()[0]
  usable = _usable_bytes(device)
  crop = tuple(config.dataset.crop_size)
  report.put('device_kind', device.device_kind)
  report.put('platform', device.platform)
  report.put('remat', config.model.remat)
  report.put('usable_gib', None if usable is None else usable / GIB)
  report.put('train_flops_per_image', throughput.model_flops(config, crop)['train'])
  candidates = sorted(spec['batches'], reverse=True)
  queue, tried, expected_s = list(candidates), [], spec['first_compile_s']
  while queue:
    if _WORKER_CLOCK.left() < 1.5 * expected_s + spec['overhead_s'] / 2:  # compile, steps
      report.put('skipped', {'batches': queue, 'why': 'time budget'})
      break
    batch = queue.pop(0)
    entry, plan = _try_batch(config, device, batch, spec['steps'], usable)
    tried.append(entry)
    report.put('tried', tried)
    expected_s = entry['compile_s']
    if entry['fits']:
      report.put('chosen', entry)
      break
    if entry['why'] == 'planned memory':
      queue = [c for c in queue if c in _next_batches(candidates, batch, plan, usable)]
  report.put('peak_gib', _peak_gib(device))


def _torch_fast(torch) -> Dict[str, bool]:
  """TF32 for float32 matmuls and convolutions: the arithmetic of JAX's default precision on
  NVIDIA GPUs, so that float32 speeds compare like with like."""
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  return {'matmul_allow_tf32': True, 'cudnn_allow_tf32': True}


def _torch_train_pair(torch, pair: Dict[str, Any], spec: Dict[str, Any]) -> Dict[str, Any]:
  """run_torch's train step at the pair's batch; halves the batch after an out-of-memory."""
  import gc  # pylint: disable=g-import-not-at-top
  from bench import throughput  # pylint: disable=g-import-not-at-top
  config = load_config(pair['config'], pair['overrides'])
  batch, out_of_memory = pair['batch'], []
  threads = len(os.sched_getaffinity(0))
  while batch >= 1:
    say(f'{pair["label"]} {pair["dtype"]}: PyTorch batch {batch}'
        + (', torch.compile' if spec['compile'] else ', eager'))
    try:
      result = throughput.run_torch(
          config, batch, pair['dtype'], spec['steps'], tuple(config.dataset.crop_size),
          {'infer', 'slide'}, False, threads, device=spec['torch_device'],
          timing=throughput.Timing(rounds=1, alternate=False), compile_layers=spec['compile'])
    except Exception as e:  # pylint: disable=broad-except
      if not _OOM.search(str(e)):
        raise
      out_of_memory.append(batch)
      batch //= 2
      gc.collect()
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
      continue
    median, first = result['train']['median_s'], result['train']['first_s']
    return {'batch': batch, 'median_s': median, 'images_per_s': batch / median,
            'first_step_s': first, 'last_loss': result.get('last_loss'),
            'compile_s': first - median if spec['compile'] else None,  # the first call compiles
            'peak_gib': (result['device_peak_mib'] / 1024 if 'device_peak_mib' in result
                         else None),
            'compiled_layers': result.get('compiled_layers'), 'out_of_memory_at': out_of_memory}
  return {'status': 'error', 'error': f'out of memory at batches {out_of_memory}'}


def job_train_step_torch(spec: Dict[str, Any], report: Report) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  report.put('torch_settings', _torch_fast(torch))
  report.put('compile', spec['compile'])
  for pair in spec['pairs']:
    key = f'{pair["label"]}/{pair["dtype"]}'
    if _WORKER_CLOCK.left() < spec['min_pair_s']:
      report.put(key, {'status': 'skipped', 'why': 'time budget'})
      continue
    guarded(report, key, lambda pair=pair: _torch_train_pair(torch, pair, spec))


# ------------------------------------------------------------------------------------------------
# Jobs: sliding-window evaluation.


def _slide_setup(spec: Dict[str, Any]):
  """(config, the test-resized image (h, w)) of a slide job."""
  config = load_config(spec['config'], spec['overrides'])
  config.model.dtype = spec['dtype']
  return config, eval_resized_hw(config, spec['original_hw'])


def job_slide_jax(spec: Dict[str, Any], report: Report) -> None:
  """run_jax's eval step (windows, resize to the image, softmax, argmax, confusion matrix)."""
  from bench import throughput  # pylint: disable=g-import-not-at-top
  config, hw = _slide_setup(spec)
  report.put('image_hw', hw)
  report.put('slide_flops_per_image', throughput.model_flops(config, hw)['slide'])
  say(f'JAX eval step on {spec["batch"]} images of {hw}, {config.eval.mode} mode')
  result = throughput.run_jax(config, spec['batch'], spec['dtype'], spec['steps'], hw,
                              {'train', 'infer'}, False,
                              timing=throughput.Timing(rounds=1, alternate=False))
  report.put('device_kind', result['device'])
  report.put('compile_s', result.get('compile_slide_s'))
  report.put('median_s', result['slide']['median_s'])
  report.put('images_per_s', spec['batch'] / result['slide']['median_s'])
  report.put('peak_gib', result['device_peak_mib'] / 1024 if 'device_peak_mib' in result
             else None)


def job_slide_torch(spec: Dict[str, Any], report: Report) -> None:
  """run_torch's mmseg inference (windows, resize to the image, softmax, argmax)."""
  import torch  # pylint: disable=g-import-not-at-top
  from bench import throughput  # pylint: disable=g-import-not-at-top
  report.put('torch_settings', _torch_fast(torch))
  config, hw = _slide_setup(spec)
  report.put('image_hw', hw)
  say(f'PyTorch inference on {spec["batch"]} images of {hw}, {config.eval.mode} mode')
  result = throughput.run_torch(config, spec['batch'], spec['dtype'], spec['steps'], hw,
                                {'train', 'infer'}, False, len(os.sched_getaffinity(0)),
                                device=spec['torch_device'],
                                timing=throughput.Timing(rounds=1, alternate=False))
  report.put('median_s', result['slide']['median_s'])
  report.put('images_per_s', spec['batch'] / result['slide']['median_s'])
  report.put('peak_gib', result['device_peak_mib'] / 1024 if 'device_peak_mib' in result
             else None)


JOBS = {
    'basics_jax': job_basics_jax,
    'basics_torch': job_basics_torch,
    'parity_torch': job_parity_torch,
    'parity_jax': job_parity_jax,
    'attention': job_attention,
    'train_step_jax': job_train_step_jax,
    'train_step_torch': job_train_step_torch,
    'slide_jax': job_slide_jax,
    'slide_torch': job_slide_torch,
}


# ------------------------------------------------------------------------------------------------
# Parent side: subprocesses with time limits, their output shown as it comes.


@dataclasses.dataclass
class Completed:
  """A finished (or killed) subprocess: exit status, output lines, -X importtime lines."""
  status: int
  timed_out: bool
  lines: List[str]
  imports: List[str]
  seconds: float

  def tensorflow_imported(self) -> bool:
    return any(line.rsplit('|', 1)[-1].strip().split('.')[0] == 'tensorflow'
               for line in self.imports)

  def last_line(self) -> str:
    return next((line.strip() for line in reversed(self.lines) if line.strip()), '')


def stream(cmd: Sequence[str], env: Dict[str, str], timeout_s: float,
           on_line: Optional[Callable[[str, subprocess.Popen], None]] = None) -> Completed:
  """Runs cmd in its own process group, echoing its output (indented) as it comes and passing
  each line to `on_line`; kills the group at the time limit."""
  start = time.monotonic()
  proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors='replace',
                          start_new_session=True)
  lines, imports = [], []

  def pump():
    for line in proc.stdout:
      line = line.rstrip('\n')
      if line.startswith('import time:'):
        imports.append(line)
        continue
      lines.append(line)
      print('    | ' + line, flush=True)
      if on_line is not None:
        on_line(line, proc)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    status = proc.wait(timeout=max(timeout_s, 1.0))
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)
    status = proc.wait()
  reader.join(timeout=10)
  return Completed(status, timed_out, lines, imports, time.monotonic() - start)


@dataclasses.dataclass
class Context:
  """What the sections share."""
  profile: Profile
  out: str
  work: str  # scratch folder under out, removed at the end
  clock: Clock
  sections: List[str]
  torch_absent: Optional[str] = None  # why PyTorch parts are left out
  no_gpu: Optional[str] = None  # why the GPU sections cannot run
  ceiling_tflops: Optional[float] = None  # JAX's measured bf16 matmul TFLOP/s
  basics: Dict[str, Any] = dataclasses.field(default_factory=dict)
  workers: int = 0


def base_env(ctx: Context, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """This process's environment, the root first on PYTHONPATH, the profile's JAX platform."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if ctx.profile.jax_platforms:
    env['JAX_PLATFORMS'] = ctx.profile.jax_platforms
  for name in _TORCH_CACHES:
    env.setdefault(name, os.path.join(ctx.work, name.lower()))
  given = env.get('XLA_FLAGS', '').split()
  names = {f.split('=')[0] for f in given}
  env['XLA_FLAGS'] = ' '.join(given + [f for f in ctx.profile.xla_flags
                                       if f.split('=')[0] not in names])
  env.update(extra or {})
  return env


# Environment of each kind of worker (see the module docstring).
JAX_ENV = {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.9'}
TORCH_ENV = {'JAX_PLATFORMS': 'cpu'}
# torch.compile's caches (Inductor's generated code, Triton's kernels) go to the scratch folder:
# by default they land in /tmp and outlive the check.
_TORCH_CACHES = ('TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR')


def run_worker(ctx: Context, job: str, spec: Dict[str, Any], timeout_s: float,
               env: Dict[str, str]) -> Dict[str, Any]:
  """Runs one job in a worker; its report, with 'timed_out' / 'exit_status' / 'error' added
  when it did not finish."""
  ctx.workers += 1
  base = os.path.join(ctx.work, f'{ctx.workers:02d}_{job}')
  spec = dict(spec, result=base + '.json', budget_s=timeout_s, tmp=ctx.work)
  with open(base + '.spec.json', 'w') as f:
    json.dump(spec, f)
  print(f'  worker {job} (at most {timeout_s:.0f} s)', flush=True)
  done = stream([sys.executable, '-m', 'bench.gpu_check', f'--worker={job}',
                 f'--spec={base}.spec.json'], base_env(ctx, env), timeout_s)
  report = {}
  if os.path.exists(spec['result']):
    with open(spec['result']) as f:
      report = json.load(f)
  if done.timed_out:
    report['timed_out'] = True
  elif done.status != 0:
    report['exit_status'] = done.status
    report.setdefault('error', done.last_line() or f'exit status {done.status}')
  return report


def section_timeout(ctx: Context, name: str) -> float:
  """A section's time: its budget, less whatever the later sections' reserves need."""
  later = SECTIONS[SECTIONS.index(name) + 1:]
  reserve = sum(ctx.profile.reserves[s] for s in later if s in ctx.sections)
  return min(ctx.profile.budgets[name], ctx.clock.left() - reserve)


def worker_failure(report: Dict[str, Any]) -> Optional[str]:
  """One line when a worker did not finish: killed at its limit or crashed."""
  if report.get('timed_out'):
    return 'the worker ran out of its time and was stopped'
  if 'exit_status' in report:
    return f'the worker failed: {report.get("error")}'
  return None


# ------------------------------------------------------------------------------------------------
# Sections: environment, matmul ceiling.

_PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax',
             'orbax-checkpoint', 'chex', 'tensorstore', 'torch', 'triton', 'numpy',
             'ml_collections', 'clu', 'tensorflow', 'opencv-python-headless', 'pillow', 'scipy')


def _package_versions() -> Dict[str, Optional[str]]:
  """Installed versions by distribution name (None: not installed); nothing is imported."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _nvidia_smi() -> Optional[str]:
  """nvidia-smi's one-line view of each GPU, where the tool exists."""
  if shutil.which('nvidia-smi') is None:
    return None
  try:
    return subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version,power.limit',
         '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return one_line(e)


def section_environment(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  """Versions here, then a JAX and a PyTorch worker (their environment and matmul)."""
  clock = Clock(timeout_s)
  spec = {'matmul_n': ctx.profile.matmul_n, 'torch_device': ctx.profile.torch_device}
  jax_r = run_worker(ctx, 'basics_jax', spec, 0.6 * clock.left(), JAX_ENV)
  torch_r = run_worker(ctx, 'basics_torch', spec, clock.left(), TORCH_ENV)
  ctx.basics = {'jax': jax_r, 'torch': torch_r}
  if not torch_r.get('available', False):
    ctx.torch_absent = torch_r.get('reason') or worker_failure(torch_r) or 'unknown'
    if 'No module named' in ctx.torch_absent:
      ctx.torch_absent = f'torch is not installed ({ctx.torch_absent})'
    print(f'{TORCH_ABSENT}: {ctx.torch_absent}', flush=True)
  jax_env = jax_r.get('environment') or {'status': 'error',
                                         'error': worker_failure(jax_r) or 'no result'}
  platform_ = jax_env.get('platform')
  if ctx.profile.name == 'gpu' and platform_ not in ('gpu', 'cuda'):
    ctx.no_gpu = (f'JAX runs on {platform_!r}, not an NVIDIA GPU: run with --dry_run on a '
                  'machine without one')
  out = {'status': 'ok' if 'status' not in jax_env else 'error', 'profile': ctx.profile.name,
         'python': platform.python_version(), 'executable': sys.executable,
         'host': platform.node(), 'cpu_count': os.cpu_count(),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'packages': _package_versions(), 'nvidia_smi': _nvidia_smi(), 'jax': jax_env,
         'torch': (torch_r.get('environment') if ctx.torch_absent is None
                   else {'status': 'skipped', 'why': ctx.torch_absent}),
         'tensorflow_imported': {'jax worker': jax_r.get('tensorflow_imported'),
                                 'torch worker': torch_r.get('tensorflow_imported')}}
  if ctx.no_gpu:
    out.update(status='error', error=ctx.no_gpu)
  elif out['status'] == 'error':
    out['error'] = jax_env.get('error')
  return out


def section_matmul_ceiling(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  """What the environment's workers measured."""
  del timeout_s  # measured by the environment's workers
  jax_m = ctx.basics.get('jax', {}).get('matmul') or {'status': 'error', 'error': 'not measured'}
  torch_m = (ctx.basics.get('torch', {}).get('matmul')
             or {'status': 'error', 'error': 'not measured'})
  if ctx.torch_absent:
    torch_m = {'status': 'skipped', 'why': ctx.torch_absent}
  ctx.ceiling_tflops = jax_m.get('tflops')
  bad = [m for m in (jax_m, torch_m) if m.get('status') == 'error'
         or (m.get('status') != 'skipped' and not m.get('finite_nonzero'))]
  out = {'status': 'error' if bad else 'ok', 'jax': jax_m, 'torch': torch_m}
  if bad:
    out['error'] = bad[0].get('error', 'the product is not finite and nonzero')
  return out


# ------------------------------------------------------------------------------------------------
# Sections: parity, attention.


def _status_of(items: Dict[str, Dict[str, Any]], failure: Optional[str]) -> Dict[str, Any]:
  """A section's status from its items' ('error' before 'failed' before 'ok')."""
  errors = [f'{k}: {v.get("error")}' for k, v in items.items()
            if isinstance(v, dict) and v.get('status') == 'error']
  if failure:
    errors.append(failure)
  if errors:
    return {'status': 'error', 'error': errors[0]}
  if any(isinstance(v, dict) and v.get('pass') is False for v in items.values()):
    return {'status': 'failed'}
  return {'status': 'ok'}


def section_parity(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  """The PyTorch worker writes each variant's reference (converted to JAX's layouts); the JAX
  worker compares."""
  if ctx.torch_absent:
    return {'status': 'skipped', 'why': ctx.torch_absent}
  clock = Clock(timeout_s)
  p = ctx.profile
  spec = {'model': p.parity_model, 'variants': list(p.parity_variants),
          'torch_device': p.torch_device}
  torch_r = run_worker(ctx, 'parity_torch', spec, 0.45 * timeout_s, TORCH_ENV)
  ready = [v for v in p.parity_variants if (torch_r.get(v) or {}).get('file')]
  jax_r = (run_worker(ctx, 'parity_jax', dict(spec, variants=ready), clock.left(), JAX_ENV)
           if ready else {})
  cases = {k: v for k, v in jax_r.items() if k.endswith(('/float32', '/bfloat16'))}
  problems = {f'PyTorch {v}': torch_r.get(v) for v in p.parity_variants if v not in ready}
  problems.update({k: v for k, v in jax_r.items() if k.endswith('/load') and v != 'ok'})
  missing = [f'{v}/{d}' for v in p.parity_variants for d in ('float32', 'bfloat16')
             if f'{v}/{d}' not in cases]
  failure = (worker_failure(torch_r) or worker_failure(jax_r)
             or (f'not compared: {", ".join(missing)}' if missing else None))
  items = dict(cases, **{k: v if isinstance(v, dict) else {'status': 'error', 'error': 'no result'}
                         for k, v in problems.items()})
  return dict(_status_of(items, failure), model=p.parity_model,
              torch_settings=torch_r.get('torch_settings'),
              tolerances={'float32': F32_TOLERANCE, 'bfloat16': BF16_TOLERANCE}, cases=cases,
              tensorflow_imported={'torch worker': torch_r.get('tensorflow_imported'),
                                   'jax worker': jax_r.get('tensorflow_imported')})


def section_attention(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  p = ctx.profile
  report = run_worker(ctx, 'attention', {'candidate': p.attention_candidate,
                                         'shapes': [list(s) for s in p.attention_shapes],
                                         'reps': 5}, timeout_s, JAX_ENV)
  cases = {k.split('/', 1)[1]: v for k, v in report.items() if k.startswith('case/')}
  for case in cases.values():
    if 'worst' in case:
      case['pass'] = case['worst'] <= BF16_TOLERANCE
  missing = len(p.attention_shapes) - len(cases)
  failure = worker_failure(report) or (f'{missing} shapes not compared' if missing else None)
  return dict(_status_of(cases, failure), candidate=report.get('candidate'),
              reference='xla', dtype='bfloat16', tolerance=BF16_TOLERANCE,
              note=report.get('note'), platform=report.get('platform'), cases=cases,
              tensorflow_imported=report.get('tensorflow_imported'))


# ------------------------------------------------------------------------------------------------
# Section: a real training run through the command line.


def config_flag(key: str, value: Any) -> str:
  """--config.KEY=VALUE as ml_collections parses it (tuples as '(a,b,)')."""
  if isinstance(value, (tuple, list)):
    value = '(' + ','.join(str(v) for v in value) + ',)'
  return f'--config.{key}={value}'


def _write_test_image(path: str) -> Tuple[int, int]:
  """A non-square RGB PNG of coloured shapes on a textured background; returns its (h, w)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  h, w = 80, 112
  image = rng.integers(60, 120, size=(h, w, 3)).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  image[(yy - 40) ** 2 + (xx - 30) ** 2 < 20 ** 2] = (220, 40, 40)
  image[10:40, 60:100] = (40, 200, 60)
  image[50:75, 70:105][::4] = (30, 30, 220)  # stripes
  Image.fromarray(image).save(path)
  return h, w


def _cli(args: Sequence[str], clock: Clock, env: Dict[str, str],
         on_line: Optional[Callable[[str, subprocess.Popen], None]] = None) -> Completed:
  """`python -X importtime -m ...` (the import log says whether TensorFlow came in)."""
  print(f'  {" ".join(args[:2])} ... (at most {clock.left():.0f} s)', flush=True)
  return stream([sys.executable, '-X', 'importtime', *args], env, clock.left(), on_line)


class Preempter:
  """Sends SIGTERM (a preemption) once the run logs a step at or past `step`."""

  def __init__(self, step: int):
    self.step = step
    self.sent = False

  def __call__(self, line: str, proc: subprocess.Popen) -> None:
    logged = re.search(r'\bstep (\d+)/\d+', line)
    if not self.sent and logged and int(logged.group(1)) >= self.step:
      proc.send_signal(signal.SIGTERM)
      self.sent = True


def _last_train_loss(workdir: str) -> Optional[float]:
  loss = None
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      loss = json.loads(line).get('train/loss', loss)
  return loss


def _step_in(lines: Sequence[str], pattern: str) -> Optional[int]:
  """The step number of the first line matching `pattern` (its group 1)."""
  found = next((m for m in (re.search(pattern, line) for line in lines) if m), None)
  return int(found.group(1)) if found else None


def _train_run_outputs(workdir: str, first: Completed, second: Completed) -> Dict[str, Any]:
  """What the runs said and left: the step saved at SIGTERM and the one resumed from, the final
  metrics, metrics.jsonl, the picture."""
  final_path = os.path.join(workdir, 'final_metrics.json')
  final = {}
  if os.path.exists(final_path):
    with open(final_path) as f:
      final = json.load(f)
  has_metrics = os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  return {'saved_at_sigterm': _step_in(first.lines, r'SIGTERM: saved step (\d+)'),
          'resumed_from': _step_in(second.lines, r'Resuming from .*, step (\d+)'),
          'final_step': final.get('step'), 'miou': final.get('miou'),
          'final_loss': _last_train_loss(workdir) if has_metrics else None,
          'final_metrics_json': bool(final), 'metrics_jsonl': has_metrics,
          'predictions_png': os.path.exists(os.path.join(workdir, 'predictions.png'))}


def _predict(image: str, workdir: str, output: str, clock: Clock, env) -> Dict[str, Any]:
  """`segvit_jax.predict` on `image` with the run's checkpoint; where its label PNG went."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  hw = _write_test_image(image)
  done = _cli(['-m', 'segvit_jax.predict', f'--checkpoint={workdir}', image,
               f'--output={output}', '--noprogress'], clock, env)
  label = os.path.join(output, 'labels', os.path.basename(image))
  out = {'exit_status': done.status, 'wall_s': done.seconds, 'label_png': os.path.exists(label),
         'input_hw': list(hw), 'tensorflow_imported': done.tensorflow_imported(),
         'summary': done.last_line()}
  if out['label_png']:
    with Image.open(label) as im:
      out['label_hw'] = [im.height, im.width]
  return out


def section_train_run(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  """A run preempted (SIGTERM) halfway; the same command again resumes from the checkpoint it
  saved and finishes (evaluation, final files); predict segments a PNG with it."""
  clock = Clock(timeout_s)
  p = ctx.profile.train_run
  base = os.path.join(ctx.out, 'train_run')
  shutil.rmtree(base, ignore_errors=True)
  os.makedirs(base)
  workdir = os.path.join(base, 'workdir')
  env = base_env(ctx, {'PYTHONUNBUFFERED': '1'})  # progress lines as they happen
  # The second run compiles what the first did: with a persistent cache, a lookup.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ctx.work, 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  command = (['-m', 'segvit_jax.main', f'--config={ROOT}/configs/synthetic.py',
              f'--workdir={workdir}', f'--config.num_train_steps={p["steps"]}',
              f'--config.log_every_steps={p["log_every"]}']
             + [config_flag(k, v) for k, v in p['overrides'].items()])
  runs = {'first': _cli(command, clock, env, Preempter(p['steps'] // 2))}
  if runs['first'].status == 0:
    runs['second'] = _cli(command, clock, env)
  out = {'steps': p['steps'], 'preempted_after': p['steps'] // 2,
         'runs': {k: {'exit_status': r.status, 'timed_out': r.timed_out, 'wall_s': r.seconds,
                      'tensorflow_imported': r.tensorflow_imported()} for k, r in runs.items()}}
  if runs.get('second') and runs['second'].status == 0:
    out.update(_train_run_outputs(workdir, runs['first'], runs['second']))
    out['predict'] = _predict(os.path.join(base, 'input.png'), workdir,
                              os.path.join(base, 'predict'), clock, env)
  return _train_run_verdict(out, runs)


def _train_run_verdict(out: Dict[str, Any], runs: Dict[str, Completed]) -> Dict[str, Any]:
  saved, resumed = out.get('saved_at_sigterm'), out.get('resumed_from')
  predicted = out.get('predict') or {}
  checks = {
      'both runs exit 0': len(runs) == 2 and all(r.status == 0 for r in runs.values()),
      'SIGTERM saved a step before the last': saved is not None and saved < out['steps'],
      'the second run resumed from it': resumed is not None and resumed == saved,
      'trained to the last step': out.get('final_step') == out['steps'],
      'final_metrics.json, metrics.jsonl, predictions.png': all(
          out.get(k) for k in ('final_metrics_json', 'metrics_jsonl', 'predictions_png')),
      'finite loss': out.get('final_loss') is not None and math.isfinite(out['final_loss']),
      'predict wrote a label PNG of the input size': bool(predicted.get('label_png'))
      and predicted.get('label_hw') == predicted.get('input_hw'),
  }
  out.update(checks=checks, status='ok' if all(checks.values()) else 'failed')
  out['pass'] = all(checks.values())
  failed = [r for r in runs.values() if r.status != 0]
  if failed:
    out.update(status='error', error=('timed out' if failed[0].timed_out else
                                      failed[0].last_line() or f'exit {failed[0].status}'))
  return out


# ------------------------------------------------------------------------------------------------
# Section: train steps, JAX and PyTorch.

# Of the train_step budget, what the PyTorch workers keep for themselves (eager steps first).
TORCH_SHARE = 0.2


def _peak_flops(device_kind: Optional[str]) -> Optional[float]:
  from bench import throughput  # pylint: disable=g-import-not-at-top
  return next((f for name, f in throughput.PEAK_FLOPS if name in (device_kind or '')), None)


def _jax_summary(ctx: Context, report: Dict[str, Any]) -> Dict[str, Any]:
  """The chosen batch's numbers: images/s, TFLOP/s, MFU against the peak and the ceiling."""
  chosen = report.get('chosen')
  out = {'tried': report.get('tried'), 'skipped': report.get('skipped'),
         'remat': report.get('remat'), 'usable_gib': report.get('usable_gib'),
         'tensorflow_imported': report.get('tensorflow_imported')}
  if not chosen:
    if report.get('timed_out'):  # slower than expected: a matter of time, not of correctness
      return dict(out, status='skipped', why='the worker ran out of its time and was stopped')
    failure = worker_failure(report) or report.get('error')
    if failure:
      return dict(out, status='error', error=failure)
    if report.get('tried') and not report.get('skipped'):  # a finding, not a failure
      return dict(out, status='ok', fits=False, note='no candidate batch fits in memory')
    return dict(out, status='skipped', why='time budget')
  flops = report['train_flops_per_image'] * chosen['images_per_s']
  peak = _peak_flops(report.get('device_kind'))
  ceiling = ctx.ceiling_tflops
  return dict(out, status='ok' if chosen['loss_finite'] else 'failed',
              batch=chosen['batch'], attention=chosen['attention'],
              compile_s=chosen['compile_s'], step_s=chosen['median_s'],
              images_per_s=chosen['images_per_s'], peak_gib=report.get('peak_gib'),
              tflops=flops / 1e12, mfu_vs_peak=flops / peak if peak else None,
              peak_tflops=peak / 1e12 if peak else None,
              mfu_vs_matmul=flops / (ceiling * 1e12) if ceiling else None,
              losses=chosen['losses'], **({'pass': False} if not chosen['loss_finite'] else {}))


def _run_jax_pairs(ctx: Context, clock: Clock, until_s: float) -> Dict[str, Dict[str, Any]]:
  """One worker per (config, dtype) while the JAX share of the time lasts."""
  p = ctx.profile
  results, expected = {}, p.first_compile_s
  for label, dtype in p.train_pairs:
    key = f'{label}/{dtype}'
    path, overrides = p.train_configs[label]
    left = until_s - clock.elapsed()
    if left < 1.5 * expected + p.worker_overhead_s:  # start-up, a compile, a few steps
      results[key] = {'status': 'skipped', 'why': f'time budget ({left:.0f} s left)'}
      continue
    report = run_worker(ctx, 'train_step_jax', {
        'config': path, 'overrides': overrides, 'dtype': dtype,
        'batches': _candidates(p, label, dtype, results),
        'steps': p.steps, 'first_compile_s': expected, 'overhead_s': p.worker_overhead_s},
        left, JAX_ENV)
    results[key] = _jax_summary(ctx, report)
    expected = max([expected] + [t['compile_s'] for t in report.get('tried', [])])
  return results


def _candidates(p: Profile, label: str, dtype: str, results) -> List[int]:
  """The batches worth trying: float32 needs at least the memory bfloat16 does (activations
  twice the bytes; XLA's attention keeps the maps cuDNN recomputes), so no larger batch than
  the config's bfloat16 one, where that was measured."""
  bf16 = results.get(f'{label}/bfloat16', {})
  if dtype == 'float32' and bf16.get('batch'):
    return [b for b in p.batches if b <= bf16['batch']]
  return list(p.batches)


def _run_torch_pairs(ctx: Context, results, timeout_s: float, compile_: bool) -> Dict[str, Any]:
  """The PyTorch step of the pairs JAX measured, at JAX's batch; one worker for all."""
  p = ctx.profile
  pairs = []
  for key, r in results.items():
    label, dtype = key.split('/')
    if r.get('batch'):
      path, overrides = p.train_configs[label]
      pairs.append({'label': label, 'dtype': dtype, 'batch': r['batch'], 'config': path,
                    'overrides': overrides})
  if compile_:
    pairs = pairs[:p.torch_compile]
  if not pairs:
    return {}
  report = run_worker(ctx, 'train_step_torch', {
      'pairs': pairs, 'steps': p.steps, 'compile': compile_, 'torch_device': p.torch_device,
      'min_pair_s': 0.0 if compile_ else p.worker_overhead_s}, timeout_s, TORCH_ENV)
  out = {f'{q["label"]}/{q["dtype"]}': report.get(f'{q["label"]}/{q["dtype"]}') for q in pairs}
  failure = worker_failure(report)
  for key, value in out.items():
    if value is None and compile_ and report.get('timed_out'):
      out[key] = {'status': 'skipped', 'why': f'did not compile and run within {timeout_s:.0f} s'}
    elif value is None:
      out[key] = {'status': 'error', 'error': failure or 'not measured'}
  return out


def _torch_parts(ctx: Context, results, clock: Clock) -> None:
  """Adds 'torch_eager', 'torch_compile' and the JAX / PyTorch images/s ratio to each pair."""
  if ctx.torch_absent:
    for r in results.values():
      r['torch_eager'] = r['torch_compile'] = {'status': 'skipped', 'why': ctx.torch_absent}
    return
  eager = _run_torch_pairs(ctx, results, clock.left(), compile_=False)
  least, most = ctx.profile.torch_compile_s
  left = clock.left()
  compiled = _run_torch_pairs(ctx, results, min(left, most), compile_=True) if left >= least else {}
  for key, r in results.items():
    r['torch_eager'] = eager.get(key) or {'status': 'skipped', 'why': 'no JAX batch'}
    r['torch_compile'] = compiled.get(key) or {
        'status': 'skipped', 'why': (f'time budget ({left:.0f} s left)' if left < least
                                     else f'only the first {ctx.profile.torch_compile} pair(s)')}
    for kind in ('torch_eager', 'torch_compile'):
      t = r[kind]
      if t.get('images_per_s') and r.get('images_per_s'):
        t['jax_over_torch'] = r['images_per_s'] / t['images_per_s']
        t['same_batch'] = t['batch'] == r['batch']


def _official_batch(results) -> Dict[str, Any]:
  """Whether the official per-GPU batch (2 crops) fits in float32 without remat, per config."""
  out = {}
  for key, r in results.items():
    label, dtype = key.split('/')
    if dtype != 'float32' or r.get('remat') not in ('none', False):
      continue
    if r.get('batch'):
      out[label] = {'fits': r['batch'] >= 2, 'how': f'a step of batch {r["batch"]} ran'}
      continue
    two = next((t for t in r.get('tried') or [] if t['batch'] == 2), None)
    out[label] = ({'fits': two['fits'], 'how': two.get('why', 'ran')} if two
                  else {'fits': None, 'how': 'not measured'})
  return out


def section_train_step(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  if ctx.no_gpu:
    return {'status': 'error', 'error': ctx.no_gpu}
  clock = Clock(timeout_s)
  torch_share = 0.0 if ctx.torch_absent else TORCH_SHARE * timeout_s
  results = _run_jax_pairs(ctx, clock, timeout_s - torch_share)
  _torch_parts(ctx, results, clock)
  items = {k: {'status': v['status'], 'error': v.get('error'), 'pass': v.get('pass')}
           for k, v in results.items()}
  for k, v in results.items():
    if v['torch_eager'].get('status') == 'error':
      items[k + ' torch'] = v['torch_eager']
  return dict(_status_of(items, None), pairs=results, official_batch_2_float32=_official_batch(
      results), matmul_ceiling_tflops=ctx.ceiling_tflops,
      flops='analytic (segvit_jax.aot.flops.forward_flops), training = 3 x forward',
      torch_float32='TF32 (allow_tf32), as JAX\'s default GPU precision')


# ------------------------------------------------------------------------------------------------
# Section: sliding-window evaluation.


def section_slide_eval(ctx: Context, timeout_s: float) -> Dict[str, Any]:
  if ctx.no_gpu:
    return {'status': 'error', 'error': ctx.no_gpu}
  clock = Clock(timeout_s)
  p, s = ctx.profile, ctx.profile.slide
  path, overrides = p.train_configs[s['config']]
  spec = dict(s, config=path, overrides=overrides, torch_device=p.torch_device)
  jax_r = run_worker(ctx, 'slide_jax', spec, clock.left() * (1.0 if ctx.torch_absent else 0.65),
                     JAX_ENV)
  if ctx.torch_absent:
    torch_r = {'status': 'skipped', 'why': ctx.torch_absent}
  else:
    torch_r = run_worker(ctx, 'slide_torch', spec, clock.left(), TORCH_ENV)
  for r in (jax_r, torch_r):
    if r.get('timed_out') and not r.get('images_per_s'):  # time, not correctness
      r.update(status='skipped', why='the worker ran out of its time and was stopped')
  out = {'config': s['config'], 'dtype': s['dtype'], 'batch': s['batch'],
         'original_hw': list(s['original_hw']), 'image_hw': jax_r.get('image_hw'),
         'jax': jax_r, 'torch': torch_r}
  failures = [f'{name}: {worker_failure(r) or r.get("error") or "no result"}'
              for name, r in (('jax', jax_r), ('torch', torch_r))
              if r.get('status') != 'skipped' and not r.get('images_per_s')]
  if failures:
    return dict(out, status='error', error=failures[0])
  if torch_r.get('images_per_s'):
    out['jax_over_torch'] = jax_r['images_per_s'] / torch_r['images_per_s']
  return dict(out, status='ok')


# ------------------------------------------------------------------------------------------------
# The table.


def _e(value) -> str:
  return '-' if value is None else f'{value:.1e}'


def _f(value, spec: str = '.3g') -> str:
  return '-' if value is None else format(value, spec)


def _state(item: Dict[str, Any]) -> str:
  """'ok', 'FAILED', 'ERROR: ...' or 'skipped: ...' of a section or item."""
  status = item.get('status', 'ok')
  if status == 'error':
    return f'ERROR: {item.get("error")}'
  if status == 'skipped':
    return f'skipped: {item.get("why")}'
  if item.get('pass') is False or status == 'failed':
    return 'FAILED'
  return 'ok'


def _environment_rows(r):
  j, t = r.get('jax') or {}, r.get('torch') or {}
  pk = r.get('packages', {})
  device = (f'{j.get("device_kind")} x{j.get("device_count")} ({j.get("platform")}); memory '
            f'{_f(t.get("total_memory_gib"), ".1f")} GiB, JAX may use '
            f'{_f(j.get("bytes_limit_gib"), ".1f")} GiB')
  versions = (f'jax {pk.get("jax")}, flax {pk.get("flax")}, torch {pk.get("torch")}, CUDA '
              f'{j.get("cuda_runtime", t.get("torch_cuda"))}, cuDNN '
              f'{j.get("cudnn", t.get("cudnn"))}')
  return [('device', device, '', _state(r)), ('versions', versions, '', '')]


def _matmul_rows(r):
  j, t = r.get('jax') or {}, r.get('torch') or {}
  n = j.get('n') or t.get('n')
  return [(f'bf16 {n}^3 matmul TFLOP/s', f'JAX {_f(j.get("tflops"))}, PyTorch '
           f'{_f(t.get("tflops")) if "tflops" in t else _state(t)}', '', _state(r))]


def _parity_rows(r):
  if r.get('status') == 'skipped' or not r.get('cases'):
    return [('plain / shrunk vs PyTorch', '-', '', _state(r))]
  rows = []
  for key, c in r['cases'].items():
    if 'forward_worst' not in c:
      rows.append((key, '-', '', _state(c)))
      continue
    (fname, ferr), (gname, gerr) = c['forward_worst'], c['gradient_worst']
    text = f'forward {_e(ferr)} ({fname}); gradient {_e(gerr)} ({gname})'
    bar = f'<= {_e(c["bar"])}'
    if 'vs_float32' in c:  # bfloat16: the bar is on the distance to the float32 reference
      v = c['vs_float32']
      text = (f'vs PyTorch bf16: {text}. vs float32: JAX forward '
              f'{_e(v["forward"]["jax_vs_float32"][1])}, gradient '
              f'{_e(v["gradient"]["jax_vs_float32"][1])}; PyTorch bf16 forward '
              f'{_e(v["forward"]["torch_vs_float32"][1])}, gradient '
              f'{_e(v["gradient"]["torch_vs_float32"][1])}')
      bar = (f'vs float32 <= {_e(v["forward"]["bar"])} / {_e(v["gradient"]["bar"])} '
             f'(max({_e(BF16_TOLERANCE)}, {BF16_SLACK:g} x PyTorch bf16))')
    rows.append((f'{key} worst rel. error', text, bar, _state(c)))
  return rows


def _attention_rows(r):
  rows = []
  for shape, c in (r.get('cases') or {}).items():
    if 'worst' not in c:
      rows.append((f'{r.get("candidate")} vs xla {shape}', '-', '', _state(c)))
      continue
    rows.append((f'{r.get("candidate")} vs xla, bf16, {shape}',
                 f'{_e(c["worst"])} (fwd+grads); {_f(c["candidate_ms"])} ms vs '
                 f'{_f(c["xla_ms"])} ms', f'<= {_e(r["tolerance"])}', _state(c)))
  return rows or [('attention', '-', '', _state(r))]


def _train_run_rows(r):
  runs = r.get('runs', {})
  wall = sum(x.get('wall_s') or 0 for x in runs.values()) + (r.get('predict') or {}).get(
      'wall_s', 0)
  text = (f'{r.get("steps")} steps: SIGTERM saved step {_f(r.get("saved_at_sigterm"))}, '
          f'resumed from {_f(r.get("resumed_from"))}; final loss {_f(r.get("final_loss"))}, '
          f'mIoU {_f(r.get("miou"))}; predict '
          f'{"ok" if (r.get("predict") or {}).get("label_png") else "no"}; {wall:.0f} s')
  return [('synthetic CLI: preempt, resume, predict', text, 'all checks', _state(r))]


def _torch_text(t: Dict[str, Any], name: str) -> str:
  if t.get('images_per_s'):
    batch = '' if t.get('same_batch', True) else f' at batch {t["batch"]}'
    compiled = f', compiled in {t["compile_s"]:.0f} s' if t.get('compile_s') else ''
    return (f'{name} {_f(t["images_per_s"])} img/s{batch} '
            f'(JAX x{_f(t.get("jax_over_torch"), ".2f")}{compiled})')
  return f'{name} {_state(t)}'


def _train_step_rows(r):
  rows = []
  for key, p in (r.get('pairs') or {}).items():
    if not p.get('batch'):
      tried = ', '.join(f'{t["batch"]}: {_f(t.get("planned_gib"), ".1f")} GiB planned'
                        for t in p.get('tried') or [])
      rows.append((f'train step {key}', p.get('note', '-') + (f' ({tried})' if tried else ''),
                   '', _state(p)))
      continue
    text = (f'batch {p["batch"]} ({p["attention"]}): {_f(p["step_s"])} s/step, '
            f'{_f(p["images_per_s"])} img/s, {_f(p["peak_gib"], ".1f")} GiB, compile '
            f'{_f(p["compile_s"], ".0f")} s, MFU {_f(p["mfu_vs_peak"], ".2f")} of peak / '
            f'{_f(p["mfu_vs_matmul"], ".2f")} of matmul; '
            + _torch_text(p['torch_eager'], 'PyTorch eager') + '; '
            + _torch_text(p['torch_compile'], 'torch.compile'))
    rows.append((f'train step {key}', text, '', _state(p)))
  official = ', '.join(f'{k}: {"yes" if v["fits"] else "no" if v["fits"] is False else "?"}'
                       for k, v in (r.get('official_batch_2_float32') or {}).items())
  if official:
    rows.append(('official batch 2 fits in float32, no remat', official, '', ''))
  return rows or [('train step', '-', '', _state(r))]


def _slide_rows(r):
  j, t = r.get('jax') or {}, r.get('torch') or {}
  text = (f'{r.get("batch")} x {r.get("image_hw")} ({r.get("dtype")}): JAX '
          f'{_f(j.get("images_per_s"))} img/s, PyTorch '
          + (f'{_f(t.get("images_per_s"))} img/s (JAX x{_f(r.get("jax_over_torch"), ".2f")})'
             if t.get('images_per_s') else _state(t)))
  return [(f'slide eval {r.get("config")}', text, '', _state(r))]


_ROWS = {'environment': _environment_rows, 'matmul_ceiling': _matmul_rows,
         'parity': _parity_rows, 'attention': _attention_rows, 'train_run': _train_run_rows,
         'train_step': _train_step_rows, 'slide_eval': _slide_rows}


def markdown(results: Dict[str, Any]) -> str:
  """The table of gpu_check.md: one or more rows per section."""
  meta = results.get('check', {})
  lines = [f'# GPU check ({meta.get("profile")}, {meta.get("date")}, '
           f'{_f(meta.get("wall_s"), ".0f")} s, exit status {meta.get("exit_status")})', '',
           '| section | measurement | result | bar | status |', '|---|---|---|---|---|']
  for name in SECTIONS:
    if name not in results:
      continue
    try:
      rows = _ROWS[name](results[name])
    except Exception as e:  # pylint: disable=broad-except
      rows = [('-', f'(table row failed: {one_line(e)})', '', _state(results[name]))]
    for i, (what, value, bar, status) in enumerate(rows):
      cells = [name if i == 0 else '', what, value, bar, status]
      lines.append('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# The parent's main.

_SECTION_FNS = {'environment': section_environment, 'matmul_ceiling': section_matmul_ceiling,
                'parity': section_parity, 'attention': section_attention,
                'train_run': section_train_run, 'train_step': section_train_step,
                'slide_eval': section_slide_eval}


def run_section(ctx: Context, name: str) -> Dict[str, Any]:
  """One section, never raising: an exception becomes {'status': 'error', 'error': one line}."""
  timeout = section_timeout(ctx, name)
  print(f'[{ctx.clock.elapsed():6.1f} s] {name}: start (at most {max(timeout, 0):.0f} s)',
        flush=True)
  start = time.monotonic()
  if name != 'matmul_ceiling' and timeout < ctx.profile.reserves[name]:
    result = {'status': 'skipped', 'why': f'time budget ({timeout:.0f} s left for it)'}
  else:
    try:
      result = _SECTION_FNS[name](ctx, timeout)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stdout)
      result = {'status': 'error', 'error': one_line(e)}
  result['seconds'] = time.monotonic() - start
  print(f'[{ctx.clock.elapsed():6.1f} s] {name}: {_state(result)} '
        f'({result["seconds"]:.1f} s)', flush=True)
  return result


def _selected_sections(names: Sequence[str]) -> List[str]:
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    raise flags.Error(f'--sections: unknown {unknown}; choose from {", ".join(SECTIONS)}.')
  chosen = set(names or SECTIONS) | {'environment'}  # every other section needs its findings
  if 'train_step' in chosen:
    chosen.add('matmul_ceiling')  # the second MFU reference
  return [n for n in SECTIONS if n in chosen]


def _write(out: str, results: Dict[str, Any]) -> str:
  with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
    json.dump(results, f, indent=1, default=_json_default)
  table = markdown(results)
  with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
    f.write(table)
  return table


def check(out: str, profile: Profile, sections: List[str]) -> int:
  """Runs the sections, writes the JSON (after each section) and the table; the exit status."""
  os.makedirs(out, exist_ok=True)
  work = os.path.join(out, '.workers')
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  ctx = Context(profile, out, work, Clock(profile.total_s), sections)
  results: Dict[str, Any] = {'check': {
      'profile': profile.name, 'command': ' '.join(sys.argv), 'sections': sections,
      'budget_s': profile.total_s,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}}
  print(f'GPU check ({profile.name}): {", ".join(sections)}; budget {profile.total_s:.0f} s',
        flush=True)
  try:
    for name in sections:
      results[name] = run_section(ctx, name)
      results['check']['wall_s'] = ctx.clock.elapsed()
      _write(out, results)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  bad = [n for n in sections if results[n].get('status') in ('error', 'failed')]
  results['check'].update(wall_s=ctx.clock.elapsed(), exit_status=1 if bad else 0,
                          not_ok=bad, workers=ctx.workers)
  table = _write(out, results)
  print('\n' + table, flush=True)
  return 1 if bad else 0


def main(argv: Sequence[str]) -> int:
  del argv  # everything is in FLAGS
  if _WORKER.value:
    run_worker_job(_WORKER.value, _SPEC.value)
    return 0
  if not _OUT.value:
    raise flags.Error('--out=DIR is required.')
  profile = DRY_RUN if _DRY_RUN.value else GPU
  if _BUDGET.value:
    profile = with_budget(profile, _BUDGET.value)
  return check(os.path.abspath(_OUT.value), profile, _selected_sections(_SECTIONS.value))


if __name__ == '__main__':
  if not __package__:  # `python bench/gpu_check.py`: the root's packages would not be found
    sys.exit('Run from the repository root: python -m bench.gpu_check --out=DIR')
  try:
    sys.exit(main(FLAGS(sys.argv)))
  except flags.Error as e:
    sys.exit(f'{e}\n{__doc__}')
