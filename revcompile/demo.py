"""`revcompile demo`: the README's main job, on an embedded default (a tiny Mixtral from a config, no download).

It converts the model, shows the pairs found, trains a few steps with inversion next to the same coupled model
under ordinary autograd (the losses match), and measures one training step's real peak memory against plain
training and Hugging Face activation checkpointing, each in a child process. Step time is counted in CPU seconds
of that process, one thread, the fastest of 3 steps: wall-clock time on a shared machine moves with the other
processes' load (ratios from 1.1 to 6 were seen), CPU seconds of one thread hardly do.

Example:
    $ revcompile demo
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import torch
from tabulate import tabulate
from tqdm import tqdm

import revcompile

from .data import byte_batches, stdlib_text
from .measure import MEMORY_CONFIG, METHOD_LABELS, measure_step
from .models import tiny_model

TIMED_STEPS = 3  # the time figure is the fastest of these (each in CPU seconds of one thread)


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


def run_demo(depth: int = 8, steps: int = 4) -> None:
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

    shape = {k: MEMORY_CONFIG[k] for k in ("batch", "seq")}
    print("\nmeasuring peak memory and time, one child process per method, side by side ...", flush=True)
    with ThreadPoolExecutor(3) as pool:  # CPU seconds of one thread do not depend on what runs next to it
        rows = list(pool.map(lambda method: measure_step(method, depth, steps=TIMED_STEPS, threads=1,
                                                         **MEMORY_CONFIG), ("plain", "checkpointing", "revcompile")))
    base = rows[0]
    print(f"\none training step, tiny Mixtral, {depth} layers, hidden {MEMORY_CONFIG['hidden_size']}, "
          f"batch {shape['batch']} x {shape['seq']} tokens, fp32, CPU, 1 thread; peak RSS above the pre-step level; "
          f"time in CPU seconds, fastest of {TIMED_STEPS} steps")
    print(tabulate([[METHOD_LABELS[r["method"]], r["peak_mb"], r["peak_mb"] / base["peak_mb"], r["step_cpu_s"],
                     r["step_cpu_s"] / base["step_cpu_s"]] for r in rows],
                   headers=["method", "peak MB", "memory vs plain", "step CPU s", "time vs plain"], floatfmt=".2f"))
