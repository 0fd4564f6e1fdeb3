"""`python -m segvit_jax.export`: the same as `segvit-export`."""

from segvit_jax.export import artifacts

if __name__ == '__main__':
  artifacts.run()
