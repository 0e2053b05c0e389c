"""Gradients with inversion equal those of the same coupled model under ordinary autograd (disable_inversion)."""

import copy

import pytest
import torch

import revcompile
from revcompile.runtime.slicing import SEQUENCE, TOKEN, Split
from conftest import ALL_MODELS, TOLERANCE, loss_and_grads, make_model, rel_err, token_batch

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe", "glm4_moe",
       "plain"}


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "float"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_match_reference(name, dtype, exact):
    model = revcompile.make_reversible(make_model(name, dtype), recompute_chunks=1, exact=exact)
    model.train()
    ids = token_batch(model)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, ref_nodes, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and ref_nodes == 0, "inversion must run in the first pass and not in the reference"
    assert rel_err(loss, ref_loss) < TOLERANCE[dtype]
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    worst = max(grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    assert rel_err(grads[worst], ref_grads[worst]) < TOLERANCE[dtype], worst
    if name in MOE:
        experts = [n for n in grads if "expert" in n]
        assert experts and all(grads[n].abs().sum() > 0 for n in experts)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_chunked_recompute_matches_reference(name):
    """The default recompute of FFN/MoE branches in slices of the sequence (4 here, sequence of 8).

    NOTE: 1e-6, not 1e-8: DeepSeek-V3's and GLM-4-MoE's routers compute in float32 even in a float64 model, and
    splitting the sum over tokens reorders those float32 additions (router-weight gradients move by ~1e-7).
    """
    model = revcompile.make_reversible(make_model(name, torch.float64), recompute_chunks=4)
    assert all(layer._revcompile.splits == {"attn": Split(SEQUENCE, 4), "mlp": Split(TOKEN, 4)}
               for layer in revcompile.converted_layers(model))
    model.train()
    ids = token_batch(model)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, _, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and rel_err(loss, ref_loss) < 1e-10
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < 1e-6


FP32_ROUTERS = ("deepseek_v3", "glm4_moe")  # routers computing in float32 even in a float64 model


@pytest.mark.parametrize("name", [*ALL_MODELS, "post-norm", "parallel"])
def test_slices_give_the_one_piece_result(name):
    """Attention by slices of the batch and the MoE by slices of the sequence (recompute_chunks=4, batch of 3) train
    as the same model run in one piece (recompute_chunks=1): the slices' context rows, outputs and gradients land
    where they belong. Layers converted whole (post-norm) run by slices of the batch. Measured over model seeds 0-2
    with 1 and 2 threads: at most 1.2e-15, and 1.2e-7 where the router computes in float32 (a sum over fewer tokens
    rounds otherwise); bounds 1e-12 and 1e-6."""
    from plain_models import ParallelBlock, PlainLM, PostNormBlock

    if name in ("post-norm", "parallel"):
        base = PlainLM(block=PostNormBlock if name == "post-norm" else ParallelBlock).double()
    else:
        base = make_model(name, torch.float64)
    sliced = revcompile.make_reversible(copy.deepcopy(base), recompute_chunks=4).train()
    whole = revcompile.make_reversible(copy.deepcopy(base), recompute_chunks=1).train()
    assert any(split.kind == SEQUENCE for split in revcompile.converted_layers(sliced)[0]._revcompile.splits.values())
    ids = token_batch(sliced, batch=3)
    loss, _, grads = loss_and_grads(sliced, ids, reference=False)
    ref_loss, _, ref_grads = loss_and_grads(whole, ids, reference=False)
    bound = 1e-6 if name in FP32_ROUTERS else 1e-12
    assert rel_err(loss, ref_loss) < bound and max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < bound


def test_sliced_recompute_hands_branches_contiguous_inputs():
    """A MoE that calls `.view` on its input (flex_olmo's does) is recomputed on sequence slices of a batch of 2."""
    from plain_models import FlatMoEBlock, PlainLM

    model = revcompile.make_reversible(PlainLM(block=FlatMoEBlock).double(), recompute_chunks=4).train()
    assert all(layer._revcompile.splits == {"attn": Split(SEQUENCE, 4), "mlp": Split(TOKEN, 4)}
               for layer in revcompile.converted_layers(model))
    ids = token_batch(model)
    _, nodes, grads = loss_and_grads(model, ids, reference=False)
    _, _, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < 1e-8


def test_a_no_grad_block_in_a_layers_own_code_stays_without_gradient():
    """torch.fx drops a `with torch.no_grad():` block from its trace, and the gate computed in it carried gradient
    (relative error 2.4e-2 in fp64): the tracer records it (passes/grad_mode.py). A copy converted with max_run=1,
    which computes the original layers, has the original model's gradients; the reversible model has its
    reference's."""
    from plain_models import NoGradGateBlock, PlainLM

    original = PlainLM(block=NoGradGateBlock).double()
    ids = token_batch(original)
    _, _, expected = loss_and_grads(original, ids, reference=False)
    one_layer_runs = revcompile.make_reversible(copy.deepcopy(original), max_run=1, example_inputs=ids)
    _, nodes, grads = loss_and_grads(one_layer_runs, ids, reference=False)
    assert nodes == 3 and max(rel_err(grads[n], expected[n]) for n in expected) < 1e-12
    model = revcompile.make_reversible(copy.deepcopy(original), example_inputs=ids)
    _, nodes, grads = loss_and_grads(model, ids, reference=False)
    _, _, reference = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and max(rel_err(grads[n], reference[n]) for n in reference) < 1e-8


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "float"])
def test_a_wrong_inverse_is_caught(exact, request):
    """The comparison above can fail: break the undo of every step and gradients move far off."""
    model = revcompile.make_reversible(make_model("mixtral"), exact=exact)
    model.train()
    ids = token_batch(model)
    _, _, ref = loss_and_grads(model, ids, reference=True)
    request.getfixturevalue("wrong_undo")
    _, _, broken = loss_and_grads(model, ids, reference=False)
    assert max(rel_err(broken[n], ref[n]) for n in ref) > 1e-6


def test_dropout_rng_is_replayed():
    model = make_model("mixtral", layers=2, attention_dropout=0.3)
    revcompile.make_reversible(model)
    model.train()
    ids = token_batch(model)
    torch.manual_seed(5)
    loss, _, grads = loss_and_grads(model, ids, reference=False)
    torch.manual_seed(5)
    ref_loss, _, ref_grads = loss_and_grads(model, ids, reference=True)
    assert rel_err(loss, ref_loss) < 1e-8
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) < 1e-8


def test_invert_false_trains_with_ordinary_autograd():
    model = revcompile.make_reversible(make_model("olmoe"), invert=False)
    model.train()
    loss, nodes, grads = loss_and_grads(model, token_batch(model), reference=False)
    assert nodes == 0 and grads
