"""mmseg 0.24's test-time inference of an `EncoderDecoder` (mmseg/models/segmentors/
encoder_decoder.py: `slide_inference`, `whole_inference`, `inference`), without flips.

Images NCHW at their test-resized size; scores and probabilities (B, K, H, W) float32.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def slide_inference(model, images: torch.Tensor, crop_size: Tuple[int, int],
                    stride: Tuple[int, int], num_classes: int) -> torch.Tensor:
  """Scores averaged over mmseg's window grid: (B, K, H, W) float32.

  Along each axis max(size - crop + stride - 1, 0) // stride + 1 windows, window i starting at
  i * stride, the last ones moved back to end at the border.
  """
  b, _, h, w = images.shape
  (ch, cw), (sh, sw) = crop_size, stride
  grid_h = max(h - ch + sh - 1, 0) // sh + 1
  grid_w = max(w - cw + sw - 1, 0) // sw + 1
  sums = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
  counts = images.new_zeros((b, 1, h, w), dtype=torch.float32)
  for i in range(grid_h):
    for j in range(grid_w):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      scores = model.forward_all(images[:, :, y1:y2, x1:x2])['scores']
      sums[:, :, y1:y2, x1:x2] += scores.float()
      counts[:, :, y1:y2, x1:x2] += 1
  return sums / counts


def inference(model, images: torch.Tensor, *, mode: str, crop_size: Tuple[int, int],
              stride: Tuple[int, int], num_classes: int,
              output_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
  """Class probabilities (B, K, Ho, Wo): the window-averaged ('slide') or whole-image ('whole')
  scores, bilinearly resized (align_corners=False) to `output_size` (the original image size;
  default the input's), softmax over classes."""
  if mode == 'slide':
    scores = slide_inference(model, images, crop_size, stride, num_classes)
  elif mode == 'whole':
    scores = model.forward_all(images)['scores'].float()
  else:
    raise ValueError(f"mode={mode!r}: expected 'slide' or 'whole'.")
  # mmseg resizes even to the same size (`rescale=True`): the cost is part of its inference.
  size = tuple(output_size or images.shape[-2:])
  scores = F.interpolate(scores, size=size, mode='bilinear', align_corners=False)
  return F.softmax(scores, dim=1)
