"""Pretrain a tiny Mixtral-style MoE on the Python standard library's own sources (bytes), on CPU, and cache it.

    python examples/pretrain_tiny_moe.py                  # ~2 minutes on 2 cores -> ~/.cache/revcompile/tiny-moe-stdlib

Later runs load the cache (`load_pretrained()`); nothing is downloaded. The fine-tuning example starts from it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.data import VOCAB, byte_batches, stdlib_text  # noqa: E402
from revcompile.models import tiny_model  # noqa: E402

CACHE = os.path.join(os.path.expanduser(os.environ.get("REVCOMPILE_CACHE", "~/.cache/revcompile")), "tiny-moe-stdlib")
PRETRAIN_MODULES = ["json", "email", "http", "argparse", "csv", "dataclasses", "textwrap", "logging", "collections"]
CONFIG = dict(num_hidden_layers=8, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=VOCAB, attn_implementation="sdpa")


def pretrain(steps: int = 800, batch: int = 16, seq: int = 128, lr: float = 2e-3, path: str = CACHE) -> str:
    model = tiny_model("mixtral", seed=0, **CONFIG)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(byte_batches(stdlib_text(PRETRAIN_MODULES), batch, seq, steps, seed=0), desc="pretraining")
    for ids in bar:
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(path)
    return path


def load_pretrained(path: str = CACHE) -> torch.nn.Module:
    """The cached pretrained model (pretraining it first when the cache is empty)."""
    from transformers import AutoModelForCausalLM

    if not os.path.exists(os.path.join(path, "config.json")):
        pretrain(path=path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", experts_implementation="eager")
    model.config.use_cache = False
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=CACHE)
    args = parser.parse_args()
    print("saved to", pretrain(steps=args.steps, path=args.out))
