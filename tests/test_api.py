"""The Python API: conversion in place, undo, inference, and clear errors that leave the model unchanged."""

import threading

import pytest
import torch
from torch import nn

import revcompile
from revcompile.errors import RevcompileError
from conftest import lm_loss, make_model, token_batch


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_make_reversible_is_in_place_and_keeps_names():
    model = make_model("qwen2_moe")
    keys = list(model.state_dict())
    cls = type(model.model.layers[0])
    assert revcompile.make_reversible(model) is model
    assert list(model.state_dict()) == keys
    assert isinstance(model.model.layers[0], cls) and type(model.model.layers[0]) is not cls
    assert len(revcompile.converted_layers(model)) == 3


def test_undo_restores_the_original_function():
    model = make_model("mixtral")
    ids = token_batch(model)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        revcompile.make_reversible(model)
        converted = model(ids).logits
        revcompile.undo(model)
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.equal(before, converted)
    assert not revcompile.converted_layers(model)
    revcompile.make_reversible(model)  # converting again after undo works


def test_single_layer_conversion_is_exact():
    """With one layer the symplectic opening and merge reproduce the original function (see schemes/symplectic)."""
    model = make_model("olmoe", layers=1)
    ids = token_batch(model)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        revcompile.make_reversible(model)
        assert torch.allclose(model(ids).logits, before, rtol=1e-10, atol=1e-10)


def test_eval_and_no_grad_run_no_inversion(monkeypatch):
    """Eval mode with gradients enabled (a loop that forgot model.train() after evaluating) runs without inversion,
    as Hugging Face checkpointing does, and says so once."""
    from revcompile.runtime import layer as layer_module

    monkeypatch.setattr(layer_module, "_state", threading.local())  # (this thread's notice not yet given)
    model = revcompile.make_reversible(make_model("mixtral"))
    ids = token_batch(model)
    model.eval()
    with pytest.warns(UserWarning, match=r"eval mode with gradients enabled.*model\.train\(\)"):
        assert lm_loss(model, ids).grad_fn.name() != "ReversibleCouplingBackward"
    from conftest import count_reversible_nodes

    assert count_reversible_nodes(lm_loss(model, ids)) == 0
    model.train()
    with torch.no_grad():
        assert lm_loss(model, ids).grad_fn is None


def test_a_model_that_changes_the_hidden_state_between_layers_says_where():
    """RWKV halves its hidden state every `rescale_every` (6) layers in eval mode, where the probe runs: no stack, and
    the error says which layers are not chained; without the rescaling (rescale_every=0) all 8 convert."""
    with pytest.raises(RevcompileError, match=r"no layer stack.*layer 5's output is not what layer 6 is called on"):
        revcompile.make_reversible(make_model("rwkv", torch.float32, layers=8))
    model = make_model("rwkv", torch.float32, layers=8)
    model.config.rescale_every = 0
    assert len(revcompile.converted_layers(revcompile.make_reversible(model))) == 8


def test_a_model_on_the_meta_device_converts_once_materialized():
    """Built on the meta device (as for FSDP2 at scale): a clear error that says to materialize it first; after
    to_empty and an initialisation, converted, then loaded with the real weights, it computes what the model converted
    with them does (the analysis needs finite values, not which)."""
    real = make_model("mixtral", torch.float32, layers=2)
    with torch.device("meta"):
        model = type(real)(real.config)
    with pytest.raises(RevcompileError, match="meta device .*materialize it first"):
        revcompile.make_reversible(model)
    model.to_empty(device="cpu")  # (uninitialised memory: initialised before the analysis runs the model)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))  # (what uninitialised memory may hold)
    with pytest.raises(RevcompileError, match="gave nan in the hidden states .*initialise or load them first"):
        revcompile.make_reversible(model)
    model.init_weights()
    for name, buffer in real.named_buffers():  # (the rotary frequencies: not in the state dict)
        model.get_buffer(name).copy_(buffer)
    revcompile.make_reversible(model)
    model.load_state_dict(real.state_dict())
    revcompile.make_reversible(real)
    ids = token_batch(real)
    assert torch.equal(lm_loss(model, ids), lm_loss(real, ids))


@pytest.mark.parametrize("bad, match", [
    (lambda: revcompile.make_reversible("mixtral"), "expected a torch.nn.Module"),
    (lambda: revcompile.make_reversible(nn.Linear(4, 4)), "no token embedding"),
    (lambda: revcompile.make_reversible(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))), "no layer stack"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(RevcompileError, match=match):
        bad()


def test_unknown_scheme_and_second_conversion_leave_model_unchanged():
    model = make_model("mixtral")
    before = state(model)
    with pytest.raises(RevcompileError, match="unknown scheme 'nope'; choose one of"):
        revcompile.make_reversible(model, scheme="nope")
    assert not revcompile.converted_layers(model)
    revcompile.make_reversible(model)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(RevcompileError, match="already converted"):
        revcompile.make_reversible(model)
    assert classes == [type(m) for m in model.modules()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_undo_of_an_unconverted_model_is_an_error():
    with pytest.raises(RevcompileError, match="not converted"):
        revcompile.undo(make_model("llama"))


def test_backward_twice_is_a_clear_error():
    model = revcompile.make_reversible(make_model("mixtral"))
    model.train()
    loss = lm_loss(model, token_batch(model))
    loss.backward(retain_graph=True)
    with pytest.raises(RevcompileError, match="retain_graph"):
        loss.backward()
