"""Convergence (Liger-Kernel style): 20 AdamW steps on real text with inversion track the same coupled model
trained with ordinary autograd, step by step, to fp32 round-off."""

import pytest
import torch

import revcompile
from conftest import count_reversible_nodes, rel_err
from revcompile.data import VOCAB, byte_batches, stdlib_text
from revcompile.demo import train_losses
from revcompile.models import tiny_model

STEPS = 20
LOSS_TOLERANCE = 1e-5  # relative, every step
PARAM_TOLERANCE = 1e-4  # relative (norm of difference / norm of reference), worst parameter


def converted_model() -> torch.nn.Module:
    """A fresh, seeded, converted 3-layer Mixtral over bytes, in training mode."""
    model = revcompile.make_reversible(tiny_model("mixtral", num_hidden_layers=3, vocab_size=VOCAB))
    model.config.use_cache = False
    return model.train()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return byte_batches(stdlib_text(["json", "textwrap"]), batch=4, seq=64, count=STEPS)


@pytest.fixture(scope="module")
def reference(batches):
    """(losses, final parameters) of the converted model trained under disable_inversion()."""
    model = converted_model()
    losses = train_losses(model, batches, reference=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def divergence(model: torch.nn.Module, batches, reference) -> tuple[float, float]:
    """Train `model` with inversion; (worst relative loss difference over the steps, worst parameter error)."""
    ref_losses, ref_params = reference
    losses = train_losses(model, batches, reference=False)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    param_err = max(rel_err(p.detach(), ref_params[n]) for n, p in model.named_parameters())
    return loss_diff, param_err


def test_training_with_inversion_tracks_the_reference(batches, reference):
    model = converted_model()
    assert count_reversible_nodes(model(batches[0], labels=batches[0]).loss) == 3, "inversion must run"
    with revcompile.disable_inversion():
        assert count_reversible_nodes(model(batches[0], labels=batches[0]).loss) == 0
    loss_diff, param_err = divergence(model, batches, reference)
    assert loss_diff < LOSS_TOLERANCE
    assert param_err < PARAM_TOLERANCE
    ref_losses = reference[0]
    assert sum(ref_losses[-5:]) / 5 < sum(ref_losses[:5]) / 5 - 0.5, "the loss must fall, or the test is vacuous"


def test_a_wrong_inverse_diverges(batches, reference, wrong_undo):
    """The comparison above can fail: a 1e-3 error in one undo moves training outside both tolerances."""
    loss_diff, param_err = divergence(converted_model(), batches, reference)
    assert loss_diff > LOSS_TOLERANCE and param_err > PARAM_TOLERANCE
