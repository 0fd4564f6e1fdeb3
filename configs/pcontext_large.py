r"""SegViT ViT-L/16 on PASCAL-Context (60 classes as the official config), 480x480, 80k iterations.

  python -m segvit_jax.main --config=configs/pcontext_large.py --workdir=/tmp/pc_large

For the 59-class protocol: --config.model.num_classes=59 --config.dataset.num_classes=59
--config.dataset.tfds_name=pascal_context/59 --config.dataset.reduce_zero_label=True
"""

from segvit_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config_base.pascal_context(config)
  return config
