r"""Parameter counts and GFLOPs of a SegViT config, in the paper's convention.

    python -m segvit_jax.aot.summary --config=configs/ade20k_large.py
    python -m segvit_jax.aot.summary --config=configs/ade20k_large_shrunk.py --json
    python -m segvit_jax.aot.summary --config=configs/ade20k_large.py --image_size=512,768

Parameters come from the real model (`jax.eval_shape` of `init`: nothing is materialised).

GFLOPs are an analytic count of the official PyTorch model as fvcore's `FlopCountAnalysis` sees it
(the paper's numbers come from `tools/get_flops_fvcore.py`), batch 1, by default at the config's
crop size `config.model.img_size`. fvcore's conventions (official `tools/get_flops_fvcore.py`):
- linear, matmul, bmm, einsum and convolution: one multiply-add = one FLOP;
- LayerNorm with affine parameters: 5 per input element;
- bilinear upsampling: 4 per OUTPUT element, also when input and output sizes are equal
  (`F.interpolate` is traced either way; the ATM heads interpolate every mask to the last map
  size, and mmseg's `resize` to the crop size runs even when the sizes already agree);
- not counted: softmax, GELU, ReLU, sigmoid, additions, scaling, the bicubic position-embedding
  resize (fvcore has no handler for `upsample_bicubic2d`).

Every count below is therefore split into three kinds: 'matmul' (multiply-adds of linear layers,
attention products, the einsum and the patch-embedding convolution), 'norm' (LayerNorms) and
'upsample' (bilinear interpolations). `tests/test_summary.py` checks the 'matmul' part against the
dot/conv multiply-adds in the jaxpr of our model's eval forward pass.
"""

import json
from typing import Any, Dict, Optional, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import ml_collections
from ml_collections import config_flags

from segvit_jax.aot import flops


def param_counts(model_config: ml_collections.ConfigDict) -> Dict[str, int]:
  """{'backbone', 'head', 'total'} parameter counts, from shapes only (`jax.eval_shape`)."""
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  params = nn.unbox(segvit.abstract_params(segvit.build_model(model_config)))
  backbone, head = segvit.param_counts(params)
  return {'backbone': backbone, 'head': head, 'total': backbone + head}


def summarize(config: ml_collections.ConfigDict,
              image_hw: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """Everything the CLI prints, as one JSON-ready dict."""
  c = config.model
  image_hw = tuple(c.img_size) if image_hw is None else tuple(image_hw)
  breakdown = flops.model_flops(c, image_hw)
  return {
      'model': c.name,
      'image_size': list(image_hw),
      'num_classes': c.num_classes,
      'params': param_counts(c),
      'gflops': flops.total_flops(breakdown) / 1e9,
      'gflops_by_kind': {k: flops.total_flops(breakdown, (k,)) / 1e9 for k in flops.KINDS},
      'gflops_by_module': {name: sum(v.values()) / 1e9 for name, v in breakdown.items()},
  }


def _define_flags():
  # Defined when run as a program only, so that importing this module next to other CLIs
  # (predict, convert) in one process does not redefine --config.
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
  flags.DEFINE_list(
      'image_size', None, 'Input H,W for the FLOP count; default config.model.img_size. The head '
      'still works at img_size internally (masks, semantic inference). The official code needs a '
      'square token grid; the count at other shapes is that of this port.')
  return config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                         lock_config=True)


def main(argv):
  del argv
  config = flags.FLAGS['config'].value
  image_size = flags.FLAGS['image_size'].value
  if config is None:
    raise app.UsageError('Pass --config=configs/<name>.py.')
  image_hw = None
  if image_size is not None:
    if len(image_size) != 2:
      raise app.UsageError(f'--image_size wants H,W; got {",".join(image_size)!r}.')
    image_hw = tuple(int(v) for v in image_size)
  result = summarize(config, image_hw)
  result['config'] = flags.FLAGS['config'].config_filename
  if flags.FLAGS['json'].value:
    print(json.dumps(result, sort_keys=True))
    return
  p = result['params']
  h, w = result['image_size']
  print(f"{result['config']}: {result['model']}, K={result['num_classes']}, input {h}x{w}")
  print(f"  params   backbone {p['backbone'] / 1e6:9.2f}M  head {p['head'] / 1e6:7.2f}M  "
        f"total {p['total'] / 1e6:9.2f}M")
  print(f"  GFLOPs   {result['gflops']:.2f} (fvcore convention: 1 multiply-add = 1 FLOP)")
  for name, value in result['gflops_by_module'].items():
    print(f'    {name:28s} {value:10.3f}')
  for kind, value in result['gflops_by_kind'].items():
    print(f'    [{kind}] {value:.3f}')


def run():
  """The `segvit-summary` console script."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
