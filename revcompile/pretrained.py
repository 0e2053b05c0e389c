"""A tiny Mixtral-style MoE pretrained by the project on real text (the standard library's sources, as bytes), on
CPU, cached locally: a model whose branches do real work, so conversions and schemes can be judged on it.

    python examples/pretrain_tiny_moe.py      # ~2 minutes on 2 cores -> ~/.cache/revcompile/tiny-moe-stdlib

Example:
    >>> model = load_pretrained()                                   # pretrains first when the cache is empty
    >>> small = pretrain(steps=60, num_hidden_layers=2, hidden_size=64)   # a faster variant, not cached
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from .data import VOCAB, byte_batches, stdlib_text
from .models import tiny_model

CACHE = os.path.join(os.path.expanduser(os.environ.get("REVCOMPILE_CACHE", "~/.cache/revcompile")), "tiny-moe-stdlib")
PRETRAIN_MODULES = ["json", "email", "http", "argparse", "csv", "dataclasses", "textwrap", "logging", "collections"]
CONFIG = dict(num_hidden_layers=8, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=VOCAB, attn_implementation="sdpa")


def pretrain(steps: int = 800, batch: int = 16, seq: int = 128, lr: float = 2e-3, path: str | None = None,
             progress: bool = True, **config) -> torch.nn.Module:
    """Train a tiny Mixtral (CONFIG, updated by `config`) on standard-library sources; save it to `path` if given."""
    model = tiny_model("mixtral", seed=0, **{**CONFIG, **config})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(byte_batches(stdlib_text(PRETRAIN_MODULES), batch, seq, steps, seed=0), desc="pretraining",
               disable=not progress)
    for ids in bar:
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if path is not None:
        model.save_pretrained(path)
    return model.eval()


def load_pretrained(path: str = CACHE) -> torch.nn.Module:
    """The cached pretrained model (pretraining it first when the cache is empty)."""
    from transformers import AutoModelForCausalLM

    if not os.path.exists(os.path.join(path, "config.json")):
        pretrain(path=path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", experts_implementation="eager")
    model.config.use_cache = False
    return model
