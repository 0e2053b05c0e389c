"""`revcompile demo`: the README's main job, on an embedded default (a tiny Mixtral from a config, no download).

It converts the model, shows the pairs found, trains a few steps with inversion next to the same coupled model
under ordinary autograd (the losses match), and measures one training step's real peak memory against plain
training and Hugging Face activation checkpointing, each in a child process.
"""

from __future__ import annotations

import copy

import torch
from tabulate import tabulate
from tqdm import tqdm

import revcompile

from .data import byte_batches, stdlib_text
from .measure import MEMORY_CONFIG, METHOD_LABELS, measure_step
from .models import tiny_model


def train_losses(model: torch.nn.Module, batches: list[torch.Tensor], reference: bool) -> list[float]:
    """Losses of a few AdamW steps; `reference` runs them under disable_inversion()."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in batches:
        with revcompile.disable_inversion() if reference else torch.enable_grad():
            loss = model(ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_demo(depth: int = 8, steps: int = 8) -> None:
    config = {k: v for k, v in MEMORY_CONFIG.items() if k not in ("batch", "seq", "model_type")}
    model = tiny_model("mixtral", num_hidden_layers=depth, attn_implementation="sdpa", **config)
    model.config.use_cache = False
    reference = copy.deepcopy(model)
    revcompile.make_reversible(model)
    revcompile.make_reversible(reference, invert=False)
    print(model._revcompile_plan, end="\n\n")

    batches = byte_batches(stdlib_text(["json", "textwrap", "argparse"]), batch=4, seq=128, count=steps)
    model.train(), reference.train()
    inverted = train_losses(model, tqdm(batches, desc="training, reversible"), reference=False)
    stored = train_losses(reference, tqdm(batches, desc="training, reference"), reference=True)
    print("\nloss on the standard library's own sources (bytes), same start, same batches:")
    print(tabulate([[i + 1, a, b, abs(a - b)] for i, (a, b) in enumerate(zip(inverted, stored))],
                   headers=["step", "loss (revcompile)", "loss (ordinary autograd)", "|diff|"], floatfmt=".6g"))

    rows = []
    shape = {k: MEMORY_CONFIG[k] for k in ("batch", "seq")}
    for method in tqdm(("plain", "checkpointing", "revcompile"), desc="measuring peak memory"):
        rows.append(measure_step(method, depth, **MEMORY_CONFIG))
    base = rows[0]
    print(f"\none training step, tiny Mixtral, {depth} layers, hidden {MEMORY_CONFIG['hidden_size']}, "
          f"batch {shape['batch']} x {shape['seq']} tokens, fp32, CPU; peak RSS above the pre-step level")
    print(tabulate([[METHOD_LABELS[r["method"]], r["peak_mb"], r["peak_mb"] / base["peak_mb"],
                     r["step_s"] / base["step_s"]] for r in rows],
                   headers=["method", "peak MB", "memory vs plain", "time vs plain"], floatfmt=".2f"))
