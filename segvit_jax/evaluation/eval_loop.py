"""The evaluation loop: a split's batches -> the eval step (inference and the batch's confusion
matrix, on device) -> mIoU and the other metrics on the host.

    eval_step = make_eval_step(model, InferenceSpec.from_config(config))  # (variables, batch, conf)
    results = evaluate(eval_step, variables, eval_batches(config, mesh),
                       num_classes=K)                                      # {'miou', 'macc', ...}

Also the one host transfer of evaluation results (`to_host`), for a (K, K) matrix or a batch of
predictions laid out over many hosts.
"""

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segvit_jax import distributed
from segvit_jax.evaluation import inference
from segvit_jax.evaluation import metrics

# Pixels an int32 confusion matrix may count before `evaluate` moves it to the host.
_INT32_SAFE_PIXELS = 2**31 - 1


def eval_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """The eval split as global batches (this process's shard of every batch), each padded up to
  a multiple of the mesh's batch shards."""
  from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.create_eval_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      batch_shards=mesh.shape['data'] * mesh.shape['fsdp'])
  return input_pipeline.global_batches(ds, mesh)


def batch_confusion(pred: jnp.ndarray, batch: Dict[str, jnp.ndarray],
                    num_classes: int) -> jnp.ndarray:
  """(K, K) confusion of a batch: padding examples, 255 and pixels beyond label_size ignored."""
  label = batch['label']
  valid = inference.within_sizes(jnp.asarray(batch['label_size'], jnp.int32), label.shape[1:3])
  if 'valid' in batch:
    valid = valid & jnp.asarray(batch['valid'], bool)[:, None, None]
  return metrics.confusion_matrix(pred, label, num_classes, valid=valid)


def make_eval_step(model, spec: inference.InferenceSpec) -> Callable[..., jnp.ndarray]:
  """Jitted (variables, batch, conf) -> conf + this batch's (K, K) int32 confusion matrix.

  Args:
    model: a linen Module whose `apply(variables, images, train=False)` returns (N, H, W, K)
      scores (`segvit.build_model`).
    spec: the inference settings (`InferenceSpec.from_config(config)`); K = spec.num_classes.

  Call it under the trainer's mesh / logical-axis-rules contexts. When the batch holds global
  arrays on a mesh, the returned matrix is replicated over that mesh (the sum over every
  device and host); the jit is built once per mesh.
  """

  def step(variables, batch, conf):
    score_fn = lambda x: model.apply(variables, x, train=False)
    pred = inference.predict(score_fn, batch, spec)
    return conf + batch_confusion(pred, batch, spec.num_classes)

  compiled = {}

  def eval_step(variables, batch, conf):
    mesh = _mesh_of(batch)
    if mesh not in compiled:
      out = NamedSharding(mesh, P()) if mesh is not None else None
      compiled[mesh] = distributed.compiled_together(jax.jit(step, out_shardings=out),
                                                     'the eval step')
    return compiled[mesh](variables, batch, conf)

  return eval_step


def _mesh_of(batch):
  sharding = getattr(batch.get('label', batch.get('image')), 'sharding', None)
  return sharding.mesh if isinstance(sharding, NamedSharding) else None


def zeros_confusion(num_classes: int, mesh: Optional[Mesh]) -> Any:
  """A (K, K) int32 zero matrix, replicated over `mesh` (or on the host without one)."""
  zeros = np.zeros((num_classes, num_classes), np.int32)
  return zeros if mesh is None else jax.device_put(zeros, NamedSharding(mesh, P()))


def to_host(x: Any) -> np.ndarray:
  """A (global) array as host numpy, whole on every process.

  A replicated global array is read from this process's own copy (no communication); one laid
  out over several hosts is gathered from all of them (every process must call this).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate(eval_step: Callable[..., Any], variables: Any,
             batches: Iterable[Dict[str, Any]], *, num_classes: int,
             class_names: Optional[Sequence[str]] = None,
             max_batches: Optional[int] = None) -> Dict[str, Any]:
  """Runs `eval_step` over `batches` and returns `metrics.segmentation_metrics` of the split.

  The confusion matrix stays on device between batches; it is fetched once at the end, or
  earlier whenever the pixels counted since the last fetch could overflow int32 (the bound comes
  from the static label shapes, so no synchronisation is needed to know it). The result also has
  'confusion_matrix' ((K, K) int64) and 'num_batches'.
  """
  total = np.zeros((num_classes, num_classes), np.int64)
  conf, pending, count = None, 0, 0
  for batch in batches:
    if max_batches is not None and count >= max_batches:
      break
    pixels = int(np.prod(batch['label'].shape))
    if conf is None or pending + pixels > _INT32_SAFE_PIXELS:
      if conf is not None:
        total += to_host(conf).astype(np.int64)
      conf, pending = zeros_confusion(num_classes, _mesh_of(batch)), 0
    conf = eval_step(variables, batch, conf)
    pending += pixels
    count += 1
  if conf is not None:
    total += to_host(conf).astype(np.int64)
  result = metrics.segmentation_metrics(total, class_names)
  result['confusion_matrix'] = total
  result['num_batches'] = count
  return result
