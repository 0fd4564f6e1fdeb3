"""Evaluation: inference as mmseg runs it (whole image, sliding windows, flip and multi-scale),
the confusion matrix and mIoU, the evaluators a run lists in `config.evals`, and the figure of
predictions.
"""
