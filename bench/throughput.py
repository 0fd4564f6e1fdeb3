r"""Training and inference throughput of a config, JAX next to the PyTorch reference model.

  .venv/bin/python -m bench.throughput --config=configs/ade20k_base.py --batch_size=2 --torch
  .venv/bin/python -m bench.throughput --config=configs/ade20k_base.py --dtypes=bfloat16 --torch
  .venv/bin/python -m bench.throughput --config=configs/ade20k_base.py --breakdown  # time's parts
  .venv/bin/python -m bench.throughput --config=configs/ade20k_base.py --skip=infer,slide  # step

Run from the repository root (`-m`: the root's `segvit_jax` and `segvit_reference` are the ones
imported). The JAX side is the product's own code on a one-device mesh (`config.mesh='data:1'`,
the first device): `build.setup`, `state.create_state`, `step.make_train_step`, the model's eval
forward and `eval_loop.make_eval_step`. Random weights, batch `--batch_size`:
- compile time of the jitted train step, forward and eval step (JAX);
- training step (model + ATM loss + AdamW with clipping: the trainer's step) at the train crop
  (config.dataset.crop_size): median seconds and images/s. Labels are ADE-like: 16 classes per
  image in rectangular regions, 5% ignore (the official loss works per present class, so
  uniformly random labels would favour JAX);
- inference on the whole crop (the model's eval forward at config.model.img_size) and the eval
  step on `--slide_size` images (ADE val after the 512 test resize: 512x683, i.e. 2 windows of
  512 at stride 341, with config.eval's mode): sliding windows, the resize to the original size,
  softmax, argmax (and, in JAX, the batch's confusion matrix);
- peak host memory (max RSS of the measuring process) and peak device memory where the device
  reports it (`memory_stats()`: GPU / TPU);
- achieved FLOP/s from the analytic count `segvit-compile` uses (`flops.forward_flops`: a
  multiply-add counts 2, LayerNorm and upsampling as counted), training = 3x the train forward
  (the usual forward + 2x backward convention; loss and optimizer not counted), eval step = every
  model call it makes (`flops.eval_forwards`). MFU is printed where the device's dense bf16 peak
  is known (H100 SXM / H200 989, H100 PCIe 756 TFLOP/s; TPU v4 275, v5e 197); for float32 runs it
  is still relative to that bf16 peak.

With `--torch`, the same measurements of the PyTorch reference (`segvit_reference`: the official
modules and loss, eager PyTorch, mmseg's inference; `torch.set_num_threads` = the cores JAX gets;
bfloat16 = `torch.autocast`) follow, side by side, with the ratio PyTorch time / JAX time (> 1:
JAX is faster). Each framework runs in its own subprocess pinned to the same `--threads` cores.
The two start up (imports) together, then take turns, one running at a time: a turn is a setup /
compilation, or one measurement's warm-up call + `--steps` timed calls, and each measurement gets
`--rounds` turns per framework. Each turn ends with a short pause so that the idle thread pools
(OpenMP, Eigen) stop spin-waiting before the other process runs. Neither competes with the
other, a slow drift in the speed of a shared machine affects both alike, and the memory peaks
are separate.

`--xla_flags=...` sets XLA_FLAGS for the JAX worker (experiments with XLA CPU options);
`--breakdown` times the parts of the train step separately (backbone forward / backward, head,
loss, optimizer) in both frameworks; `--skip=infer,slide` measures the train step alone.
"""

import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import flags
from ml_collections import config_flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Own flag registry: `segvit_jax.aot.summary` defines --config / --json on the global one at import.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False,
                                          flag_values=FLAGS)
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Batch size of every measurement.',
                              flag_values=FLAGS)
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes: float32, bfloat16.',
                            flag_values=FLAGS)
_TORCH = flags.DEFINE_bool('torch', False, 'Also measure the PyTorch reference model.',
                           flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed calls of each measurement per round.',
                              flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Turns per measurement and framework, alternating; '
                               'the median is over rounds x steps calls.', flag_values=FLAGS)
_THREADS = flags.DEFINE_integer('threads', 0, 'CPU cores for each framework (0: all available).',
                                flag_values=FLAGS)
_SLIDE = flags.DEFINE_list('slide_size', ['512', '683'], 'H,W of the sliding-window images.',
                           flag_values=FLAGS)
