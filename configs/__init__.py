"""The paper configs (one file per setting) and `synthetic.py`, the CPU demo.

In a clone of the repository they are `configs/X.py`. Installed with pip they are the package
`segvit_jax.configs`: `python -m segvit_jax.configs` prints their directory, for
`--config=DIR/X.py`.
"""
