"""Serving artifacts of a trained or converted SegViT: StableHLO, TF SavedModel and ONNX
(`segvit-export`, `python -m segvit_jax.export`), and the runner of a StableHLO artifact that
`segvit-predict --exported` uses.
"""
