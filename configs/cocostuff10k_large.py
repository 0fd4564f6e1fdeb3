r"""SegViT ViT-L/16 on COCO-Stuff-10K, 512x512, 80k iterations (official ..._80k_cocostuff10k).

  python -m segvit_jax.main --config=configs/cocostuff10k_large.py --workdir=/tmp/coco_large
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.coco_stuff10k(config)
  return config
