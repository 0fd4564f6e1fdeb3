"""Ahead-of-time compiling for machines you do not have: TPU topologies, compiled memory and
FLOPs, HLO costs, and the paper's parameter and FLOP counts (`segvit-compile`, `segvit-summary`).
"""
