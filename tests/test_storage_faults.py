"""Storage faults, produced for real: damaged checkpoint files, a full disk, an OS file size limit.

Damaged steps are copies of the shared uninterrupted run (`reference` in conftest.py) with files
truncated, deleted, flipped or mixed up; training resumes from the step before, and predict and
--mode=eval name the damage and the step that loads. The full disk is a 12 MB tmpfs mounted here
where the machine allows it (root), else an OS limit on file sizes (RLIMIT_FSIZE, in the child
process of the run): the run stops with one line, the rerun continues from the last complete
checkpoint, and its losses equal the uninterrupted run's.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from segvit_jax import fileio
from segvit_jax.checkpoint import integrity
from segvit_jax.checkpoint import parameters
from segvit_jax.checkpoint import training_checkpoints
from segvit_jax.evaluation import predictor
from segvit_jax.training import build
from segvit_jax.training import eval_mode
from segvit_jax.training import loop
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

ROOT = tiny_runs.ROOT
ONE_DEVICE = jax.devices()[:1]
TERMS = ('train/loss', 'train/loss_ce', 'train/loss_mask', 'train/loss_dice')


def _train(workdir, **overrides):
  return loop.train_and_evaluate(tiny_runs.tiny_config(**overrides), str(workdir),
                                 devices=ONE_DEVICE)


def _copy(reference, tmp_path):
  """A copy of the reference workdir: checkpoints 3 and 6; (workdir, its checkpoints folder)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  return workdir, os.path.join(workdir, 'checkpoints')


def _truncate(path, size=100):
  with open(path, 'r+b') as f:
    f.truncate(size)