_XLA_FLAGS = flags.DEFINE_string('xla_flags', None, 'XLA_FLAGS for the JAX worker.',
                                 flag_values=FLAGS)
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Time the parts of the train step.',
                               flag_values=FLAGS)
_SKIP = flags.DEFINE_list('skip', [], 'Measurements to skip: train, infer, slide.',
                          flag_values=FLAGS)
_JSON = flags.DEFINE_string('json', None, 'Also write all results to this JSON file.',
                            flag_values=FLAGS)
_WORKER = flags.DEFINE_enum('worker', None, ['jax', 'torch'], 'Internal: run one framework.',
                            flag_values=FLAGS)
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Internal: the worker dtype.',
                             flag_values=FLAGS)

# Dense bf16 peak FLOP/s by device kind substring (`jax.Device.device_kind`).
PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('TPU v4', 275e12),
              ('TPU v5 lite', 197e12), ('TPU v5e', 197e12))
RESULT_PREFIX = 'RESULT '
# Worker <-> parent turn-taking (see the module docstring): each worker imports its framework and
# answers TURN_DONE; then the parent writes GO_LINE, the worker runs until its next turn would
# start and answers TURN_DONE (or exits after its RESULT line).
GO_LINE = 'go'
TURN_DONE = 'TURN_DONE'
# Pause before handing the turn over: idle OpenMP threads spin for a while after a parallel region
# (measured: PyTorch handing over at once slowed the JAX forward that followed by ~30%).
SETTLE_S = 0.5
# (start, end) of every turn of this worker, time.monotonic() (one clock for all processes).
_TURN_SPANS: List[List[float]] = []


# ------------------------------------------------------------------------------------------------
# Shared helpers.


def _pin_threads(threads: int) -> int:
  """Restricts this process to `threads` cores (0: all it has); returns the count."""
  cores = sorted(os.sched_getaffinity(0))
  if threads and threads < len(cores):
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  return len(cores)


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _await_turn() -> None:
  """Blocks this worker until the parent gives it the machine."""
  if sys.stdin.readline().strip() != GO_LINE:
    raise SystemExit('throughput worker: the parent went away.')


def _pass_turn() -> None:
  """Hands the machine to the other worker and waits for it to come back."""
  time.sleep(SETTLE_S)
  print(TURN_DONE, flush=True)
  _await_turn()


@dataclasses.dataclass(frozen=True)
class Timing:
  """How `_timed` repeats a measurement.

  rounds: turns per measurement (None: --rounds); alternate: each turn waits for the parent's
  go, the CLI's turn-taking with the other framework's worker. A caller that runs one framework
  at a time in its own process (bench/gpu_check.py) passes alternate=False: no turns, no pauses.
  """
  rounds: Optional[int] = None
  alternate: bool = True


def _timed(fn: Callable[[], Any], steps: int, timing: Optional[Timing] = None) -> Dict[str, Any]:
  """Seconds of the first call (warm-up) and the median of the timed calls; fn must block.

  The calls run in `--rounds` turns of the alternation with the other framework's worker, each
  turn a warm-up call and `steps` timed calls back to back. Back to back, because a loop's steady
  state is what counts: a call after an idle pause pays again for memory the (virtual) machine
  took back meanwhile (measured: the JAX train step, 11.8 s in a loop, took 16.3 s when every call
  was a turn of its own). Several turns, so that both frameworks sample the same drift in the
  speed of a shared machine.
  'cpu_median_s' is the process CPU time (all threads) of the median call: on a machine shared
  with other jobs it varies less than wall time (but counts a thread pool's spin-waiting).
  """
  timing = timing or Timing()
  first = None
  times, cpu = [], []
  for _ in range(_ROUNDS.value if timing.rounds is None else timing.rounds):
    if timing.alternate:
      _pass_turn()
    start = time.monotonic()
    fn()
    if first is None:
      first = time.monotonic() - start  # compilation-warm, memory-cold: the loop's first step
    for _ in range(steps):
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    _TURN_SPANS.append([start, time.monotonic()])
  return {'first_s': first, 'median_s': float(np.median(times)), 'min_s': float(np.min(times)),
          'times_s': times, 'cpu_median_s': float(np.median(cpu))}


