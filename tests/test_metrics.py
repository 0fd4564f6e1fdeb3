"""metrics.py against an independent numpy re-implementation of mmseg 0.24's `eval_metrics`."""

import jax
import numpy as np
import pytest

from segvit_jax.evaluation import metrics

IGNORE = 255


def _histogram(values, k):
  # mmseg uses torch.histc(bins=K, min=0, max=K-1); np.histogram with the same range bins integer
  # values identically (the last bin includes its right edge).
  return np.histogram(values, bins=k, range=(0, k - 1))[0].astype(np.float64)


def mmseg_like_eval(preds, labels, k):
  """Per-image histograms summed over images, then mmseg's ratios; written independently."""
  inter = np.zeros(k)
  union = np.zeros(k)
  area_pred = np.zeros(k)
  area_label = np.zeros(k)
  for pred, label in zip(preds, labels):
    mask = label != IGNORE
    p, lbl = pred[mask], label[mask]
    i = _histogram(p[p == lbl], k)
    ap = _histogram(p, k)
    al = _histogram(lbl, k)
    inter += i
    area_pred += ap
    area_label += al
    union += ap + al - i
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = inter / union
    acc = inter / area_label
    aacc = inter.sum() / area_label.sum()
  # nanmean by hand: explicit loop over the classes that are defined.
  def nanmean(v):
    kept = [x for x in v if not np.isnan(x)]
    return sum(kept) / len(kept)
  return {'miou': nanmean(iou), 'macc': nanmean(acc), 'aacc': aacc, 'iou': iou, 'acc': acc}


def loop_confusion(preds, labels, k):
  conf = np.zeros((k, k), np.int64)
  for pred, label in zip(preds, labels):
    for p, lbl in zip(pred.ravel(), label.ravel()):
      if lbl != IGNORE:
        conf[lbl, p] += 1
  return conf


def random_split(seed, k=7, sizes=((5, 9), (8, 8), (3, 11))):
  """Random predictions/labels with 255s, one class absent everywhere, one only predicted."""
  rng = np.random.default_rng(seed)
  absent_everywhere, predicted_only = k - 1, k - 2
  preds, labels = [], []
  for h, w in sizes:
    label = rng.integers(0, k - 2, size=(h, w))   # never absent_everywhere / predicted_only
    label[rng.random((h, w)) < 0.2] = IGNORE
    pred = rng.integers(0, k - 1, size=(h, w))    # may be predicted_only, never absent_everywhere
    # Make predictions agree with labels often enough for non-trivial IoUs.
    agree = (rng.random((h, w)) < 0.5) & (label != IGNORE)
    pred[agree] = label[agree]
    preds.append(pred)
    labels.append(label)
  assert (np.concatenate([p.ravel() for p in preds]) == predicted_only).any()
  return preds, labels, absent_everywhere, predicted_only


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_match_independent_numpy(seed):
  k = 7
  preds, labels, absent, predicted_only = random_split(seed, k)
  conf = sum(np.asarray(metrics.confusion_matrix(p, lbl, k)) for p, lbl in zip(preds, labels))
  got = metrics.segmentation_metrics(conf)
  want = mmseg_like_eval(preds, labels, k)
  np.testing.assert_allclose(got['miou'], want['miou'], rtol=1e-12)
  np.testing.assert_allclose(got['macc'], want['macc'], rtol=1e-12)
  np.testing.assert_allclose(got['aacc'], want['aacc'], rtol=1e-12)
  np.testing.assert_allclose(got['per_class_iou'], want['iou'], rtol=1e-12)  # NaNs in place
  np.testing.assert_allclose(got['per_class_acc'], want['acc'], rtol=1e-12)
  # The semantics that matter for the mean: absent everywhere -> excluded (NaN); predicted but
  # absent from the label -> IoU 0 (counted), Acc NaN (not counted).
  assert np.isnan(got['per_class_iou'][absent]) and np.isnan(got['per_class_acc'][absent])
  assert got['per_class_iou'][predicted_only] == 0.0
  assert np.isnan(got['per_class_acc'][predicted_only])
  assert not np.isnan(got['per_class_iou'][:predicted_only]).any()


def test_hand_computed_example():
  # K = 3. label [0, 0, 1, 255], pred [0, 2, 1, 1]: the 255 pixel is ignored.
  # class 0: inter 1, label 2, pred 1 -> IoU 1/2, Acc 1/2; class 1: IoU 1, Acc 1;
  # class 2: inter 0, label 0, pred 1 -> IoU 0/1 = 0, Acc 0/0 = NaN.
  conf = metrics.confusion_matrix(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 255]), 3)
  m = metrics.segmentation_metrics(np.asarray(conf), class_names=('a', 'b', 'c'))
  np.testing.assert_allclose(m['per_class_iou'], [0.5, 1.0, 0.0])
  np.testing.assert_allclose(m['per_class_acc'], [0.5, 1.0, np.nan])
  assert m['miou'] == pytest.approx(0.5)
  assert m['macc'] == pytest.approx(0.75)
  assert m['aacc'] == pytest.approx(2 / 3)
  scalars = metrics.to_scalars(m, prefix='val/')
  assert scalars['val/iou/a'] == pytest.approx(0.5) and np.isnan(scalars['val/acc/c'])
  table = metrics.format_table(m)
  assert 'mIoU 50.00' in table and 'aAcc 66.67' in table


def test_confusion_matrix_under_jit_with_valid_mask():
  k = 5
  rng = np.random.default_rng(3)
  label = rng.integers(0, k, size=(2, 6, 7))
  label[rng.random(label.shape) < 0.25] = IGNORE
  pred = rng.integers(0, k, size=(2, 6, 7))
  valid = rng.random(label.shape) < 0.7
  fn = jax.jit(lambda p, lbl, v: metrics.confusion_matrix(p, lbl, k, valid=v))
  got = np.asarray(fn(pred, label, valid))
  assert got.dtype == np.int32 and got.shape == (k, k)
  masked = np.where(valid, label, IGNORE)
  np.testing.assert_array_equal(got, loop_confusion(pred, masked, k))
  # Rows are ground truth: row sums are the label histogram.
  np.testing.assert_array_equal(got.sum(1), np.bincount(masked[masked != IGNORE], minlength=k))


def test_empty_and_bad_inputs():
  m = metrics.segmentation_metrics(np.zeros((3, 3), np.int64))
  assert np.isnan(m['miou']) and np.isnan(m['macc']) and np.isnan(m['aacc'])
  with pytest.raises(ValueError, match='square'):
    metrics.segmentation_metrics(np.zeros((3, 4)))
  with pytest.raises(ValueError, match='class_names'):
    metrics.segmentation_metrics(np.eye(3), class_names=('a',))
  with pytest.raises(ValueError, match='shape'):
    metrics.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)
