"""resize.py against PyTorch's F.interpolate (align_corners=False) for the kernels the model
uses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvit_jax.models import resize


@pytest.mark.parametrize('in_hw,out_hw', [((4, 6), (64, 96)), ((7, 5), (3, 11)),
                                          ((24, 24), (40, 40)),
                                          ((40, 40), (30, 30)), ((5, 9), (5, 9)),
                                          ((2048, 7), (683, 5)), ((999, 3), (1333, 4))])
@pytest.mark.parametrize('mode', ['bilinear', 'bicubic'])
def test_matches_torch(in_hw, out_hw, mode):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  fn = resize.resize_bilinear if mode == 'bilinear' else resize.resize_bicubic_torch
  ours = np.asarray(fn(x, out_hw))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode=mode,
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_other_axes_and_dtype():
  x = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
  out = resize.resize_bilinear(x, (8, 10), axes=(1, 2))
  assert out.shape == (3, 8, 10) and out.dtype == np.float32
  # A constant image stays constant under both kernels (weights sum to one).
  ones = np.ones((1, 5, 7, 2), np.float32)
  np.testing.assert_allclose(resize.resize_bicubic_torch(ones, (13, 3)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(resize.resize_bilinear(ones, (2, 20)), 1.0, rtol=1e-6)
