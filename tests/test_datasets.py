"""Data sources: TFDS builders from tiny official-layout archives, mmseg folders, synthetic.

The archives are generated here (tests/official_layouts.py) in the exact layouts of the
official downloads; label mappings are checked value by value.
"""

import os
import re
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import mmcv_reference
from segvit_jax.data import palettes
from segvit_jax.data import prepare
from segvit_jax.data.datasets import ade20k
from segvit_jax.data.datasets import coco_stuff10k
from segvit_jax.data.datasets import pascal_context
from segvit_jax.data.datasets import synthetic
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import mmseg_folder
from segvit_jax.data.sources import reader
from segvit_jax.data.sources import tfds_builder  # noqa: F401  (registers the TFDS builders)

try:
  from tests import official_layouts as layouts
except ImportError:
  import official_layouts as layouts

H, W = 12, 16


def _cfg(**kw):
  base = dict(source='tfds', tfds_name='', data_dir='', folder='', reduce_zero_label=True,
              num_classes=150, synthetic_image_size=48, synthetic_num_train=12,
              synthetic_num_val=5, synthetic_seed=0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _read(cfg, split, **kw):
  """Decoded examples of a source (TFDS and folder sources yield encoded bytes)."""
  from segvit_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top

  def decode(ex):
    image, label = tf_pipeline.decode_example(ex)
    return {**ex, 'image': image, 'label': label}

  return list(reader.get_source(cfg, split, **kw).map(decode).as_numpy_iterator())


def _build(name, manual_dir, data_dir):
  tfds.builder(name, data_dir=str(data_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


def _stripes(values, h=H, w=W):
  """A label map whose columns cycle through `values`."""
  values = np.asarray(values)
  return np.tile(values[np.arange(w) % len(values)], (h, 1))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# ADE20K


def test_ade20k_build_counts_mapping_and_order(tmp_path, rng):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  manual.mkdir()
  raw = _stripes([0, 1, 150, 255, 7])
  train = [(f'ADE_train_{i:08d}', layouts.random_image(rng, H, W), raw) for i in (3, 1, 2)]
  val = [(f'ADE_val_{i:08d}', layouts.random_image(rng, H, W), raw[:, ::-1])
         for i in (2, 1)]
  layouts.ade20k_zip(str(manual), train, val)
  _build('ade20k', manual, data)

  cfg = _cfg(tfds_name='ade20k', data_dir=str(data))
  assert reader.num_examples(cfg, 'train') == 3
  assert reader.num_examples(cfg, 'validation') == 2
  train_out, val_out = _read(cfg, 'train'), _read(cfg, 'validation')
  # Sorted by file name, not archive order.
  assert [e['file_name'].decode() for e in train_out] == [
      'ADE_train_00000001.jpg', 'ADE_train_00000002.jpg', 'ADE_train_00000003.jpg']
  expected = _stripes([255, 0, 149, 255, 6])  # 0 -> 255, k -> k - 1, 255 stays
  for e in train_out:
    assert e['image'].dtype == np.uint8 and e['image'].shape == (H, W, 3)
    assert e['label'].dtype == np.uint8
    np.testing.assert_array_equal(e['label'], expected)
  np.testing.assert_array_equal(val_out[0]['label'], expected[:, ::-1])
  # Images are the shipped JPEG bytes, decoded in the graph as OpenCV decodes them.
  by_name = {f'{n}.jpg': img for n, img, _ in train}
  for e in train_out:
    ref = mmcv_reference.imdecode(layouts.jpeg_bytes(by_name[e['file_name'].decode()]))
    np.testing.assert_array_equal(e['image'], ref)


def test_tfds_source_shards_are_disjoint_and_cover(tmp_path, rng):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  manual.mkdir()
  lab = np.ones((H, W), np.uint8)
  train = [(f'ADE_train_{i:08d}', layouts.random_image(rng, H, W), lab) for i in range(1, 6)]
  layouts.ade20k_zip(str(manual), train, train[:1])
  _build('ade20k', manual, data)
  cfg = _cfg(tfds_name='ade20k', data_dir=str(data))
  shards = [[e['file_name'] for e in _read(cfg, 'train', shard_index=i, num_shards=2)]
            for i in range(2)]
  assert [len(s) for s in shards] == [3, 2]
  assert shards[0] + shards[1] == [e['file_name'] for e in _read(cfg, 'train')]
  # The input pipeline relies on known cardinalities (no counting pass).
  for i, n in enumerate((3, 2)):
    assert int(reader.get_source(cfg, 'train', shard_index=i, num_shards=2)
               .cardinality()) == n
  # More hosts than examples: the extra host gets an empty dataset of the same structure.
  empty = reader.get_source(cfg, 'validation', shard_index=1, num_shards=2)
  assert int(empty.cardinality()) == 0
  assert empty.element_spec == reader.get_source(cfg, 'validation').element_spec


def test_ade20k_missing_archive_lists_expected_files(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'README.txt').write_text('wrong file')
  with pytest.raises(DatasetError) as e:
    _build('ade20k', manual, tmp_path / 'data')
  msg = str(e.value)
  for expected in ('ADEChallengeData2016.zip', str(manual),
                   'ADEChallengeData2016/images/training/',
                   'ADEChallengeData2016/annotations/validation/'):
    assert expected in msg


def test_ade20k_from_extracted_folder_and_missing_manual_dir(tmp_path, rng, capsys):
  manual = tmp_path / 'manual'
  manual.mkdir()
  raw = _stripes([0, 3])
  ex = [(f'ADE_train_{i:08d}', layouts.random_image(rng, H, W), raw) for i in (1, 2)]
  archive = layouts.ade20k_zip(str(manual), ex, ex[:1])
  with zipfile.ZipFile(archive) as z:
    z.extractall(manual)
  os.remove(archive)
  assert prepare.main(['ade20k', f'--manual_dir={manual}', f'--data_dir={tmp_path / "d"}']) == 0
  cfg = _cfg(tfds_name='ade20k', data_dir=str(tmp_path / 'd'))
  out = _read(cfg, 'train')
  assert len(out) == 2
  np.testing.assert_array_equal(out[1]['label'], _stripes([255, 2]))

  capsys.readouterr()
  assert prepare.main(['ade20k', f'--manual_dir={tmp_path / "absent"}',
                       f'--data_dir={tmp_path / "d2"}']) == 1
  err = capsys.readouterr().err
  assert 'ADEChallengeData2016.zip' in err and 'absent' in err


@pytest.mark.parametrize('problem', ['corrupt_jpeg', 'size_mismatch', 'label_out_of_range',
                                     'missing_annotation'])
def test_ade20k_bad_data_fails_at_build_with_file_name(tmp_path, rng, problem):
  manual = tmp_path / 'manual'
  manual.mkdir()
  good_image = layouts.random_image(rng, H, W)
  lab = np.ones((H, W), np.uint8)
  bad_image, bad_label = good_image, lab
  if problem == 'corrupt_jpeg':
    data = layouts.jpeg_bytes(good_image)
    bad_image = data[:len(data) // 2]
  elif problem == 'size_mismatch':
    bad_label = np.ones((H - 2, W), np.uint8)
  elif problem == 'label_out_of_range':
    bad_label = _stripes([1, 151])
  else:
    bad_label = None
  train = [('ADE_train_00000001', good_image, lab), ('ADE_train_00000002', bad_image,
                                                     bad_label)]
  layouts.ade20k_zip(str(manual), train, train[:1])
  with pytest.raises(DatasetError, match='ADE_train_00000002') as e:
    _build('ade20k', manual, tmp_path / 'data')
  if problem == 'label_out_of_range':
    assert '151' in str(e.value)
  if problem == 'size_mismatch':
    assert '12x16' in str(e.value) and '10x16' in str(e.value)


# ---------------------------------------------------------------------------------------
# COCO-Stuff-10K


def test_coco_stuff10k_build_counts_and_mmseg_mapping(tmp_path, rng):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  manual.mkdir()
  # raw COCO-Stuff ids: unlabeled, person, stop sign neighbours, first stuff, last stuff.
  raw_ids = [0, 1, 11, 13, 90, 92, 182, 255]
  expected_ids = [255, 0, 10, 11, 79, 80, 170, 255]
  raw = _stripes(raw_ids)
  train = [(f'COCO_train2014_{i:012d}', layouts.random_image(rng, H, W), raw)
           for i in (77, 9, 30)]
  test = [(f'COCO_train2014_{i:012d}', layouts.random_image(rng, H, W), raw[:, ::-1])
          for i in (5, 64)]
  layouts.coco_stuff10k_zip(str(manual), train, test)
  _build('coco_stuff10k', manual, data)

  cfg = _cfg(tfds_name='coco_stuff10k', data_dir=str(data), num_classes=171)
  assert reader.num_examples(cfg, 'train') == 3
  assert reader.num_examples(cfg, 'validation') == 2
  out = _read(cfg, 'train')
  assert [e['file_name'].decode() for e in out] == [
      'COCO_train2014_000000000009.jpg', 'COCO_train2014_000000000030.jpg',
      'COCO_train2014_000000000077.jpg']
  for e in out:
    np.testing.assert_array_equal(e['label'], _stripes(expected_ids))
  val = _read(cfg, 'validation')
  np.testing.assert_array_equal(val[0]['label'], _stripes(expected_ids)[:, ::-1])
  # Train ids line up with mmseg's class names.
  names = coco_stuff10k.CLASSES
  assert (names[0], names[10], names[11], names[79], names[80], names[170]) == (
      'person', 'fire hydrant', 'stop sign', 'toothbrush', 'banner', 'wood')


def test_coco_stuff10k_lut_matches_mmseg_table():
  lut = coco_stuff10k.label_lut()
  # Spot checks of mmseg's converter table (clsID -> trID), then reduce_zero_label.
  mmseg_pairs = {1: 1, 11: 11, 13: 12, 25: 24, 27: 25, 28: 26, 31: 27, 44: 40, 46: 41,
                 65: 60, 67: 61, 70: 62, 72: 63, 82: 73, 84: 74, 90: 80, 92: 81, 182: 171}
  for cid, tr in mmseg_pairs.items():
    assert lut[cid] == tr - 1, cid
  assert lut[0] == 255 and lut[255] == 255
  for unused in coco_stuff10k.UNUSED_IDS + (183, 254):
    assert lut[unused] == -1
  assert sorted(lut[lut >= 0][lut[lut >= 0] != 255].tolist()) == list(range(171))


def test_coco_stuff10k_unused_id_and_missing_list_fail(tmp_path, rng):
  manual = tmp_path / 'manual'
  manual.mkdir()
  train = [('COCO_train2014_000000000001', layouts.random_image(rng, H, W), _stripes([1, 12]))]
  test = [('COCO_train2014_000000000002', layouts.random_image(rng, H, W), _stripes([1]))]
  layouts.coco_stuff10k_zip(str(manual), train, test)
  with pytest.raises(DatasetError,
                     match=r'COCO_train2014_000000000001\.mat.*\[12\]'):
    _build('coco_stuff10k', manual, tmp_path / 'data')

  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'other.zip').write_bytes(b'x')
  with pytest.raises(DatasetError) as e:
    _build('coco_stuff10k', empty, tmp_path / 'data2')
  for expected in ('cocostuff-10k-v1.1.zip', 'imageLists/train.txt', 'imageLists/test.txt',
                   'annotations/<name>.mat'):
    assert expected in str(e.value)


# ---------------------------------------------------------------------------------------
# PASCAL-Context (built through the prepare CLI)


def test_pascal_context_59_and_60_via_prepare_cli(tmp_path, rng, capsys):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  manual.mkdir()
  # 0 = unlabeled, 1 accordion (not in the 59), 2 aeroplane, 9 bag, 255 (a 459-class id,
  # not in the 59), 397 table, 458 wood, 459 (last context id, not in the 59).
  raw_ids = [0, 1, 2, 9, 255, 397, 458, 459]
  raw = _stripes(raw_ids)
  train = [(f'2008_{i:06d}', layouts.random_image(rng, H, W), raw) for i in (8, 2, 5)]
  val = [(f'2010_{i:06d}', layouts.random_image(rng, H, W), raw[::-1]) for i in (3, 1)]
  layouts.pascal_context_archives(str(manual), train, val)
  assert prepare.main(['pascal_context', f'--manual_dir={manual}',
                       f'--data_dir={data}']) == 0
  log = capsys.readouterr().out
  assert 'pascal_context/60' in log and 'pascal_context/59' in log and 'train 3' in log

  cfg60 = _cfg(tfds_name='pascal_context/60', data_dir=str(data), num_classes=60)
  cfg59 = _cfg(tfds_name='pascal_context/59', data_dir=str(data), num_classes=59)
  for cfg in (cfg60, cfg59):
    assert reader.num_examples(cfg, 'train') == 3
    assert reader.num_examples(cfg, 'validation') == 2
  expect60 = _stripes([0, 0, 1, 2, 0, 50, 59, 0])
  expect59 = _stripes([255, 255, 0, 1, 255, 49, 58, 255])
  out60, out59 = _read(cfg60, 'train'), _read(cfg59, 'train')
  assert [e['file_name'].decode() for e in out60] == [
      '2008_000002.jpg', '2008_000005.jpg', '2008_000008.jpg']
  for e60, e59 in zip(out60, out59):
    np.testing.assert_array_equal(e60['label'], expect60)
    np.testing.assert_array_equal(e59['label'], expect59)
    np.testing.assert_array_equal(e60['image'], e59['image'])
  np.testing.assert_array_equal(_read(cfg60, 'validation')[0]['label'], expect60[::-1])
  names60 = palettes.class_names('pascal_context', 60)
  assert (names60[0], names60[1], names60[2], names60[50], names60[59]) == (
      'background', 'aeroplane', 'bag', 'table', 'wood')
  assert palettes.class_names('pascal_context/59')[58] == 'wood'


def test_pascal_context_lut_covers_59_classes():
  lut60, lut59 = pascal_context.label_lut(60), pascal_context.label_lut(59)
  assert sorted(set(lut60[:460].tolist())) == list(range(60))
  assert sorted(set(lut59[:460].tolist())) == list(range(59)) + [255]
  assert lut60[460] == -1 and lut59[65535] == -1
  np.testing.assert_array_equal(lut59[:460], np.where(lut60[:460] == 0, 255,
                                                      lut60[:460] - 1))


def test_pascal_context_missing_annotation_archive_named(tmp_path, rng):
  manual = tmp_path / 'manual'
  manual.mkdir()
  ex = [('2008_000002', layouts.random_image(rng, H, W), np.zeros((H, W), np.uint16))]
  layouts.pascal_context_archives(str(manual), ex, ex)
  os.remove(manual / 'trainval.tar.gz')
  with pytest.raises(DatasetError) as e:
    _build('pascal_context/60', manual, tmp_path / 'data')
  assert 'missing trainval.tar.gz' in str(e.value)
  assert 'VOCtrainval_03-May-2010.tar' in str(e.value)


def test_unprepared_tfds_source_says_how_to_prepare(tmp_path):
  cfg = _cfg(tfds_name='coco_stuff10k', data_dir=str(tmp_path / 'nothing'))
  with pytest.raises(DatasetError,
                     match='python -m segvit_jax.data.prepare coco_stuff10k'):
    reader.get_source(cfg, 'train')


# ---------------------------------------------------------------------------------------
# mmseg folders


@pytest.mark.parametrize('layout,suffix', [('generic', '.png'), ('ade20k', '.png'),
                                           ('coco_stuff10k', '_labelTrainIds.png')])
@pytest.mark.parametrize('reduce_zero', [True, False])
def test_mmseg_folder_source(tmp_path, rng, layout, suffix, reduce_zero):
  raw = _stripes([0, 1, 5, 255])
  train = [(f'img_{i}', layouts.random_image(rng, H, W), raw) for i in (2, 0, 1)]
  val = [('img_9', layouts.random_image(rng, H, W), raw)]
  root = layouts.mmseg_folder(str(tmp_path / 'data'), layout, train, val, suffix)
  cfg = _cfg(source='mmseg_folder', folder=root, reduce_zero_label=reduce_zero,
             num_classes=10)
  assert reader.num_examples(cfg, 'train') == 3
  assert reader.num_examples(cfg, 'validation') == 1
  out = _read(cfg, 'train')
  assert [e['file_name'].decode() for e in out] == ['img_0.jpg', 'img_1.jpg', 'img_2.jpg']
  expected = _stripes([255, 0, 4, 255] if reduce_zero else [0, 1, 5, 255])
  for e in out:
    assert e['image'].shape == (H, W, 3) and e['label'].dtype == np.uint8
    np.testing.assert_array_equal(e['label'], expected)
  halves = [_read(cfg, 'train', shard_index=i, num_shards=2) for i in range(2)]
  assert [e['file_name'] for h in halves for e in h] == [e['file_name'] for e in out]
  assert int(reader.get_source(cfg, 'train', shard_index=1, num_shards=2)
             .cardinality()) == 1
  empty = reader.get_source(cfg, 'validation', shard_index=1, num_shards=2)
  assert _read(cfg, 'validation', shard_index=1, num_shards=2) == []
  assert empty.element_spec == reader.get_source(cfg, 'validation').element_spec


def test_mmseg_folder_pascal_context_layout(tmp_path, rng):
  voc = tmp_path / 'VOCdevkit' / 'VOC2010'
  (voc / 'JPEGImages').mkdir(parents=True)
  (voc / 'SegmentationClassContext').mkdir()
  (voc / 'ImageSets' / 'SegmentationContext').mkdir(parents=True)
  for split, ids in (('train', ['2008_000002', '2008_000003']), ('val', ['2008_000009'])):
    (voc / 'ImageSets' / 'SegmentationContext' / f'{split}.txt').write_text('\n'.join(ids))
    for i in ids:
      (voc / 'JPEGImages' / f'{i}.jpg').write_bytes(
          layouts.jpeg_bytes(layouts.random_image(rng, H, W)))
      (voc / 'SegmentationClassContext' / f'{i}.png').write_bytes(
          layouts.png_bytes(_stripes([0, 1, 59])))
  cfg = _cfg(source='mmseg_folder', folder=str(tmp_path / 'VOCdevkit'),
             reduce_zero_label=True, num_classes=59)
  out = _read(cfg, 'train')
  assert len(out) == 2 and reader.num_examples(cfg, 'validation') == 1
  np.testing.assert_array_equal(out[0]['label'], _stripes([255, 0, 58]))


def test_mmseg_folder_bad_data_is_named(tmp_path, rng):
  img = layouts.random_image(rng, H, W)
  root = layouts.mmseg_folder(str(tmp_path / 'data'), 'generic',
                              [('good', img, _stripes([0, 1])), ('bad', img, _stripes([1, 20]))],
                              [('v', img, _stripes([1]))])
  cfg = _cfg(source='mmseg_folder', folder=root, reduce_zero_label=False, num_classes=10)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'ann_dir/train/bad\.png'):
    _read(cfg, 'train')
  with pytest.raises(DatasetError, match=r'bad\.png.*\[20\]'):
    mmseg_folder.validate(root, num_classes=10, reduce_zero=False, log=lambda *_: None)
  os.remove(os.path.join(root, 'ann_dir', 'val', 'v.png'))
  with pytest.raises(DatasetError, match=r'val/v\.jpg: no annotation'):
    reader.num_examples(cfg, 'validation')
  with pytest.raises(DatasetError, match='not an mmseg data folder'):
    reader.get_source(_cfg(source='mmseg_folder', folder=str(tmp_path)), 'train')


def test_mmseg_folder_size_mismatch_is_named(tmp_path, rng):
  root = layouts.mmseg_folder(str(tmp_path / 'data'), 'generic',
                              [('odd', layouts.random_image(rng, H, W + 2), _stripes([1]))],
                              [])
  cfg = _cfg(source='mmseg_folder', folder=root, reduce_zero_label=False, num_classes=10)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'odd\.png'):
    _read(cfg, 'train')


def test_prepare_cli_checks_mmseg_folder(tmp_path, rng, capsys):
  img = layouts.random_image(rng, H, W)
  root = layouts.mmseg_folder(str(tmp_path / 'd'), 'ade20k', [('a', img, _stripes([0, 150]))],
                              [('b', img, _stripes([3]))])
  args = ['mmseg_folder', f'--folder={root}', '--num_classes=150']
  assert prepare.main(args + ['--reduce_zero_label']) == 0
  assert 'train: 1 examples OK' in capsys.readouterr().out
  assert prepare.main(args) == 1  # without reduce_zero_label, 150 is out of range
  assert 'a.png' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_and_seeded():
  a = synthetic.render(3, seed=0, split='train', image_size=48, num_classes=5)
  b = synthetic.render(3, seed=0, split='train', image_size=48, num_classes=5)
  c = synthetic.render(3, seed=1, split='train', image_size=48, num_classes=5)
  d = synthetic.render(3, seed=0, split='validation', image_size=48, num_classes=5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
  assert not np.array_equal(a[0], d[0])

  cfg = _cfg(source='synthetic', num_classes=5)
  images, labels = synthetic.load(cfg, 'train')
  assert images.shape == (12, 48, 48, 3) and labels.shape == (12, 48, 48)
  assert not images.flags.writeable and not labels.flags.writeable  # cached: shared, read-only
  assert synthetic.load(cfg, 'train')[0] is images
  assert reader.num_examples(cfg, 'validation') == 5
  assert len(synthetic.load(cfg, 'validation')[0]) == 5
  np.testing.assert_array_equal(images[3], a[0])
  np.testing.assert_array_equal(labels[3], a[1])
  other_seed = synthetic.load(_cfg(source='synthetic', num_classes=5, synthetic_seed=7), 'train')
  assert not np.array_equal(images[0], other_seed[0][0])


def test_synthetic_has_no_tf_data_source():
  """The in-memory source is served by numpy_pipeline; get_source says so."""
  with pytest.raises(ValueError, match='numpy_pipeline'):
    reader.get_source(_cfg(source='synthetic', num_classes=5), 'train')


def test_synthetic_labels_and_shapes():
  images, labels = synthetic.make_split('train', 40, seed=0, image_size=64, num_classes=5)
  assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
  assert labels.shape == (40, 64, 64) and labels.dtype == np.uint8
  counts = np.bincount(labels.ravel(), minlength=6)
  assert counts[5] == 0 and (counts[:5] > 0).all()
  # Every foreground class covers at least a few hundred pixels in total and no class
  # dominates everything (the task is not just "background").
  assert counts[0] / counts.sum() < 0.9
  assert (counts[1:5] > 500).all()


def _colour_bins(images, labels):
  fg = labels > 0
  return (images[fg] // 64).astype(np.int64) @ np.array([16, 4, 1]), labels[fg]


def test_synthetic_class_is_not_a_function_of_colour():
  # Fit the best colour -> class table (colours quantised to 4 levels per channel) on
  # training foreground pixels and score it on validation: if colour carried the class it
  # would beat always guessing the most frequent class by far.
  train_bins, train_cls = _colour_bins(
      *synthetic.make_split('train', 80, seed=0, image_size=64, num_classes=5))
  val_bins, val_cls = _colour_bins(
      *synthetic.make_split('validation', 80, seed=0, image_size=64, num_classes=5))
  table = np.zeros((64, 5), np.int64)
  np.add.at(table, (train_bins, train_cls), 1)
  colour_accuracy = np.mean(table.argmax(1)[val_bins] == val_cls)
  majority = np.mean(val_cls == np.bincount(train_cls).argmax())
  assert colour_accuracy < majority + 0.05, (colour_accuracy, majority)
  # Each class shows up in many different colours.
  for c in range(1, 5):
    assert np.count_nonzero(table[:, c]) > 40


def test_palettes():
  assert len(palettes.class_names('ade20k')) == 150
  assert len(palettes.class_names('coco_stuff10k')) == 171
  assert len(palettes.class_names('pascal_context')) == 60
  assert palettes.class_names('pascal_context', 59) == pascal_context.CLASSES_59
  assert palettes.class_names('synthetic', 5)[0] == 'background'
  with pytest.raises(ValueError, match='150 classes'):
    palettes.class_names('ade20k', 151)
  colors = palettes.palette('coco_stuff10k')
  assert colors.shape == (171, 3) and colors.dtype == np.uint8
  assert len({tuple(c) for c in colors}) == 171
  assert not (colors == 0).all(1).any()  # black is reserved for ignore
  rgb = palettes.colorize(np.array([[0, 255]]), colors)
  np.testing.assert_array_equal(rgb[0, 1], palettes.IGNORE_COLOR)
  np.testing.assert_array_equal(rgb[0, 0], colors[0])


# ---------------------------------------------------------------------------------------
# Decoding: every source decodes as mmseg does (OpenCV's IMREAD_COLOR), bit for bit.

# Encodings of photograph crops without EXIF rotation (a rotated image no longer fits its label).
_PHOTO_VARIANTS = ('jpeg baseline 4:2:0', 'jpeg progressive', 'jpeg 4:2:2', 'jpeg grey',
                   'jpeg cmyk', 'jpeg exif orientation 2', 'png rgb', 'png grey', 'png palette',
                   'png rgba', 'png grey + alpha', 'png 16-bit rgb', 'png 16-bit grey')


def _photo_examples():
  """[(stem, encoded bytes, raw ADE label)]: 48 x 40 crops of the photograph, encoded variously."""
  photo = mmcv_reference.photo()
  raw = _stripes([1, 2, 3], 48, 40)
  out = []
  for i, name in enumerate(_PHOTO_VARIANTS):
    crop = np.ascontiguousarray(photo[60 + 20 * i:108 + 20 * i, 200 + 9 * i:240 + 9 * i])
    out.append((f'ADE_train_{i + 1:08d}', mmcv_reference.image_variants(crop)[name], raw))
  return out


def test_tfds_and_mmseg_folder_sources_decode_as_opencv(tmp_path):
  examples = _photo_examples()
  (tmp_path / 'manual').mkdir()
  layouts.ade20k_zip(str(tmp_path / 'manual'), examples, examples[:1])
  _build('ade20k', tmp_path / 'manual', tmp_path / 'data')
  folder = layouts.mmseg_folder(str(tmp_path / 'folder'), 'ade20k', examples, examples[:1])
  for cfg in (_cfg(tfds_name='ade20k', data_dir=str(tmp_path / 'data')),
              _cfg(source='mmseg_folder', folder=folder)):
    out = _read(cfg, 'train')
    assert len(out) == len(examples)
    for (stem, data, _), example in zip(examples, out):
      assert example['file_name'].decode().startswith(stem), cfg.source
      np.testing.assert_array_equal(example['image'], mmcv_reference.imdecode(data),
                                    err_msg=f'{cfg.source} {stem}')
      np.testing.assert_array_equal(example['label'], _stripes([0, 1, 2], 48, 40))


def test_exif_rotated_image_fails_the_build_naming_the_orientation(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  crop = np.ascontiguousarray(mmcv_reference.photo()[:48, :40])
  rotated = mmcv_reference.with_orientation(Image.fromarray(crop), 'JPEG', 6)
  examples = [('ADE_train_00000001', rotated, _stripes([1, 2], 48, 40))]
  (tmp_path / 'manual').mkdir()
  layouts.ade20k_zip(str(tmp_path / 'manual'), examples, examples)
  with pytest.raises(DatasetError,
                     match=r'00000001\.jpg: image is 40x48 .*EXIF orientation'):
    _build('ade20k', tmp_path / 'manual', tmp_path / 'data')


def test_mmseg_folder_reads_palette_labels_as_indices(tmp_path, rng):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = layouts.mmseg_folder(str(tmp_path / 'data'), 'generic',
                              [('a', layouts.random_image(rng, H, W), _stripes([0]))], [])
  label = Image.fromarray(_stripes([0, 1, 5, 255]).astype(np.uint8), 'P')
  label.putpalette([int(v) for v in rng.integers(0, 256, 768)])
  label.save(os.path.join(root, 'ann_dir', 'train', 'a.png'))
  cfg = _cfg(source='mmseg_folder', folder=root, reduce_zero_label=False, num_classes=10)
  np.testing.assert_array_equal(_read(cfg, 'train')[0]['label'], _stripes([0, 1, 5, 255]))


def test_get_source_rejects_unknown_source():
  with pytest.raises(ValueError, match="source='nope'"):
    reader.get_source(_cfg(source='nope'), 'train')
  assert re.search('ade20k', ade20k.MANUAL_DOWNLOAD_INSTRUCTIONS)
