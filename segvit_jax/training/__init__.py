"""Training: the loop (`loop`) and its parts beside it, one job per module.

  build        mesh, model, optimizer and state layout of a config (`Setup`)
  state        the sharded train state, and the state a run starts from (resume / fine-tune / fresh)
  step         the jitted train step (gradient accumulation)
  loop         `train_and_evaluate`: the loop itself, top to bottom
  log          metrics fetched to the host (the non-finite gate), metrics.jsonl, progress line
  tensorboard_events  TensorBoard event files without TensorFlow
  preemption   SIGTERM / SIGINT -> save and stop
  eval_mode    `evaluate_checkpoint`: a checkpoint's evaluation without training (--mode=eval)
  preflight    the config checked against the devices and processes before anything is built
"""
