"""Conversion (Gal et al. 2025, section 4): bring a converted model back to the original's function by KL
distillation on next-token distributions.

Schemes other than fixed_point change what the layers compute; a short distillation against the unconverted
model (run without grad) recovers most of it. The converted model trains reversibly while it distills, so this
costs no more memory than fine-tuning it.

Example:
    >>> original = copy.deepcopy(model).eval()
    >>> revcompile.make_reversible(model, "midpoint")
    >>> kl_before = revcompile.kl_divergence(original, model, held_out)
    >>> history = revcompile.distill(model, original, train_batches, steps=200)
    >>> revcompile.kl_divergence(original, model, held_out) < kl_before
    True
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import RevcompileError


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor):
        raise RevcompileError(f"{type(model).__name__} returned {type(out).__name__}; distillation needs logits (a "
                              "tensor, or an output with .logits)")
    return logits


def token_kl(original_logits: torch.Tensor, converted_logits: torch.Tensor) -> torch.Tensor:
    """KL(original || converted) of the next-token distributions, averaged over tokens (nats)."""
    p = F.log_softmax(original_logits.float(), dim=-1)
    q = F.log_softmax(converted_logits.float(), dim=-1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()


def kl_divergence(original: nn.Module, converted: nn.Module, batches: Iterable[Any]) -> float:
    """Mean KL(original || converted) over `batches` (token ids, or dicts of model keyword arguments), no grad."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(token_kl(_logits(original, batch), _logits(converted, batch)))
            count += 1
    if not count:
        raise RevcompileError("kl_divergence() got no batches")
    return total / count


def distill(model: nn.Module, original: nn.Module, batches: Iterable[Any], steps: int | None = None,
            lr: float = 3e-4, optimizer: torch.optim.Optimizer | None = None, progress: bool = True) -> list[float]:
    """Train `model` (converted) to match `original`'s next-token distributions; returns the KL of each step.

    batches:   token ids (or dicts of model keyword arguments); the first `steps` are used (all when None).
    lr:        AdamW learning rate over every trainable parameter, when no `optimizer` is given.
    The original runs in eval mode without grad; `model` is left in training mode.
    """
    if model is original:
        raise RevcompileError("distill() needs the original model as a separate copy (copy.deepcopy before "
                              "make_reversible)")
    if steps is not None and steps < 1:
        raise RevcompileError(f"steps must be a positive integer, got {steps!r}")
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    original.eval()
    model.train()
    history = []
    bar = tqdm(islice(batches, steps), total=steps, desc="distilling", disable=not progress)
    for batch in bar:
        with torch.no_grad():
            target = _logits(original, batch)
        loss = token_kl(target, _logits(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    if not history:
        raise RevcompileError("distill() got no batches")
    return history
