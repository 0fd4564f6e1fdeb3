"""Ahead-of-time compiling for machines you do not have: TPU topologies, compiled memory and
FLOPs, HLO costs, and the paper's parameter and FLOP counts (`segvit-compile`, `segvit-summary`).

  targets.py     TPU chip catalogue, topology names -> Target, a target's devices
  programs.py    the train and eval steps a run compiles, and their abstract inputs
  measure.py     compiling one step: memory, FLOPs and bytes (hlo_cost.py), the roofline
  max_batch.py   the search for the largest train batch that fits
  analysis.py    a config on a target: check, compile, measure (the --json object)
  report.py      the printed report, and the one-line error for what does not fit
  compile.py     the `segvit-compile` command line
  flops.py       the FLOP model: the paper's (fvcore) count, hardware FLOPs of a step
  summary.py     the `segvit-summary` command line: parameters and GFLOPs
"""
