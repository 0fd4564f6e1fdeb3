"""Official-format checkpoints of small reference models: the fixtures of the converter and parity
tests and of the conversion benchmark.

    model = checkpoints.init_with_noise(model.build('plain'))
    checkpoints.save_mmcv_checkpoint(model, 'x.pth', checkpoints.config_text('plain'))

What a released SegViT `.pth` holds, written by mmcv's `save_checkpoint`: `meta` (the merged
config's `pretty_text`, CLASSES, PALETTE, versions), `state_dict` and the AdamW `optimizer` state.
"""

import collections
import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn


def init_with_noise(model: nn.Module, seed: int = 0, qk_gain: float = 2.0,
                    class_gain: float = 4.0, branch_gain: float = 0.1,
                    bias_std: float = 0.02) -> nn.Module:
  """Official-style init, then noise on every tensor, scaled so the outputs carry signal.

  Linear/conv weights ~ N(0, 1/fan_in) (PyTorch-default magnitude rather than the official
  trunc-normal 0.02, which would make every decoder logit ~0), biases and LayerNorm offsets
  ~ N(0, 0.1), LayerNorm scales 1 + N(0, 0.2), queries N(0, 1), position table N(0, 0.5).
  The ATM cross-attention q/k weights get `qk_gain` so the mask logits are of order 1, and the
  class projection `class_gain` so each query is confident about a class: the scores then follow
  the masks and several classes win somewhere in each image. The decoder's residual branches
  (attention output projections, second FFN linear) get `branch_gain` < 1: otherwise the common
  part of the attention averages washes out the queries' identity over the 9 post-norm layers and
  every query ends up predicting the same class.
  """
  gen = torch.Generator().manual_seed(seed)
  normal = lambda shape, std: torch.randn(shape, generator=gen) * std
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      if p.ndim >= 2 and leaf not in ('pos_embed', 'cls_token'):
        fan_in = p[0].numel()
        std = 1.0 / math.sqrt(fan_in)
        if name.endswith('multihead_attn.q.weight') or name.endswith('multihead_attn.k.weight'):
          std *= qk_gain
        if name.startswith('decode_head') and name.endswith(
            ('out_proj.weight', 'multihead_attn.proj.weight', 'linear2.weight')):
          std *= branch_gain
        if name.endswith('class_embed.weight'):
          std *= class_gain
        if name.endswith('decode_head.q.weight') or name.endswith('atm.q.weight'):
          std = 1.0  # nn.Embedding default
        p.copy_(normal(p.shape, std))
      elif leaf == 'pos_embed':
        p.copy_(normal(p.shape, 0.5))
      elif leaf == 'cls_token':
        p.copy_(normal(p.shape, 0.02))
      elif leaf == 'weight':  # LayerNorm scale
        p.copy_(1.0 + normal(p.shape, 0.2))
      else:  # biases and LayerNorm offsets
        p.copy_(normal(p.shape, bias_std if name.startswith('decode_head') else 0.1))
  return model


PRETRAINED = ('https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segmenter/'
              'vit_large_p16_384_20220308-d4efb41d.pth')


