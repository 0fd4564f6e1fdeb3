r"""SegViT ViT-B/16 on ADE20K, 512x512, 160k iterations (reconstructed: reference section 12.2).

  python -m segvit_jax.main --config=configs/ade20k_base.py --workdir=/tmp/ade20k_base
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.vit_base(config.model)
  config.model.img_size = (512, 512)
  config.dataset.crop_size = (512, 512)
  config.dataset.img_scale = (2048, 512)
  config.dataset.test_img_scale = (2048, 512)
  config.eval.crop_size = (512, 512)
  config.eval.stride = (341, 341)
  return config
