"""The checkpoint converter: CLI, config parsing, strictness, error messages, backbone inits.

Numerical parity of converted models lives in test_parity.py; here the checkpoints are tiny
official-layout models from `segvit_reference` (plain: ViT 64x4 + ATMHead d 32, K = 7).
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segvit_jax import config as config_lib
from segvit_jax.convert import checkpoints as convert
from segvit_jax.convert import keymap
from segvit_jax.convert import mmcv_config
from segvit_jax.data.datasets import coco_stuff10k
from segvit_jax.evaluation import predictor
from segvit_jax.errors import UserError
from segvit_jax.models import segvit
from segvit_jax.models import vit as jax_vit
from segvit_jax.models import vit_pretrained
import segvit_reference as ref
import test_zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 7
TINY = dict(embed_dim=64, depth=4, num_heads=4, out_indices=(1, 2, 3), decoder_dim=32,
            decoder_heads=4, num_classes=K, img_size=(64, 64))
TINY_CONFIG_PY = f'''
from segvit_jax import config as config_lib

def get_config():
  config = config_lib.get_base_config()
  config.model.update({TINY!r})
  return config
'''


def run_cli(*args, **env_vars):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', **env_vars)
  return subprocess.run([sys.executable, '-m', 'segvit_jax.convert', *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='session')
def files(tmp_path_factory):
  """A tiny plain model saved as an mmcv checkpoint (meta + optimizer) and as a bare state dict,
  plus a segvit_jax config file describing it."""
  tmp = tmp_path_factory.mktemp('convert')
  torch.manual_seed(0)
  model = ref.init_with_noise(ref.build('plain', num_classes=K), seed=2).eval()
  paths = {'dir': tmp, 'mmcv': tmp / 'segvit.pth', 'bare': tmp / 'bare.pth',
           'config': tmp / 'tiny_config.py'}
  ref.save_mmcv_checkpoint(model, paths['mmcv'], ref.config_text('plain', num_classes=K),
                           classes=[f'c{i}' for i in range(K)],
                           palette=[[10 * i, 0, 255 - i] for i in range(K)])
  ref.save_mmcv_checkpoint(model, paths['bare'], None, bare=True)
  paths['config'].write_text(TINY_CONFIG_PY)
  return model, paths


def leaves(tree):
  return {'/'.join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_nothing_written(dst):
  assert not os.path.exists(dst), f'{dst} was created'
  parent = os.path.dirname(dst)
  partial = [n for n in os.listdir(parent) if n.startswith(os.path.basename(dst) + '.partial')]
  assert not partial, partial


# ------------------------------------------------------------------------------------------------
# The happy paths.


def test_cli_reads_the_architecture_from_meta(files, tmp_path):
  model, paths = files
  dst = paths['dir'] / 'from_meta'
  # The file as hf://Akide/SegViTv1/FILE, from huggingface_hub's cache, offline.
  cache = tmp_path / 'hub'
  cached = test_zoo.fake_hf_cache(cache, 'segvit.pth', paths['mmcv'].read_bytes())
  proc = run_cli('hf://Akide/SegViTv1/segvit.pth', dst, HF_HUB_CACHE=str(cache),
                 HF_HUB_OFFLINE='1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One line for a one-line result: the libraries' INFO logs are off by default.
  assert len(proc.stdout.splitlines()) == 1 and 'segvit, ViT 64x4' in proc.stdout
  assert proc.stdout.startswith(f'Converted hf://Akide/SegViTv1/segvit.pth -> {dst}: ')
  assert proc.stderr == ''
  assert sorted(os.listdir(dst)) == ['config.json', 'config.py', 'meta.json', 'params']

  _, variables, config = predictor.load_checkpoint(str(dst))
  m = config.model
  assert (m.name, m.embed_dim, m.depth, m.num_heads, tuple(m.out_indices)) == (
      'segvit', 64, 4, 4, (1, 2, 3))
  assert (m.decoder_dim, m.decoder_heads, m.decoder_layers, m.use_stages, m.num_classes) == (
      32, 4, 3, 3, K)
  assert tuple(m.img_size) == (64, 64) and m.patch_size == 16 and m.drop_path_rate == 0.3
  assert tuple(config.dataset.mean) == (127.5,) * 3 and config.dataset.num_classes == K
  assert tuple(config.eval.crop_size) == (64, 64) and tuple(config.eval.stride) == (48, 48)
  assert config.loss.no_object_weight == pytest.approx(0.1)
  assert tuple(config.convert.class_names) == tuple(f'c{i}' for i in range(K))
  assert [list(c) for c in config.convert.palette][1] == [10, 0, 254]
  meta = json.loads((dst / 'meta.json').read_text())
  assert meta['source'] == str(cached)
  assert meta['class_names'][3] == 'c3' and meta['palette'][2] == [20, 0, 253]
  assert len(meta['ignored']) == 1 and 'loss_decode.criterion.empty_weight' in meta['ignored'][0]
  # The config.py next to the parameters gives the same config (for --config=DST/config.py).
  assert config_lib.load_config(str(dst / 'config.py')).to_dict() == config.to_dict()

  # Layout spot checks against the official tensors.
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  p = leaves(segvit.unstack_params(variables['params'], m))  # one subtree per official layer
  np.testing.assert_array_equal(p['backbone/patch_embed/kernel'],
                                sd['backbone.patch_embed.projection.weight'].transpose(2, 3, 1, 0))
  in_proj = sd['backbone.layers.2.attn.attn.in_proj_weight']  # rows [q; k; v], 4 heads of 16
  np.testing.assert_array_equal(p['backbone/block_2/attn/key/kernel'],
                                in_proj[64:128].T.reshape(64, 4, 16))
  np.testing.assert_array_equal(p['backbone/block_2/attn/value/bias'],
                                sd['backbone.layers.2.attn.attn.in_proj_bias'][128:].reshape(4, 16))
  np.testing.assert_array_equal(
      p['head/decoder_3/layer_1/cross_attn/query/kernel'],
      sd['decode_head.decoder_3.layers.1.multihead_attn.q.weight'].T.reshape(32, 4, 8))
  np.testing.assert_array_equal(
      p['head/decoder_1/layer_2/cross_attn/out/kernel'],
      sd['decode_head.decoder_1.layers.2.multihead_attn.proj.weight'].T.reshape(4, 8, 32))
  np.testing.assert_array_equal(p['head/proj_norm_2/scale'], sd['decode_head.proj_norm_2.weight'])
  np.testing.assert_array_equal(p['head/queries'], sd['decode_head.q.weight'])
  np.testing.assert_array_equal(p['backbone/pos_embed'], sd['backbone.pos_embed'])
  # Every official tensor but the loss buffer became exactly one parameter: equal element counts.
  used = sum(v.size for k, v in sd.items() if 'empty_weight' not in k)
  assert sum(v.size for v in p.values()) == used


def test_bare_state_dict_with_config_matches_meta_conversion(files):
  model, paths = files
  _, from_meta, _ = convert.load_torch_checkpoint(str(paths['mmcv']))
  dst = paths['dir'] / 'from_bare'
  message = convert.convert_to_dir(str(paths['bare']), str(dst), str(paths['config']))
  assert 'config from the given config' in message
  _, variables, config = predictor.load_checkpoint(str(dst))
  assert config.model.num_classes == K and tuple(config.convert.class_names) == ()
  a, b = leaves(from_meta['params']), leaves(variables['params'])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_parsing_of_official_style_texts(tmp_path):
  shrunk = mmcv_config.to_config(mmcv_config.parse(
      ref.config_text('shrunk', out_indices=(1, 3), shrink_idx=2, num_classes=K)))
  m = shrunk.model
  assert (m.name, m.shrink_index, tuple(m.out_indices), m.use_stages) == (
      'segvit_shrunk', 2, (1, 3), 2)

  # The official ViT-L COCO config as written in the repository (variables, `//`, inheritance
  # already merged as mmcv stores it), plus a line that must never be executed.
  marker = tmp_path / 'executed'
  text = f'''
in_channels = 1024
img_size = 512
out_indices = [7, 15, 23]
dataset_type = 'COCOStuffDataset'
evil = __import__('os').system('touch {marker}')
model = dict(
    type='EncoderDecoder',
    backbone=dict(type='VisionTransformer', img_size=(img_size, img_size), patch_size=16,
                  embed_dims=1024, num_layers=24, num_heads=16, drop_path_rate=0.3,
                  out_indices=out_indices, final_norm=False, with_cls_token=False,
                  norm_cfg=dict(type='LN', eps=1e-06, requires_grad=True),
                  interpolate_mode='bicubic'),
    decode_head=dict(type='ATMHead', img_size=img_size, in_channels=in_channels,
                     channels=in_channels, num_classes=171, num_layers=3, num_heads=16,
                     use_stages=len(out_indices), embed_dims=in_channels // 2,
                     loss_decode=dict(type='ATMLoss', num_classes=171, dec_layers=3)),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
img_norm_cfg = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], to_rgb=True)
optimizer = dict(type='AdamW', lr=2e-05, betas=(0.9, 0.999), weight_decay=0.02,
                 paramwise_cfg=dict(custom_keys={{'norm': dict(decay_mult=0.0),
                                                 'head': dict(lr_mult=10.0)}}))
lr_config = dict(policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-06,
                 power=2.0, min_lr=0.0, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=80000)
gpu_ids = range(0, 4)
'''
  parsed = mmcv_config.parse(text)
  assert 'evil' not in parsed and 'gpu_ids' not in parsed and not marker.exists()
  config = mmcv_config.to_config(parsed)
  expected = config_lib.get_base_config()
  coco_stuff10k.recipe(expected)
  for key in ('name', 'embed_dim', 'depth', 'num_heads', 'decoder_dim', 'decoder_heads',
              'num_classes', 'use_stages', 'decoder_layers', 'patch_size'):
    assert config.model[key] == expected.model[key], key
  assert tuple(config.model.out_indices) == (7, 15, 23)
  assert tuple(config.model.img_size) == (512, 512) and config.dataset.name == 'coco_stuff10k'
  assert config.optim.poly_power == 2.0 and config.optim.weight_decay == 0.02
  assert config.num_train_steps == 80000 and tuple(config.eval.stride) == (341, 341)

  with pytest.raises(UserError, match='with_cls_token'):
    mmcv_config.to_config(mmcv_config.parse(text.replace(
        'with_cls_token=False', 'with_cls_token=True')))


# ------------------------------------------------------------------------------------------------
# Errors: clear message, nothing written.


def one_error_line(proc):
  """The `error: ...` line of a failed CLI run, checked to be all it printed."""
  assert proc.returncode == 1, (proc.stdout, proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  assert not proc.stdout
  return lines[0]


def test_cli_errors_are_one_line_and_write_nothing(files):
  _, paths = files
  data = paths['mmcv'].read_bytes()
  truncated = paths['dir'] / 'truncated.pth'
  truncated.write_bytes(data[:len(data) // 2])
  dst = paths['dir'] / 'out_truncated'
  line = one_error_line(run_cli(truncated, dst))
  assert 'truncated.pth' in line and 'is the file truncated?' in line
  assert_nothing_written(str(dst))
  # A wrong model config: every contradiction in the one line.
  dst = paths['dir'] / 'out_wrong_config'
  line = one_error_line(run_cli(paths['mmcv'], dst, f'--config={REPO}/configs/ade20k_base.py'))
  assert 'does not match' in line
  assert 'model.num_classes is 150' in line and '(7, 32)' in line
  assert 'model.embed_dim is 768' in line and '(64, 3, 16, 16)' in line
  assert 'model.depth is 12 but the checkpoint has 4 blocks' in line
  assert 'needs a 32x32 position grid' in line and 'img_size 64' in line
  assert_nothing_written(str(dst))
  line = one_error_line(run_cli(paths['mmcv']))
  assert 'expected SRC.pth DST_DIR' in line


def _write_bad_files(tmp):
  """name -> path of files that are not PyTorch checkpoints, each in its own way."""
  rng = np.random.default_rng(0)
  (tmp / 'random.pth').write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  (tmp / 'a_directory.pth').mkdir()
  (tmp / 'not_a_zip.zip').write_text('just some text, not an archive\n')
  with zipfile.ZipFile(tmp / 'photos.zip', 'w') as archive:
    archive.writestr('img/0001.jpg', b'\xff\xd8\xff')
  np.savez(tmp / 'weights.npz', kernel=np.zeros((2, 2)))
  with open(tmp / 'plain_pickle.pth', 'wb') as f:
    pickle.dump({'state_dict': {'w': [1.0, 2.0]}}, f, protocol=4)
  (tmp / 'empty.pth').write_bytes(b'')
  return {p.name: p for p in tmp.iterdir()}


@pytest.mark.parametrize('name, says', [
    ('random.pth', 'is not a PyTorch checkpoint: neither a torch.save zip archive nor a pickle'),
    ('a_directory.pth', 'is a directory, not a checkpoint file'),
    ('not_a_zip.zip', 'is not a PyTorch checkpoint: neither a torch.save zip archive'),
    ('photos.zip', "is a zip archive but not a torch.save file (no data.pkl in it; first entries "
                   "['img/0001.jpg'])"),
    ('weights.npz', 'is a numpy .npz archive, not a PyTorch checkpoint'),
    ('plain_pickle.pth', 'is a Python pickle but not a torch.save file'),
    ('empty.pth', 'is empty (0 bytes)'),
    ('missing.pth', 'no such file'),
])
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path, name, says):
  path = _write_bad_files(tmp_path).get(name, tmp_path / name)
  dst = tmp_path / 'out'
  with pytest.raises(UserError) as info:
    convert.convert_to_dir(str(path), str(dst))
  message = str(info.value)
  assert says in message and '\n' not in message
  assert 'official mmseg .pth' in message or name == 'missing.pth'
  for misleading in ('legacy', 'allow_pickle', 'tar archive'):
    assert misleading not in message
  assert_nothing_written(str(dst))


def test_random_file_through_the_cli(tmp_path):
  path = _write_bad_files(tmp_path)['random.pth']
  line = one_error_line(run_cli(path, tmp_path / 'out'))
  assert 'random.pth (4096 bytes, starting' in line and 'is not a PyTorch checkpoint' in line


def test_bare_state_dict_needs_a_config(files):
  _, paths = files
  dst = str(paths['dir'] / 'out_bare')
  with pytest.raises(UserError, match=r"no meta\['config'\].*--config"):
    convert.convert_to_dir(str(paths['bare']), dst)
  assert_nothing_written(dst)


def test_checkpoint_of_another_model(files):
  _, paths = files
  other = torch.nn.ModuleDict({'backbone': torch.nn.ModuleDict({
      'conv1': torch.nn.Conv2d(3, 8, 3), 'bn1': torch.nn.BatchNorm2d(8)}),
      'decode_head': torch.nn.ModuleDict({'conv_seg': torch.nn.Conv2d(8, 5, 1)})})
  text = ("model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c', depth=50),\n"
          "             decode_head=dict(type='UPerHead', num_classes=5))\n")
  src = paths['dir'] / 'uper.pth'
  torch.save({'meta': {'config': text}, 'state_dict': other.state_dict()}, src)
  dst = str(paths['dir'] / 'out_other')
  with pytest.raises(UserError, match='ResNetV1c \\+ UPerHead.*SegViT only'):
    convert.convert_to_dir(str(src), dst)
  # Without its config (an explicit segvit_jax config instead) the tensors give it away.
  with pytest.raises(UserError,
                     match='not a SegViT checkpoint.*decode_head.conv_seg.weight'):
    convert.convert_to_dir(str(src), dst, str(paths['config']))
  assert_nothing_written(dst)


def test_missing_unexpected_and_misshaped_keys_in_one_error(files):
  model, paths = files
  sd = dict(model.state_dict())
  del sd['decode_head.class_embed.bias']
  del sd['backbone.layers.2.attn.attn.in_proj_weight']
  sd['decode_head.extra.weight'] = torch.zeros(3, 2)
  sd['backbone.ln1.weight'] = torch.zeros(64)  # a final norm the model does not have
  sd['decode_head.decoder_2.layers.0.linear1.weight'] = torch.zeros(100, 32)
  src = paths['dir'] / 'broken.pth'
  torch.save({'meta': {'config': ref.config_text('plain', num_classes=K)}, 'state_dict': sd}, src)
  dst = str(paths['dir'] / 'out_broken')
  with pytest.raises(UserError) as info:
    convert.convert_to_dir(str(src), dst)
  msg = str(info.value)
  assert '2 missing' in msg and '2 unexpected' in msg and '1 wrong shape' in msg
  assert 'decode_head.class_embed.bias (8,) -> head/class_embed/bias' in msg
  assert 'backbone.layers.2.attn.attn.in_proj_weight (192, 64)' in msg
  assert 'decode_head.extra.weight (3, 2)' in msg and 'backbone.ln1.weight (64,)' in msg
  assert ('decode_head.decoder_2.layers.0.linear1.weight: checkpoint (100, 32), model expects '
          '(128, 32)') in msg
  assert_nothing_written(dst)


def test_pickled_objects_need_allow_pickle(files):
  model, paths = files
  src = paths['dir'] / 'numpy_meta.pth'
  torch.save({'meta': {'config': ref.config_text('plain', num_classes=K),
                       'PALETTE': np.arange(3 * K).reshape(K, 3)},
              'state_dict': model.state_dict()}, src)
  dst = paths['dir'] / 'out_numpy_meta'
  with pytest.raises(UserError, match='--allow_pickle'):
    convert.convert_to_dir(str(src), str(dst))
  assert_nothing_written(str(dst))
  convert.convert_to_dir(str(src), str(dst), allow_pickle=True)
  assert json.loads((dst / 'meta.json').read_text())['palette'][1] == [3, 4, 5]


def test_existing_destination_is_left_alone(files):
  _, paths = files
  dst = paths['dir'] / 'occupied'
  dst.mkdir()
  (dst / 'keep.txt').write_text('mine')
  with pytest.raises(UserError, match='already exists'):
    convert.convert_to_dir(str(paths['mmcv']), str(dst))
  assert os.listdir(dst) == ['keep.txt']


# ------------------------------------------------------------------------------------------------
# Pretrained backbones for training.


def backbone_setup(grid=3):
  """A reference ViT stored at a `grid`x`grid` position grid, and the boxed params of a JAX
  model at 64x64 (4x4 grid) filled with 0.5, as the train state would hold them."""
  torch.manual_seed(3)
  vit = ref.init_with_noise(ref.VisionTransformer((16 * grid,) * 2, 16, 64, 4, 4, 4, (1, 2, 3)))
  config = config_lib.get_base_config()
  config.model.update(TINY)
  model = segvit.build_model(config.model)
  boxed = segvit.abstract_params(model)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), boxed)
  return vit, config, params


def expected_backbone(vit):
  """What mmseg's init_weights gives: the official keys, position grid resized by torch bicubic."""
  sd = {'backbone.' + k: v for k, v in vit.state_dict().items()}
  sd['backbone.pos_embed'] = ref.resize_pos_embed(sd['backbone.pos_embed'], (4, 4), (3, 3))
  config = config_lib.get_base_config()
  config.model.update(TINY)
  abstract = nn.unbox(segvit.abstract_params(segvit.build_model(config.model)))
  # The key table names one 'block_{i}' per block; the model stacks them.
  params, report = keymap.map_state_dict(
      sd, {'backbone': jax_vit.unstack_blocks(abstract['backbone'], config.model)},
      keymap.vit_rules())
  assert report.error() is None, report.error()
  return leaves(jax_vit.stack_blocks(params['backbone'], config.model))


