"""Shared helpers: the model zoo, losses and gradients with and without inversion, relative errors."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import revcompile  # noqa: E402
from revcompile.models import TINY_FAMILIES, tiny_model  # noqa: E402
from revcompile.zoo import reversible_nodes  # noqa: E402
from plain_models import PlainLM  # noqa: E402

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")
ALL_MODELS = (*TINY_FAMILIES, "plain")
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


def make_model(name: str, dtype: torch.dtype = torch.float64, layers: int = 3, seed: int = 0, **overrides):
    if name == "plain":
        torch.manual_seed(seed)
        return PlainLM(depth=layers, **overrides).to(dtype)
    return tiny_model(name, seed=seed, dtype=dtype, num_hidden_layers=layers, **overrides)


def token_batch(model, batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else 64
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    hf = hasattr(getattr(model, "module", model), "config")  # (DistributedDataParallel keeps the model in .module)
    out = model(ids, labels=ids) if hf else model(ids)
    if hasattr(out, "loss"):
        return out.loss
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def count_reversible_nodes(loss: torch.Tensor) -> int:
    """How many reversible Function nodes the autograd graph of `loss` holds (0 means inversion never ran)."""
    return len(reversible_nodes(loss))


def loss_and_grads(model, ids, reference: bool):
    """(loss, reversible nodes, {name: grad}) of one backward; `reference` runs it under disable_inversion()."""
    model.zero_grad(set_to_none=True)
    with revcompile.disable_inversion() if reference else nullcontext():
        loss = lm_loss(model, ids)
        nodes = count_reversible_nodes(loss)
        loss.backward()
    return loss.detach(), nodes, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