def config_text(kind='plain', img_size=64, embed_dims=64, num_layers=4, num_heads=4,
                out_indices=(1, 2, 3), decoder_dims=32, decoder_heads=4, decoder_layers=3,
                num_classes=7, shrink_idx=2, mlp_ratio=4, mean=(127.5,) * 3,
                std=(127.5,) * 3, **unused) -> str:
  """An mmcv `Config.pretty_text`-like dump of the merged config, as stored in `meta['config']`."""
  del unused
  shrunk = kind == 'shrunk'
  backbone_type = 'vit_shrink' if shrunk else 'VisionTransformer'
  shrink = f"\n        shrink_idx={shrink_idx}," if shrunk else ''
  head_type = 'TPNATMHead' if shrunk else 'ATMHead'
  out_list = '[' + ', '.join(str(i) for i in out_indices) + ']'
  return f"""checkpoint = '{PRETRAINED}'
backbone_norm_cfg = dict(type='LN', eps=1e-06, requires_grad=True)
img_size = {img_size}
in_channels = {embed_dims}
out_indices = {out_list}
model = dict(
    type='EncoderDecoder',
    pretrained=
    '{PRETRAINED}',
    backbone=dict(
        type='{backbone_type}',
        img_size=({img_size}, {img_size}),
        patch_size=16,
        in_channels=3,
        embed_dims={embed_dims},
        num_layers={num_layers},
        num_heads={num_heads},
        mlp_ratio={mlp_ratio},{shrink}
        drop_path_rate=0.3,
        attn_drop_rate=0.0,
        drop_rate=0.0,
        out_indices={out_list},
        final_norm=False,
        norm_cfg=dict(type='LN', eps=1e-06, requires_grad=True),
        with_cls_token=False,
        interpolate_mode='bicubic'),
    decode_head=dict(
        type='{head_type}',
        img_size={img_size},
        in_channels={embed_dims},
        channels={embed_dims},
        num_classes={num_classes},
        num_layers={decoder_layers},
        num_heads={decoder_heads},
        use_stages={len(out_indices)},
        embed_dims={decoder_dims},
        loss_decode=dict(
            type='ATMLoss',
            num_classes={num_classes},
            dec_layers={decoder_layers},
            loss_weight=1.0)),
    test_cfg=dict(mode='slide', crop_size=({img_size}, {img_size}), stride=(48, 48)),
    train_cfg=dict())
find_unused_parameters = True
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
img_norm_cfg = dict(
    mean={list(mean)}, std={list(std)}, to_rgb=True)
crop_size = ({img_size}, {img_size})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='Resize', img_scale=(2048, 640), ratio_range=(0.5, 2.0)),
    dict(type='RandomCrop', crop_size=({img_size}, {img_size}), cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(
        type='Normalize',
        mean={list(mean)},
        std={list(std)},
        to_rgb=True),
    dict(type='Pad', size=({img_size}, {img_size}), pad_val=0, seg_pad_val=255),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_semantic_seg'])
]
optimizer = dict(
    type='AdamW',
    lr=2e-05,
    betas=(0.9, 0.999),
    weight_decay=0.01,
    paramwise_cfg=dict(
        custom_keys=dict(
            norm=dict(decay_mult=0.0),
            ln=dict(decay_mult=0.0),
            head=dict(lr_mult=10.0))))
optimizer_config = dict(grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(
    policy='poly',
    warmup='linear',
    warmup_iters=1500,
    warmup_ratio=1e-06,
    power=1.0,
    min_lr=0.0,
    by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=160000)
checkpoint_config = dict(by_epoch=False, interval=16000)
evaluation = dict(interval=4000, metric='mIoU', pre_eval=True)
work_dir = './work_dirs/segvit'
gpu_ids = range(0, 4)
auto_resume = False
"""


def optimizer_state(model: nn.Module, step: int = 10) -> dict:
  """An AdamW `state_dict()` as mmcv stores it (exp_avg, exp_avg_sq per parameter)."""
  params = [p for p in model.parameters()]
  opt = torch.optim.AdamW(params, lr=2e-5)
  for p in params:
    opt.state[p] = {'step': torch.tensor(float(step)), 'exp_avg': torch.randn_like(p) * 1e-3,
                    'exp_avg_sq': torch.rand_like(p) * 1e-6}
  return opt.state_dict()


def save_mmcv_checkpoint(model: nn.Module, path, text: Optional[str], classes=None, palette=None,
                         with_optimizer=True, bare=False):
  """Writes an mmcv-style checkpoint: {'meta', 'state_dict', 'optimizer'} (or a bare state dict)."""
  state = collections.OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
  if bare:
    torch.save(state, path)
    return
  meta = {'mmseg_version': '0.24.0+', 'mmcv_version': '1.4.4', 'seed': 0, 'iter': 160000,
          'epoch': 1, 'exp_name': 'segvit_test.py', 'time': 'Thu Jan  1 00:00:00 2022',
          'env_info': 'sys.platform: linux\nPython: 3.7', 'hook_msgs': {'last_ckpt': 'x.pth'}}
  if text is not None:
    meta['config'] = text
  if classes is not None:
    meta['CLASSES'] = tuple(classes)
  if palette is not None:
    meta['PALETTE'] = [list(c) for c in palette]
  ckpt = {'meta': meta, 'state_dict': state}
  if with_optimizer:
    ckpt['optimizer'] = optimizer_state(model)
  torch.save(ckpt, path)


def expected_keys(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}
