r"""SegViT-Shrunk ViT-L/16 on PASCAL-Context (60 classes), 480x480, 80k iterations, batch 16.

  python -m segvit_jax.main --config=configs/pcontext_large_shrunk.py --workdir=/tmp/pc_shrunk
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.pascal_context(config)
  config_base.shrunk(config.model)
  return config
