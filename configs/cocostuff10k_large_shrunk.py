r"""SegViT-Shrunk ViT-L/16 on COCO-Stuff-10K, 512x512, 80k iterations (official ..._tpnatm_coco).

  python -m segvit_jax.main --config=configs/cocostuff10k_large_shrunk.py --workdir=/tmp/coco_shrunk
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.coco_stuff10k(config)
  config_base.shrunk(config.model)
  return config
