"""Benchmarks (speed targets live here, not in tests). Run from the repository root as modules,
`python -m bench.<name>`, so that the root's `segvit_jax` and `segvit_reference` are imported."""
