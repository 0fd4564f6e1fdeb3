"""Workdirs on a bucket: URLs go through tf.io.gfile (TensorFlow's in-memory ram:// file system
stands in for gs:// here) and are never turned into local paths."""

import json
import os

import numpy as np

from segvit_jax import config as config_lib
from segvit_jax import fileio
from segvit_jax.checkpoint import parameters
from segvit_jax.checkpoint import training_checkpoints


def test_urls_stay_urls():
  assert training_checkpoints.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert fileio.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert fileio.absolute('run') == os.path.join(os.getcwd(), 'run')


def test_trainer_files_on_a_url_file_system():
  from segvit_jax.training import log  # pylint: disable=g-import-not-at-top
  workdir = 'ram://bucket/run'
  fileio.makedirs(workdir)
  writer = log.JsonlFile(os.path.join(workdir, 'metrics.jsonl'))
  writer.write(1, {'train/loss': 2.5})
  writer.write(2, {'train/loss': np.float32('nan')})
  writer.close()
  with fileio.open_file(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line) for line in f] == [{'step': 1, 'train/loss': 2.5},
                                                {'step': 2, 'train/loss': None}]
  assert fileio.listdir(workdir) == ['metrics.jsonl']
  assert not fileio.isdir(os.path.join(workdir, 'checkpoints'))
  assert parameters.training_checkpoint_root(workdir) is None
  for step in ('3', '10'):
    fileio.makedirs(os.path.join(workdir, 'checkpoints', step))
  assert parameters.training_checkpoint_root(workdir) == os.path.join(workdir, 'checkpoints')


def test_local_files_unchanged(tmp_path):
  path = str(tmp_path / 'a.txt')
  with fileio.open_file(path, 'w') as f:
    f.write('é')
  assert open(path, encoding='utf-8').read() == 'é'
  assert fileio.listdir(str(tmp_path / 'missing')) == []


def test_config_json_on_a_url_file_system():
  config = config_lib.get_base_config()
  config.model.img_size = (48, 64)
  fileio.makedirs('ram://bucket/config_run')
  path = 'ram://bucket/config_run/config.json'
  config_lib.write_config(path, config)
  back = config_lib.read_config(path)
  assert back.to_dict() == config.to_dict() and back.model.img_size == (48, 64)
  assert config_lib.load_config(path).to_dict() == config.to_dict()