def ade_like_labels(rng: np.random.Generator, batch: int, h: int, w: int, k: int,
                    classes: int = 16, ignore: float = 0.05) -> np.ndarray:
  """(B, H, W) int32: `classes` random classes per image on a 4x4 grid of uneven rectangles."""
  out = np.empty((batch, h, w), np.int32)
  for b in range(batch):
    rows = np.sort(rng.choice(np.arange(1, h), 3, replace=False))
    cols = np.sort(rng.choice(np.arange(1, w), 3, replace=False))
    ids = rng.choice(k, min(classes, k), replace=False)
    row_of = np.searchsorted(rows, np.arange(h), side='right')
    col_of = np.searchsorted(cols, np.arange(w), side='right')
    out[b] = ids[(row_of[:, None] * 4 + col_of[None, :]) % len(ids)]
  out[rng.random(out.shape) < ignore] = 255
  return out


def random_images(rng: np.random.Generator, batch: int, hw, channels_first: bool = False
                  ) -> np.ndarray:
  """(B, H, W, 3) float32 (channels_first: (B, 3, H, W)) uniform in [-1, 1]: normalised pixels."""
  h, w = hw
  shape = (batch, 3, h, w) if channels_first else (batch, h, w, 3)
  return rng.uniform(-1, 1, size=shape).astype(np.float32)


def model_flops(config, slide_hw) -> Dict[str, float]:
  """FLOPs per image of each measurement ('train', 'infer', 'slide'), as `segvit-compile` counts
  them: `flops.forward_flops`, training 3x the train forward, the eval step every model call
  `flops.eval_forwards` finds for a bucket of `slide_hw` (windows, TTA views)."""
  from segvit_jax.aot import flops  # pylint: disable=g-import-not-at-top
  m = config.model
  slide_config = config.copy_and_resolve_references()
  slide_config.dataset.eval_pad_size = tuple(slide_hw)
  return {
      'train': 3 * flops.forward_flops(m, config.dataset.crop_size, train=True),
      'infer': flops.forward_flops(m, m.img_size, train=False),
      'slide': sum(n * flops.forward_flops(m, hw, train=False)
                   for hw, n in flops.eval_forwards(slide_config)),
  }


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


# ------------------------------------------------------------------------------------------------
# JAX worker.


def _compile_program(out: Dict[str, Any], name: str, jitted, *args):
  """(compiled `jitted` for args, seconds); XLA's temporaries go to out['temp_mib'][name]."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  try:  # XLA's buffer plan: the temporaries one call needs besides its arguments and outputs
    memory = compiled.memory_analysis()
    out.setdefault('temp_mib', {})[name] = memory.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  return compiled, seconds


def run_jax(config, batch: int, dtype: str, steps: int, slide_hw, skip, breakdown: bool,
            timing: Optional[Timing] = None):
  """The JAX measurements (module docstring) on the first device; `timing` as `_timed`'s."""
  import jax  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import eval_loop  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  from segvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import build  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config.model.dtype = dtype
  config.mesh = 'data:1'
  config.batch_size = batch
  device = jax.devices()[0]
  run = build.setup(config, [device])
  k = config.model.num_classes
  rng = np.random.default_rng(0)
  crop = tuple(config.dataset.crop_size)
  images = random_images(rng, batch, crop)
  labels = ade_like_labels(rng, batch, *crop, k)
  out: Dict[str, Any] = {'framework': 'jax', 'version': jax.__version__,
                         'device': device.device_kind, 'platform': device.platform,
                         'xla_flags': os.environ.get('XLA_FLAGS', '')}

  def on_mesh(tree):  # laid out as the input pipeline lays out batches
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding.batch_sharding(run.mesh, np.ndim(x))), tree)

  compile_ = functools.partial(_compile_program, out)

  with jax.set_mesh(run.mesh):
    t0 = time.perf_counter()
    state = jax.block_until_ready(state_lib.create_state(run.model, run.tx, config, run.spec))
    out['init_s'] = time.perf_counter() - t0

    if 'train' not in skip:
      train_batch = on_mesh({'image': images, 'label': labels})
      step_fn, out['compile_train_s'] = compile_(
          'train_step', step_lib.make_train_step(run.model, run.tx, run.schedule, config,
                                                 run.mesh, run.spec), state, train_batch)
      held = {'state': state}

      def one_step():
        held['state'], metrics = step_fn(held['state'], train_batch)  # the state is donated
        out['last_loss'] = float(metrics['loss'])  # blocks

      out['train'] = _timed(one_step, steps, timing)
      state = held.pop('state')
      if breakdown:
        out['breakdown'] = _jax_breakdown(run.model, run.tx, state.params, images, labels,
                                          config, steps, timing)

    variables = {'params': state.params}
    if 'infer' not in skip:
      crop_images = on_mesh(random_images(rng, batch, config.model.img_size))
      forward = jax.jit(lambda v, x: run.model.apply(v, x, train=False))
      fwd, out['compile_infer_s'] = compile_('forward', forward, variables, crop_images)
      out['infer'] = _timed(lambda: fwd(variables, crop_images).block_until_ready(), steps,
                            timing)

    if 'slide' not in skip:
      sizes = np.asarray([slide_hw] * batch, np.int32)  # no test resize: image = label size
      slide_batch = on_mesh({'image': random_images(rng, batch, slide_hw), 'image_size': sizes,
                             'label': ade_like_labels(rng, batch, *slide_hw, k),
                             'label_size': sizes, 'valid': np.ones(batch, bool)})
      conf = jax.device_put(np.zeros((k, k), np.int32), sharding.replicated(run.mesh))
      # As `segvit-compile` builds it: one program, the eval step of a run of this config.
      eval_step = jax.jit(
          eval_loop.make_eval_step(run.model, inference.InferenceSpec.from_config(config)),
          out_shardings=sharding.replicated(run.mesh))
      slide_fn, out['compile_slide_s'] = compile_('slide', eval_step, variables, slide_batch,
                                                  conf)
      out['slide'] = _timed(lambda: slide_fn(variables, slide_batch, conf).block_until_ready(),
                            steps, timing)

  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
  out['peak_rss_mib'] = _peak_rss_mib()
  return out


