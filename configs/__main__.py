"""Prints the directory of the installed configs: segvit-train --config=DIR/ade20k_large.py."""

import os

print(os.path.dirname(os.path.abspath(__file__)))
