"""Pretrain a tiny Mixtral-style MoE on the Python standard library's own sources (bytes), on CPU, and cache it.

    python examples/pretrain_tiny_moe.py                  # ~2 minutes on 2 cores -> ~/.cache/revcompile/tiny-moe-stdlib

Later runs load the cache (`revcompile.pretrained.load_pretrained()`); nothing is downloaded. The fine-tuning
example and bench/schemes.py start from it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.pretrained import CACHE, pretrain  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=CACHE)
    args = parser.parse_args()
    pretrain(steps=args.steps, path=args.out)
    print("saved to", args.out)
