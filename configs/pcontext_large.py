r"""SegViT ViT-L/16 on PASCAL-Context (60 classes as the official config), 480x480, 80k iterations.

The backbone starts from Google's AugReg ViT-L/16 (ImageNet-21k, fine-tuned on ImageNet-1k at
384), as the official config does; without --config.pretrained_backbone it trains from scratch.

  wget https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz
  python -m segvit_jax.main --config=configs/pcontext_large.py --workdir=/tmp/pc_large \
      --config.pretrained_backbone=L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz

For the 59-class protocol: --config.model.num_classes=59 --config.dataset.num_classes=59
--config.dataset.tfds_name=pascal_context/59 --config.dataset.reduce_zero_label=True
"""

from segvit_jax import config as config_lib
from segvit_jax.data.datasets import pascal_context


def get_config():
  config = config_lib.get_base_config()
  pascal_context.recipe(config)
  return config