def check_loaded(loaded, vit):
  want = expected_backbone(vit)
  assert isinstance(loaded['head']['class_embed']['kernel'], nn.Partitioned)
  head = leaves(nn.unbox(loaded['head']))
  assert all(np.all(v == 0.5) for v in head.values()), 'the head must keep its initialisation'
  got = leaves(nn.unbox(loaded['backbone']))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)
  assert not np.allclose(got['pos_embed'][0, 1:5], np.asarray(vit.pos_embed[0, 1:5].detach()))


def test_augreg_npz_backbone_with_position_grid_resize(tmp_path, caplog):
  vit, config, params = backbone_setup()
  sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
  d, heads = 64, 4
  npz = {'embedding/kernel': sd['patch_embed.projection.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.projection.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': np.ones(d), 'Transformer/encoder_norm/bias': np.zeros(d),
         'head/kernel': np.zeros((d, 10)), 'head/bias': np.zeros(10)}
  for i in range(4):
    blk, pre = f'Transformer/encoderblock_{i}/', f'layers.{i}.'
    att = blk + 'MultiHeadDotProductAttention_1/'
    w, b = sd[pre + 'attn.attn.in_proj_weight'], sd[pre + 'attn.attn.in_proj_bias']
    for j, name in enumerate(('query', 'key', 'value')):
      npz[att + name + '/kernel'] = w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
      npz[att + name + '/bias'] = b[j * d:(j + 1) * d].reshape(heads, d // heads)
    npz[att + 'out/kernel'] = sd[pre + 'attn.attn.out_proj.weight'].T.reshape(heads, d // heads, d)
    npz[att + 'out/bias'] = sd[pre + 'attn.attn.out_proj.bias']
    for src, dst in (('ln1', 'LayerNorm_0'), ('ln2', 'LayerNorm_2')):
      npz[f'{blk}{dst}/scale'], npz[f'{blk}{dst}/bias'] = sd[pre + src + '.weight'], sd[
          pre + src + '.bias']
    for src, dst in (('ffn.layers.0.0', 'Dense_0'), ('ffn.layers.1', 'Dense_1')):
      npz[f'{blk}MlpBlock_3/{dst}/kernel'] = sd[f'{pre}{src}.weight'].T
      npz[f'{blk}MlpBlock_3/{dst}/bias'] = sd[f'{pre}{src}.bias']
  path = tmp_path / 'L_16-i21k-tiny.npz'
  np.savez(path, **npz)
  caplog.set_level('INFO')
  check_loaded(vit_pretrained.load(params, str(path), config.model), vit)
  table = caplog.text
  assert 'loaded         68 tensors' in table and '(head, fresh)' in table
  assert 'ignored         4 tensors' in table
  assert 'head/kernel (64, 10): ImageNet classifier' in table


def test_mmseg_vit_pth_backbone_with_position_grid_resize(tmp_path):
  vit, config, params = backbone_setup()
  sd = dict(vit.state_dict())
  sd['ln1.weight'], sd['ln1.bias'] = torch.ones(64), torch.zeros(64)  # the ignored final norm
  path = tmp_path / 'vit_tiny_p16_384.pth'
  torch.save(sd, path)
  check_loaded(vit_pretrained.load(params, str(path), config.model), vit)


def test_pretrained_backbone_of_the_wrong_size(tmp_path):
  _, config, params = backbone_setup()
  small = ref.VisionTransformer((48, 48), 16, 32, 4, 4, 4, (1, 2, 3))
  path = tmp_path / 'vit_small.pth'
  torch.save(small.state_dict(), path)
  with pytest.raises(UserError,
                     match=r'(?s)embed_dim 64.*patch_embed.projection.weight: checkpoint '
                           r'\(32, 3, 16, 16\), model expects \(64, 3, 16, 16\)'):
    vit_pretrained.load(params, str(path), config.model)
  with pytest.raises(UserError, match='AugReg .npz or an mmseg'):
    vit_pretrained.load(params, str(tmp_path / 'weights.safetensors'), config.model)


def test_resize_matches_torch_bicubic():
  table = torch.randn(1, 1 + 24 * 24, 8)
  want = ref.resize_pos_embed(table, (40, 30), (24, 24)).numpy()
  got = vit_pretrained.resize_pos_embed(table.numpy(), (40, 30))
  # PyTorch-compatible bicubic (a = -0.75, clamped borders) up to float32 rounding.
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
  np.testing.assert_array_equal(got[:, 0], want[:, 0])  # the cls slot is kept as is
