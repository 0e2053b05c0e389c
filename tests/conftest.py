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
# Measured (test_gradients, every model, model seeds 0-2 with 2 threads and seed 0 with 1 thread): worst gradient
# error 1.3e-14 in fp64 and 9.2e-7 in fp32, so these bounds leave a margin of 1e6 and 100. (phimoe once gave 0.97 at
# a model seed: its router samples experts in training and the two runs drew other numbers; loss_and_grads seeds
# both now, and phimoe fp32 over model seeds 0-5 measures at most 4.8e-7.)
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


def loss_and_grads(model, ids, reference: bool, seed: int | None = 0):
    """(loss, reversible nodes, {name: grad}) of one backward; `reference` runs it under disable_inversion().

    NOTE: seeded, so that a run and its reference draw the same random numbers: PhiMoE's router samples its experts
    in training (sparsemixer), and an unseeded pair of runs picks other experts in one of them now and then.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with revcompile.disable_inversion() if reference else nullcontext():
        loss = lm_loss(model, ids)
        nodes = count_reversible_nodes(loss)
        loss.backward()
    return loss.detach(), nodes, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def wrong_undo(monkeypatch):
    """Plant a relative error of 1e-3 in every step's undo, float and exact (integer) streams alike."""
    from revcompile.runtime.streams import ExactStreams, FloatStreams

    def plant(cls):
        original = cls.undo

        def undo(self, step, state, out):
            old = original(self, step, state, out)
            return (old * (1 + 1e-3)).round().to(old.dtype) if not old.is_floating_point() else old * (1 + 1e-3)
        monkeypatch.setattr(cls, "undo", undo)

    plant(FloatStreams)
    plant(ExactStreams)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
