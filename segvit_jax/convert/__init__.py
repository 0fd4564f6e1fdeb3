"""The official SegViT checkpoints: reading PyTorch `.pth` files, mapping their keys to flax
parameter paths, reading mmcv configs, and writing exported parameter directories
(`segvit-convert`, `python -m segvit_jax.convert`).
"""
