r"""SegViT-Shrunk ViT-L/16 on ADE20K, 640x640, 160k iterations (official shrink8_tpnatm).

  python -m segvit_jax.main --config=configs/ade20k_large_shrunk.py --workdir=/tmp/ade20k_shrunk
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.shrunk(config.model)
  return config
