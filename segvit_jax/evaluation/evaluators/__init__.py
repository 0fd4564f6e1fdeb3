"""What a run evaluates: one small evaluator class per file behind one protocol
(`registry.Evaluator`), chosen by `type` in `config.evals` through a registry
(`registry.register`), built and scheduled by `runner`.

Built in: 'miou' (`miou.py`: mIoU & co. over the eval split; picks the best checkpoint) and
'figure' (`figure.py`: predictions.png). Another evaluator is a class registered from anywhere
(see `registry`) and an entry in config.evals naming its type.

The training loop and --mode=eval call `from_config`, `run_due`, `run_missing` and
`write_final`; evaluators read the eval split with `eval_batches`.
"""

from segvit_jax.evaluation.eval_loop import eval_batches
from segvit_jax.evaluation.evaluators import registry
from segvit_jax.evaluation.evaluators import miou  # registers 'miou'
from segvit_jax.evaluation.evaluators import figure  # registers 'figure'
from segvit_jax.evaluation.evaluators.registry import Context, Evaluator, register
from segvit_jax.evaluation.evaluators.runner import Entry, from_config, run_due, run_missing
from segvit_jax.evaluation.evaluators.runner import write_final

__all__ = ['Context', 'Entry', 'Evaluator', 'eval_batches', 'figure', 'from_config', 'miou',
           'register', 'registry', 'run_due', 'run_missing', 'write_final']
