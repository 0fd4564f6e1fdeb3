r"""SegViT-Shrunk ViT-L/16 on COCO-Stuff-10K, 512x512, 80k iterations (official ..._tpnatm_coco).

The backbone starts from Google's AugReg ViT-L/16 (ImageNet-21k, fine-tuned on ImageNet-1k at
384), as the official config does; without --config.pretrained_backbone it trains from scratch.

  wget https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz
  python -m segvit_jax.main --config=configs/cocostuff10k_large_shrunk.py \
      --workdir=/tmp/coco_shrunk \
      --config.pretrained_backbone=L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz
"""

from segvit_jax import config as config_lib
from segvit_jax.data.datasets import coco_stuff10k


def get_config():
  config = config_lib.get_base_config()
  coco_stuff10k.recipe(config)
  config_lib.shrunk(config.model)
  return config
