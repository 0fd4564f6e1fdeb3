"""Evaluation and prediction, by job:

  inference.py    the inference settings (`InferenceSpec`, from the config) and mmseg's test
                  path: whole image, sliding windows, flip and multi-scale TTA, under jit
  metrics.py      the confusion matrix and mIoU / mAcc / aAcc, as mmseg computes them
  eval_loop.py    the jitted eval step and the loop over a split's batches; the host transfer
  evaluators/     what a run evaluates (`config.evals`): one evaluator per file behind one
                  protocol, chosen by `type` through a registry, and their scheduling
  predictor.py    a loaded model segmenting image files and arrays (`segvit-predict`)
  visualize.py    class names and colours, overlays, the predictions figure
"""