def _jax_breakdown(model, tx, params, images, labels, config, steps, timing=None):
  """Seconds of the parts of a train step, each jitted on its own."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from segvit_jax import losses  # pylint: disable=g-import-not-at-top
  k = config.model.num_classes
  rngs = {'dropout': jax.random.key(1)}
  backbone_params = params['backbone']
  # The backbone alone, with the model's own settings (the model has no backbone-only method).
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  vit_module = segvit.backbone(config.model, model.attention)

  def backbone_fwd(bp, x):
    return vit_module.apply({'params': bp}, x, train=True, rngs=rngs)

  def backbone_fwd_bwd(bp, x):
    taps, vjp = jax.vjp(lambda p: backbone_fwd(p, x), bp)
    return vjp(jax.tree.map(jnp.ones_like, taps))

  def full_outputs(p, x):
    return model.apply({'params': p}, x, train=True, rngs=rngs)

  outputs = jax.jit(full_outputs)(params, images)

  def loss_only(outs, y):
    return losses.atm_loss(outs, y, num_classes=k, **config.loss)[0]

  def loss_grad(outs, y):
    return jax.grad(loss_only)(outs, y)

  grads = jax.tree.map(jnp.ones_like, params)  # the update's cost does not depend on values
  opt_state = jax.jit(tx.init)(params)

  def opt_update(g, s, p):
    updates, s = tx.update(g, s, p)
    return jax.tree.map(jnp.add, p, updates), s

  parts = {
      'backbone_fwd': (backbone_fwd, (backbone_params, images)),
      'backbone_fwd_bwd': (backbone_fwd_bwd, (backbone_params, images)),
      'model_fwd_train': (full_outputs, (params, images)),
      'model_fwd_bwd': (lambda p, x: jax.vjp(lambda q: full_outputs(q, x), p)[1](
          jax.tree.map(jnp.ones_like, outputs)), (params, images)),
      'loss_fwd': (loss_only, (outputs, labels)),
      'loss_fwd_bwd': (loss_grad, (outputs, labels)),
      'optimizer': (opt_update, (grads, opt_state, params)),
  }
  result = {}
  for name, (fn, args) in parts.items():
    compiled = jax.jit(fn).lower(*args).compile()
    t = _timed(lambda: jax.block_until_ready(compiled(*args)), steps, timing)
    result[name] = [t['median_s'], t['cpu_median_s']]
    try:
      result[name].append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
    except Exception:  # pylint: disable=broad-except
      pass
  return result


# ------------------------------------------------------------------------------------------------
# PyTorch worker.


def _torch_model(config):
  import segvit_reference as ref  # pylint: disable=g-import-not-at-top
  c = config.model
  if c.img_size[0] != c.img_size[1] or c.patch_size != 16:
    raise ValueError('The PyTorch reference supports square img_size and patch 16 only; got '
                     f'img_size {tuple(c.img_size)}, patch {c.patch_size}.')
  shrunk = c.name == 'segvit_shrunk'
  if not shrunk and c.use_stages != len(c.out_indices):
    raise ValueError('The PyTorch reference uses every out_index as a stage; config has '
                     f'use_stages={c.use_stages}, out_indices={tuple(c.out_indices)}.')
  model = ref.build(
      'shrunk' if shrunk else 'plain', img_size=c.img_size[0], embed_dims=c.embed_dim,
      num_layers=c.depth, num_heads=c.num_heads, out_indices=tuple(c.out_indices),
      decoder_dims=c.decoder_dim, decoder_heads=c.decoder_heads, decoder_layers=c.decoder_layers,
      num_classes=c.num_classes, shrink_idx=c.shrink_index, mlp_ratio=c.mlp_ratio,
      dropout=c.decoder_dropout, drop_path_rate=c.drop_path_rate)
  return model, ref


def _compile_layers(model) -> int:
  """Regional torch.compile: each ViT block and each decoder layer (the entries of every
  `layers` ModuleList) compiled on its own, the glue between them and the loss left eager.
  Identical blocks share one compiled graph, so compiling costs a few layers' worth, not the
  whole unrolled model's. Returns the number of layers compiled; the first call compiles."""
  import torch  # pylint: disable=g-import-not-at-top
  count = 0
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.ModuleList) and name.rsplit('.', 1)[-1] == 'layers':
      for layer in module:
        layer.compile()
        count += 1
  return count


