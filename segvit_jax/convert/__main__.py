"""`python -m segvit_jax.convert`: the same as `segvit-convert`."""

from segvit_jax.convert import checkpoints

if __name__ == '__main__':
  checkpoints.run()
