"""Checkpoints: the train state during training, and parameters exported for others to use.

  training_checkpoints  `Checkpointer`: WORKDIR/checkpoints/<step>/ saved asynchronously, the
                        last N steps plus the best by mIoU; resuming from the newest step that
                        reads back whole; failed saves cleaned up; the space warning
  parameters            exported parameter directories (`export_params`), and `load_params`,
                        the one loader of params from either kind
  integrity             per-array checksums, `DamagedCheckpoint`, setting a damaged step aside
  compatibility         whether a saved tree fits the model of a config, and the one-line
                        message naming the config keys (or parameter paths) that differ
  orbax_handlers        the Orbax PyTree handler all of them read and write through

The config.json stored with both kinds is written and read by `segvit_jax.config`.
"""
