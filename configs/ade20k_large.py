r"""SegViT ViT-L/16 on ADE20K, 640x640, 160k iterations (official segvit_vit-l_jax_640x640_160k_ade20k).

  python -m segvit_jax.main --config=configs/ade20k_large.py --workdir=/tmp/ade20k_large
"""

from segvit_jax import config_base


def get_config():
  return config_base.get_base_config()
