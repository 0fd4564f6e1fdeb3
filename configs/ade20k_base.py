r"""SegViT ViT-B/16 on ADE20K, 512x512, 160k iterations: no config file in the official release;
built from its ViT-B model file (seg_vit-b16.py), ADE20K at 512 and the ViT-L recipe's schedule.

The backbone starts from Google's AugReg ViT-B/16 (ImageNet-21k, fine-tuned on ImageNet-1k at
384), as the official ViT-B model file does; without --config.pretrained_backbone it trains from
scratch.

  wget https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz
  python -m segvit_jax.main --config=configs/ade20k_base.py --workdir=/tmp/ade20k_base \
      --config.pretrained_backbone=B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz
"""

from segvit_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config_lib.vit_base(config.model)
  config.model.img_size = (512, 512)
  config.dataset.crop_size = (512, 512)
  config.dataset.img_scale = (2048, 512)
  config.dataset.test_img_scale = (2048, 512)
  config.eval.crop_size = (512, 512)
  config.eval.stride = (341, 341)
  return config
