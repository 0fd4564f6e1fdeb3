"""PyTorch reference of the official SegViT code, for tests and benchmarks (needs torch).

  model.py        the official modules (mmseg ViT, vit_shrink, ATM heads), the ATM loss, `build`
  inference.py    mmseg's whole / sliding-window inference (`EncoderDecoder.inference`)
  checkpoints.py  official-format .pth fixtures: noisy init, mmcv config text, optimizer state

Not part of the installed `segvit_jax` package: import it with the repository root on sys.path
(pytest's `pythonpath`, or `python -m bench.<name>` from the root). The names below are the ones
tests and benchmarks use, as `import segvit_reference as ref`.
"""

from segvit_reference.checkpoints import config_text
from segvit_reference.checkpoints import expected_keys
from segvit_reference.checkpoints import init_with_noise
from segvit_reference.checkpoints import optimizer_state
from segvit_reference.checkpoints import save_mmcv_checkpoint
from segvit_reference.inference import inference
from segvit_reference.model import atm_loss
from segvit_reference.model import build
from segvit_reference.model import resize_pos_embed
from segvit_reference.model import VisionTransformer

__all__ = ['VisionTransformer', 'atm_loss', 'build', 'config_text', 'expected_keys', 'inference',
           'init_with_noise', 'optimizer_state', 'resize_pos_embed', 'save_mmcv_checkpoint']