def _flip(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def _assert_resumed_exactly(workdir, reference, steps=(4, 5, 6)):
  ref, resumed = tiny_runs.losses(reference[0]), tiny_runs.losses(workdir)
  for step in steps:
    for key in TERMS:
      assert resumed[step][key] == ref[step][key], (step, key)


def _console_lines(out, start):
  return [line.split(' ', 1)[1] for line in out.splitlines() if ' ' in line and
          line.split(' ', 1)[1].startswith(start)]


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def test_a_truncated_newest_step_is_set_aside_and_training_continues_before_it(
    reference, tmp_path, capfd):
  workdir, ckdir = _copy(reference, tmp_path)
  _truncate(os.path.join(ckdir, '6', 'default', '_sharding'))
  capfd.readouterr()
  _train(workdir)
  out = capfd.readouterr().out
  assert _console_lines(out, 'Warning: checkpoint') == [
      f'Warning: checkpoint step 6 cannot be read ({ckdir}/6/default/_sharding: Invalid JSON); '
      f'continuing from step 3; step 6 is kept as {ckdir}/6.damaged.']
  assert _console_lines(out, 'Resuming') == [f'Resuming from {ckdir}, step 3.']
  _assert_resumed_exactly(workdir, reference)
  # Kept as it was, and neither read again nor counted among the checkpoints to keep.
  assert sorted(os.listdir(ckdir)) == ['3', '6', '6.damaged']
  assert os.path.getsize(os.path.join(ckdir, '6.damaged', 'default', '_sharding')) == 100
  assert training_checkpoints.Checkpointer(ckdir, read_only=True).all_steps() == [3, 6]


def _damages(ckdir):
  """(what, damage it, the file the message names, its reason: a regex) of step 6."""
  item = os.path.join(ckdir, '6', 'default')

  def mix_up():  # a copy between buckets that mixed two steps: every file reads fine
    shutil.rmtree(item)
    shutil.copytree(os.path.join(ckdir, '3', 'default'), item)

  return [
      ('truncated', lambda: _truncate(os.path.join(item, '_sharding')),
       f'{item}/_sharding', 'Invalid JSON'),
      ('deleted', lambda: os.remove(os.path.join(item, 'manifest.ocdbt')), item, '.+'),
      ('flipped metadata', lambda: _flip(os.path.join(item, '_METADATA'), 0),
       f'{item}/_METADATA', r'not valid JSON: Expecting value, byte 0'),
      ('mixed up', mix_up, item,
       r'the bytes of params/backbone/\S+, .* differ from the checksums saved with them'),
  ]


def test_loading_a_damaged_step_names_it_and_the_step_that_loads(reference, tmp_path):
  """What predict and --mode=eval read (the params of a workdir), for each kind of damage."""
  workdir, ckdir = _copy(reference, tmp_path)
  config = tiny_runs.tiny_config()
  abstract = nn.unbox(segvit.abstract_params(segvit.build_model(config.model)))
  good = os.path.join(str(tmp_path), 'good_6')
  shutil.copytree(os.path.join(ckdir, '6'), good)
  for what, damage, path, reason in _damages(ckdir):
    damage()
    with pytest.raises(UserError) as info:
      parameters.load_params(workdir, abstract, config=config, flag='--checkpoint',
                             step_flag='--step')
    message = str(info.value)
    assert re.fullmatch(
        rf'--checkpoint={re.escape(workdir)}: checkpoint step 6 cannot be read '
        rf'\({re.escape(path)}: {reason}\); step 3 loads: add --step=3\.', message), (what, message)
    shutil.rmtree(os.path.join(ckdir, '6'))
    shutil.copytree(good, os.path.join(ckdir, '6'))
  loaded, _ = parameters.load_params(workdir, abstract, config=config)  # undamaged: step 6
  assert integrity.checksums({'params': loaded}).items() <= _saved_sums(ckdir, 6).items()


def _saved_sums(ckdir, step):
  with open(os.path.join(ckdir, str(step), '_CHECKPOINT_METADATA')) as f:
    return json.load(f)['custom_metadata']['segvit_checksums']


def test_predict_and_eval_on_a_damaged_workdir(reference, tmp_path):
  workdir, ckdir = _copy(reference, tmp_path)
  _truncate(os.path.join(ckdir, '6', 'default', '_sharding'))
  images = tmp_path / 'images'
  images.mkdir()
  shutil.copy(os.path.join(workdir, 'predictions.png'), images / 'a.png')
  proc = subprocess.run(
      [sys.executable, '-m', 'segvit_jax.predict', f'--checkpoint={workdir}', str(images),
       f'--output={tmp_path / "out"}'], cwd=ROOT, env=tiny_runs.env(1), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.splitlines() == [
      f'error: --checkpoint={workdir}: checkpoint step 6 cannot be read '
      f'({ckdir}/6/default/_sharding: Invalid JSON); step 3 loads: add --step=3.']
  assert predictor.load(workdir, step=3).config.model.depth == 2

  config = tiny_runs.tiny_config(init_checkpoint=workdir)
  with pytest.raises(UserError) as info:
    eval_mode.evaluate_checkpoint(config, str(tmp_path / 'eval'), devices=ONE_DEVICE)
  assert str(info.value) == (
      f'config.init_checkpoint={workdir}: checkpoint step 6 cannot be read '
      f'({ckdir}/6/default/_sharding: Invalid JSON); step 3 loads: add --config.restore_step=3.')
  config = tiny_runs.tiny_config(init_checkpoint=workdir, restore_step=3)
  result = eval_mode.evaluate_checkpoint(config, str(tmp_path / 'eval'), devices=ONE_DEVICE)
  assert result['step'] == 3 and 0 < result['val/miou'] <= 1
  with open(tmp_path / 'eval' / 'eval_metrics.json') as f:
    assert json.load(f)['step'] == 3
  # Reading never renames: the damaged step stays where it is.
  assert sorted(os.listdir(ckdir)) == ['3', '6']


def _flip_data(ckdir, step):
  """A byte flipped in each data file of `step`: the arrays' bytes, zstd-compressed, which
  Orbax reads back without a check (a wrong value, or a decoding error)."""
  for path in glob.glob(os.path.join(ckdir, str(step), 'default', 'ocdbt.process_0', 'd', '*')):
    _flip(path, os.path.getsize(path) // 3)


def test_no_readable_step_is_one_line_and_changes_nothing(reference, tmp_path):
  workdir, ckdir = _copy(reference, tmp_path)
  _truncate(os.path.join(ckdir, '6', 'default', '_sharding'))
  _flip_data(ckdir, 3)

  def snapshot():
    return {os.path.join(parent, name): os.stat(os.path.join(parent, name)).st_mtime_ns
            for parent, _, names in os.walk(workdir) for name in names}

  before = snapshot()
  with pytest.raises(UserError) as info:
    _train(workdir)
  assert re.fullmatch(
      rf'no checkpoint in {re.escape(ckdir)} can be read: checkpoint step 6 cannot be read '
      rf'\({re.escape(ckdir)}/6/default/_sharding: Invalid JSON\); checkpoint step 3 cannot be '
      rf'read \({re.escape(ckdir)}/3/default: [^;]+\); nothing was changed: restore the files, '
      r'or choose another --workdir to start afresh\.', str(info.value)), str(info.value)
  assert snapshot() == before


# ------------------------------------------------------------------------------------------------
# A full disk.


@pytest.fixture(name='small_disk')
def small_disk_fixture(tmp_path):
  """A 12 MB tmpfs where this machine lets the test mount one (root), else a plain folder: the
  faults of tests/run_with_faults.py then limit file sizes instead of filling it."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', str(disk)],
                             capture_output=True, check=False).returncode == 0
  except OSError:  # no mount command
    mounted = False
  yield str(disk)
  if mounted:
    subprocess.run(['umount', str(disk)], check=True)


def _run_with_fault(workdir, fault):
  proc = subprocess.run(tiny_runs.main_cmd(workdir, fault=fault), cwd=ROOT, env=tiny_runs.env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-4000:]
  return proc.stderr.splitlines()


def _checkpoint_size(ckdir, step):
  return sum(os.path.getsize(os.path.join(parent, name))
             for parent, _, names in os.walk(os.path.join(ckdir, str(step))) for name in names)


def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_continues(reference, small_disk):
  """Room for 64 KB more after step 3's checkpoint: step 6's does not fit."""
  workdir = os.path.join(small_disk, 'run')
  ckdir = os.path.join(workdir, 'checkpoints')
  lines = _run_with_fault(workdir, 'fill_after:3:65536')
  state = build.setup(tiny_runs.tiny_config(), ONE_DEVICE).spec.abstract
  needs = fileio.size_text(max(training_checkpoints.state_bytes(state),
                               _checkpoint_size(ckdir, 3)))
  assert len(lines) == 1 and re.fullmatch(
      rf'error: cannot write the checkpoint of step 6 to {re.escape(ckdir)} \((No space left on '
      rf'device|File too large)\): a checkpoint of this model needs {needs}, \S+ \S+ free '
      r'there; the last complete checkpoint, step 3, is kept: free space, then rerun the same '
      r'command to continue from it\.', lines[0]), lines
  assert os.listdir(ckdir) == ['3']  # the half-written step 6 is gone
  assert sorted(tiny_runs.losses(workdir)) == [1, 2, 3, 4, 5, 6]

  filler = os.path.join(small_disk, 'filler')
  if os.path.exists(filler):
    os.remove(filler)
  _train(workdir)
  _assert_resumed_exactly(workdir, reference)
  assert tiny_runs.steps(workdir) == [3, 6]


def test_a_failed_metrics_write_is_one_line_and_leaves_whole_lines(reference, tmp_path):
  """No byte more for any file after step 3's checkpoint: step 4's line of metrics.jsonl."""
  workdir = str(tmp_path / 'run')
  lines = _run_with_fault(workdir, 'limit_after:3:0')
  assert len(lines) == 1 and re.fullmatch(
      rf'error: cannot write {re.escape(workdir)}/metrics.jsonl \(File too large; \S+ \S+ free '
      r'there\): free space or fix the storage, then rerun the same command\.', lines[0]), lines
  assert sorted(tiny_runs.losses(workdir)) == [1, 2, 3]  # whole lines only
  assert tiny_runs.steps(workdir) == [3]
  _train(workdir)
  _assert_resumed_exactly(workdir, reference)


def test_start_up_warns_when_two_checkpoints_would_not_fit(tmp_path):
  free = fileio.free_bytes(str(tmp_path))
  ckpt = training_checkpoints.Checkpointer(str(tmp_path / 'checkpoints'))
  huge = {'w': jax.ShapeDtypeStruct((free // 4 // 2 + 1000,), jax.numpy.float32)}
  needed = 2 * training_checkpoints.state_bytes(huge)
  warning = ckpt.space_warning(huge)
  # The file system's free space moves with other writers: the figure is checked by its unit.
  assert re.fullmatch(
      rf'Warning: {re.escape(ckpt.directory)} has \S+ \S+ free, less than the '
      rf'{re.escape(fileio.size_text(needed))} two checkpoints of this model take; saving will '
      r'fail when the disk is full\.', warning), warning
  assert ckpt.space_warning({'w': jax.ShapeDtypeStruct((1000,), jax.numpy.float32)}) is None
  ckpt.close()
