"""What an evaluator provides (`Evaluator`), what it is built from (`Context`), and the registry
that turns a `config.evals` entry's `type` into one.

An evaluator type is registered under a name, by segvit_jax for its own ('miou', 'figure') and
by any other code the same way, before the run builds its evaluators:

    from segvit_jax.evaluation.evaluators import registry

    @registry.register('mean_score')
    class MeanScore(registry.Evaluator):
      def __init__(self, context: registry.Context, *, num_batches: int = 1): ...
      def run(self, params): return {'mean': ...}
      def summary(self, result): return f'mean score {result["mean"]:.3f}'

    config.evals.scores = dict(type='mean_score', every_steps=100, num_batches=2)

The entry's keys other than `type` and `every_steps` are the factory's keyword arguments.
"""

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping, Optional, Protocol

import ml_collections
from jax.sharding import Mesh

from segvit_jax.errors import UserError
from segvit_jax.evaluation import inference

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Context:
  """What a run gives every evaluator it builds."""
  model: Any  # linen Module: apply({'params': params}, images, train=False) -> (N, H, W, K)
  config: ml_collections.ConfigDict
  mesh: Mesh
  spec: inference.InferenceSpec  # the run's inference settings
  workdir: str
  prefix: str = ''  # of the files written to workdir: '' when training, 'eval_' in --mode=eval

  def path(self, name: str) -> str:
    """WORKDIR/<prefix><name>: where an evaluator writes its file `name`."""
    return os.path.join(self.workdir, self.prefix + name)


class Evaluator(Protocol):
  """One `config.evals` entry's evaluation. Subclass it to inherit the optional methods' defaults
  (no scalars, no checkpoint metric, nothing in final_metrics.json, no outputs).

  Every process of a job builds and runs the same evaluators in the same order (evaluations are
  SPMD programs); only process 0 writes files.
  """

  def run(self, params: PyTree) -> Mapping[str, Any]:
    """Evaluates `params` (the model's parameter tree, on the run's mesh): the result."""
    ...

  def summary(self, result: Mapping[str, Any]) -> str:
    """The console line of a result, after '<name> at step <step>: '."""
    ...

  def scalars(self, result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """{prefix + key: value} for the metric writers (metrics.jsonl, TensorBoard)."""
    del result, prefix
    return {}

  def checkpoint_metric(self, result: Mapping[str, Any]) -> Optional[float]:
    """The number that picks the best checkpoint (higher is better), or None. The first entry of
    config.evals that gives one decides, and its `final_metrics` are final_metrics.json's top
    level."""
    del result
    return None

  def final_metrics(self, result: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """JSON-ready numbers for final_metrics.json (eval_metrics.json in --mode=eval), or None.
    Entries other than the checkpoint-picking one go under their entry's name."""
    del result
    return None

  def outputs(self, name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """What `train_and_evaluate` returns of the final result of entry `name` (the first entry
    to give a key keeps it), e.g. {'<name>/miou': ...} or {'figure_file': path}."""
    del name, result
    return {}


Factory = Callable[..., Evaluator]  # (context, **options) -> Evaluator

_FACTORIES: dict[str, Factory] = {}


def register(type_name: str) -> Callable[[Factory], Factory]:
  """Decorator: registers an evaluator class (or factory) under `type_name`, the value of
  `type` in config.evals. Registering the same definition again (a reloaded module) replaces
  it; a different one under a taken name is a ValueError."""

  def add(factory: Factory) -> Factory:
    known = _FACTORIES.get(type_name)
    if known is not None and _where(known) != _where(factory):
      raise ValueError(f'evaluator type {type_name!r} is already registered ({_where(known)}).')
    _FACTORIES[type_name] = factory
    return factory

  return add


def _where(factory: Factory) -> str:
  return f'{factory.__module__}.{factory.__qualname__}'


def types() -> tuple[str, ...]:
  """The registered type names, in registration order."""
  return tuple(_FACTORIES)


def create(name: str, type_name: Any, context: Context,
           options: Mapping[str, Any]) -> Evaluator:
  """The evaluator of entry `name` of config.evals; UserError for an unknown type or option."""
  factory = _FACTORIES.get(type_name)
  if factory is None:
    names = [repr(t) for t in types()]
    expected = ' or '.join(names) if len(names) <= 2 else (
        ', '.join(names[:-1]) + ' or ' + names[-1])
    raise UserError(f'config.evals.{name}.type={type_name!r}: expected {expected}.')
  try:
    inspect.signature(factory).bind(context, **options)
  except TypeError as e:
    raise UserError(f'config.evals.{name} (type {type_name!r}): {e}.') from e
  return factory(context, **options)