def _torch_train(model, images, labels, amp, loss_of, optim_config, steps, timing, out):
  """Times the trainer's step (forward, loss, backward, clipping, AdamW); returns the optimizer."""
  import torch  # pylint: disable=g-import-not-at-top
  o = optim_config
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                          weight_decay=o.weight_decay)

  def one_step():
    opt.zero_grad(set_to_none=True)
    with amp():
      outputs = model.forward_all(images)
      loss = loss_of(outputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    opt.step()
    out['last_loss'] = float(loss.detach())  # waits for the step: the copy follows it

  out['train'] = _timed(one_step, steps, timing)
  return opt


def run_torch(config, batch: int, dtype: str, steps: int, slide_hw, skip, breakdown: bool,
              threads: int, device: str = 'cpu', timing: Optional[Timing] = None,
              compile_layers: bool = False):
  """The PyTorch reference's measurements on `device` ('cpu', 'cuda', 'cuda:N'); bfloat16 is
  autocast. `timing` as `_timed`'s; `compile_layers`: `_compile_layers` first. The breakdown
  times CPU calls (nothing waits for a GPU there)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model, ref = _torch_model(config)
  kind = torch.device(device).type
  model.to(device)
  out: Dict[str, Any] = {'framework': 'torch', 'version': torch.__version__,
                         'threads': torch.get_num_threads(),
                         'device': torch.cuda.get_device_name(device) if kind == 'cuda' else kind}
  if kind == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  if compile_layers:
    out['compiled_layers'] = _compile_layers(model)
  k = config.model.num_classes
  rng = np.random.default_rng(0)
  crop = tuple(config.dataset.crop_size)
  on_device = lambda a: torch.from_numpy(a).to(device)
  images = on_device(random_images(rng, batch, crop, channels_first=True))
  labels = on_device(ade_like_labels(rng, batch, *crop, k).astype(np.int64))
  lc = config.loss

  def amp():
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def synced(fn):  # CUDA calls return before the GPU is done: a timed call waits for it
    return (lambda: (fn(), torch.cuda.synchronize(device))) if kind == 'cuda' else fn

  def loss_of(outputs):
    # The reference loss creates its class weights and targets on the default device.
    with torch.device(device):
      terms = ref.atm_loss(outputs, labels, k, eos_coef=lc.no_object_weight,
                           cls_weight=lc.cls_weight, mask_weight=lc.mask_weight,
                           dice_weight=lc.dice_weight)
    return sum(terms.values())

  if 'train' not in skip:
    opt = _torch_train(model, images, labels, amp, loss_of, config.optim, steps, timing, out)
    if breakdown:
      out['breakdown'] = _torch_breakdown(model, images, labels, loss_of, amp, opt, steps,
                                          timing)

  model.eval()
  if 'infer' not in skip:
    crop_images = on_device(random_images(rng, batch, config.model.img_size,
                                          channels_first=True))

    def infer():
      with torch.inference_mode(), amp():
        model.forward_all(crop_images)['scores']
    out['infer'] = _timed(synced(infer), steps, timing)

  if 'slide' not in skip:
    slide_images = on_device(random_images(rng, batch, slide_hw, channels_first=True))
    e = config.eval

    def slide():  # mmseg's inference (slide or whole, resize to the original size), argmax
      with torch.inference_mode(), amp():
        ref.inference(model, slide_images, mode=e.mode, crop_size=tuple(e.crop_size),
                      stride=tuple(e.stride), num_classes=k).argmax(1)
    out['slide'] = _timed(synced(slide), steps, timing)
  out['peak_rss_mib'] = _peak_rss_mib()
  if kind == 'cuda':
    out['device_peak_mib'] = torch.cuda.max_memory_allocated(device) / 2**20
  return out


def _torch_breakdown(model, images, labels, loss_of, amp, opt, steps, timing=None):
  import torch  # pylint: disable=g-import-not-at-top
  result = {}

  def backbone_fwd():
    with torch.no_grad(), amp():
      model.backbone(images)

  def backbone_fwd_bwd():
    with amp():
      taps, _ = model.backbone(images)
    sum(t.float().sum() for t in taps).backward()
    model.zero_grad(set_to_none=True)

  def model_fwd_train():
    with torch.no_grad(), amp():
      model.forward_all(images)

  def model_fwd_bwd():
    with amp():
      out = model.forward_all(images)
      total = out['pred_logits'].float().sum() + out['pred_masks'].float().sum() + sum(
          a['pred_logits'].float().sum() + a['pred_masks'].float().sum()
          for a in out['aux_outputs'])
    total.backward()
    model.zero_grad(set_to_none=True)

  with torch.no_grad(), amp():
    detached = model.forward_all(images)

  def leaf(t):
    return t.detach().float().requires_grad_(True)

  def loss_fwd():
    with torch.no_grad(), amp():
      loss_of(detached)

  def loss_fwd_bwd():
    outs = {'pred_logits': leaf(detached['pred_logits']),
            'pred_masks': leaf(detached['pred_masks']),
            'aux_outputs': [{k: leaf(v) for k, v in a.items()} for a in detached['aux_outputs']]}
    with amp():
      loss = loss_of(outs)
    loss.backward()

  def optimizer():
    for p in model.parameters():
      p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
    opt.step()

  for name, fn in (('backbone_fwd', backbone_fwd), ('backbone_fwd_bwd', backbone_fwd_bwd),
                   ('model_fwd_train', model_fwd_train), ('model_fwd_bwd', model_fwd_bwd),
                   ('loss_fwd', loss_fwd), ('loss_fwd_bwd', loss_fwd_bwd),
                   ('optimizer', optimizer)):
    t = _timed(fn, steps, timing)
    result[name] = [t['median_s'], t['cpu_median_s']]
  return result


# ------------------------------------------------------------------------------------------------
# The parent: one worker per framework and dtype, then the table.


def _worker_command(framework: str, dtype: str) -> List[str]:
  passthrough = [a for a in sys.argv[1:] if not a.startswith(('--worker', '--dtype=', '--dtypes',
                                                          '--torch', '--notorch', '--json'))]
  return [sys.executable, '-m', __spec__.name, *passthrough, f'--worker={framework}',
          f'--dtype={dtype}']


def _until_turn_done(framework: str, procs, results: Dict[str, Dict[str, Any]],
                     dtype: str) -> bool:
  """Reads a worker's output until it hands the machine back (True) or ends (False)."""
  proc, stderr = procs[framework]
  while True:
    line = proc.stdout.readline()
    if line.startswith(RESULT_PREFIX):
      results[framework] = json.loads(line[len(RESULT_PREFIX):])
    elif line.strip() == TURN_DONE:
      return True
    elif not line:
      status = proc.wait()
      if framework not in results:
        for other, _ in procs.values():
          other.kill()
        stderr.seek(0)
        raise RuntimeError(f'{framework} worker ({dtype}) failed with status {status}:\n'
                           f'{stderr.read()[-4000:]}')
      return False


def _run_workers(frameworks: Sequence[str], dtype: str) -> Dict[str, Dict[str, Any]]:
  """Runs one worker per framework: imports at once, then in strict alternation of turns."""
  procs = {}
  for framework in frameworks:
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    if framework == 'jax' and _XLA_FLAGS.value is not None:
      env['XLA_FLAGS'] = _XLA_FLAGS.value
    stderr = tempfile.TemporaryFile(mode='w+')
    procs[framework] = (subprocess.Popen(
        _worker_command(framework, dtype), env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=stderr, text=True), stderr)
  print(f'[{dtype}] running {" and ".join(frameworks)} in alternation...', file=sys.stderr,
        flush=True)
  results: Dict[str, Dict[str, Any]] = {}
  for framework in frameworks:  # every worker has imported its framework: no turn runs yet
    _until_turn_done(framework, procs, results, dtype)
  running = list(frameworks)
  while running:
    for framework in list(running):
      proc, _ = procs[framework]
      proc.stdin.write(GO_LINE + '\n')
      proc.stdin.flush()
      if not _until_turn_done(framework, procs, results, dtype):
        running.remove(framework)
  return results


def _derived(result: Dict[str, Any], flops: Dict[str, float], batch: int) -> Dict[str, Any]:
  """images/s, FLOP/s and MFU of a worker's raw timings; `flops` per image (`model_flops`)."""
  peak = next((p for name, p in PEAK_FLOPS if name in result.get('device', '')), None)
  d = {}
  for key, flops_per_image in flops.items():
    if key in result:
      s = result[key]['median_s']
      d[f'{key}_s'] = s
      d[f'{key}_images_per_s'] = batch / s
      d[f'{key}_tflops'] = flops_per_image * batch / s / 1e12
      if peak:
        d[f'{key}_mfu'] = flops_per_image * batch / s / peak
  return d


def _fmt(v, spec='.3g') -> str:
  return '-' if v is None else format(v, spec)


def _table(flops, batch, slide_hw, jax_r, torch_r) -> str:
  jd = _derived(jax_r, flops, batch)
  td = _derived(torch_r, flops, batch) if torch_r else {}
  rows = [
      ('compile train step (s)', jax_r.get('compile_train_s'), None, False),
      ('compile forward (s)', jax_r.get('compile_infer_s'), None, False),
      ('compile slide (s)', jax_r.get('compile_slide_s'), None, False),
      ('train: first step (s)', jax_r.get('train', {}).get('first_s'),
       torch_r and torch_r.get('train', {}).get('first_s'), True),
      ('train step (s)', jd.get('train_s'), td.get('train_s'), True),
      ('train step, process CPU (s)', jax_r.get('train', {}).get('cpu_median_s'),
       torch_r and torch_r.get('train', {}).get('cpu_median_s'), True),
      ('train images/s', jd.get('train_images_per_s'), td.get('train_images_per_s'), False),
      ('train TFLOP/s (3x fwd)', jd.get('train_tflops'), td.get('train_tflops'), False),
      ('inference, whole crop (s/batch)', jd.get('infer_s'), td.get('infer_s'), True),
      ('inference, process CPU (s)', jax_r.get('infer', {}).get('cpu_median_s'),
       torch_r and torch_r.get('infer', {}).get('cpu_median_s'), True),
      ('inference images/s', jd.get('infer_images_per_s'), td.get('infer_images_per_s'), False),
      ('inference TFLOP/s', jd.get('infer_tflops'), td.get('infer_tflops'), False),
      (f'slide {slide_hw[0]}x{slide_hw[1]} (s/batch)', jd.get('slide_s'), td.get('slide_s'),
       True),
      ('slide, process CPU (s)', jax_r.get('slide', {}).get('cpu_median_s'),
       torch_r and torch_r.get('slide', {}).get('cpu_median_s'), True),
      ('slide images/s', jd.get('slide_images_per_s'), td.get('slide_images_per_s'), False),
      ('peak host RSS (MiB)', jax_r.get('peak_rss_mib'), torch_r and torch_r.get('peak_rss_mib'),
       False),
      ('peak device memory (MiB)', jax_r.get('device_peak_mib'), None, False),
  ] + [(f'XLA temporaries, {name} (MiB)', mib, None, False)
       for name, mib in jax_r.get('temp_mib', {}).items()]
  if 'train_mfu' in jd:
    rows.append(('MFU train (vs dense bf16 peak)', jd['train_mfu'], None, False))
    rows.append(('MFU inference', jd.get('infer_mfu'), None, False))
    rows.append(('MFU slide', jd.get('slide_mfu'), None, False))
  lines = [f'{"":34s} {"JAX":>10s} {"PyTorch":>10s} {"PyTorch/JAX":>12s}']
  for name, j, t, is_time in rows:
    ratio = (t / j) if (is_time and j and t) else ((j / t) if (not is_time and j and t and
                                                                'images/s' in name) else None)
    lines.append(f'{name:34s} {_fmt(j):>10s} {_fmt(t):>10s} {_fmt(ratio, ".2f"):>12s}')
  for label, r in (('JAX', jax_r), ('PyTorch', torch_r)):
    if r and 'breakdown' in r:
      parts = ', '.join(f'{k} {v[0]:.3f}/{v[1]:.3f}' + (f'/{v[2]:.0f}' if len(v) > 2 else '')
                        for k, v in r['breakdown'].items())
      lines.append(f'{label} train-step parts (wall s/CPU s[/XLA temp MiB]): {parts}')
  return '\n'.join(lines)


def _import_framework(framework: str) -> None:
  """Imports what a worker measures, before its first turn: startup is not measured, and the
  workers' imports run at the same time."""
  if framework == 'jax':
    from segvit_jax.evaluation import eval_loop  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from segvit_jax.training import loop  # noqa: F401
  else:
    import segvit_reference  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def _worker(config, batch: int, slide_hw) -> None:
  """One framework's measurements, in the turns the parent gives; prints the RESULT line."""
  threads = _pin_threads(_THREADS.value)
  _import_framework(_WORKER.value)
  print(TURN_DONE, flush=True)
  _await_turn()
  load_start = os.getloadavg()[0]
  if _WORKER.value == 'jax':
    result = run_jax(config, batch, _DTYPE.value, _STEPS.value, slide_hw, set(_SKIP.value),
                     _BREAKDOWN.value)
  else:
    result = run_torch(config, batch, _DTYPE.value, _STEPS.value, slide_hw, set(_SKIP.value),
                       _BREAKDOWN.value, threads)
  result['threads'] = threads
  result['turn_spans'] = _TURN_SPANS
  result['load_average'] = [load_start, os.getloadavg()[0]]  # 1-minute, at start and end
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv):
  del argv  # everything is in FLAGS
  config = _CONFIG.value
  if config is None:
    raise flags.Error('Pass --config=configs/<name>.py.')
  slide_hw = tuple(int(s) for s in _SLIDE.value)
  batch = _BATCH.value
  if _WORKER.value:
    _worker(config, batch, slide_hw)
    return

  threads = _THREADS.value or len(os.sched_getaffinity(0))
  m = config.model
  flops = model_flops(config, slide_hw)
  header = (f'{m.name} embed {m.embed_dim} depth {m.depth}, crop {tuple(m.img_size)}, '
            f'K={m.num_classes}, batch {batch}; {threads} threads of {_cpu_name()}; '
            f'load average {os.getloadavg()[0]:.2f}')
  print(header)
  print(f'forward GFLOPs per image (summary, 2 per multiply-add): {flops["infer"] / 1e9:.1f}')
  all_results = {'header': header, 'command': ' '.join(sys.argv), 'runs': []}
  for dtype in _DTYPES.value:
    results = _run_workers(['jax', 'torch'] if _TORCH.value else ['jax'], dtype)
    jax_r, torch_r = results['jax'], results.get('torch')
    loads = jax_r['load_average'] + (torch_r['load_average'] if torch_r else [])
    print(f'\n== {dtype} on {jax_r["device"]} (jax {jax_r["version"]}'
          + (f', torch {torch_r["version"]}' if torch_r else '')
          + f'; 1-min load average {min(loads):.1f}..{max(loads):.1f}'
          + (f', XLA_FLAGS={jax_r["xla_flags"]}' if jax_r['xla_flags'] else '') + ')')
    print(_table(flops, batch, slide_hw, jax_r, torch_r), flush=True)
    all_results['runs'].append({'dtype': dtype, 'jax': jax_r, 'torch': torch_r,
                                'jax_derived': _derived(jax_r, flops, batch),
                                'torch_derived': torch_r and _derived(torch_r, flops, batch)})
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(all_results, f, indent=2)


if __name__ == '__main__':
  if not __package__:  # `python bench/throughput.py`: neither the root's packages nor `-m` workers
    sys.exit('Run from the repository root: python -m bench.throughput --config=...')
  try:
    main(FLAGS(sys.argv))
  except flags.Error as e:
    sys.exit(f'{e}\n{__doc__}')
