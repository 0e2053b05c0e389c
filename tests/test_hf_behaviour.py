"""A converted model still behaves as a Hugging Face model: routing and RNG replay, masks, experts kernels,
generation with a KV cache, save/load round trips, Trainer, mixed precision, and check()."""

import copy
import json
import math
import warnings
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import revcompile
from conftest import TOLERANCE, loss_and_grads, make_model, rel_err, token_batch


def assert_matches_reference(model, tolerance, **forward_kwargs):
    ids = forward_kwargs.pop("ids", None)
    ids = token_batch(model, batch=2, seq=16) if ids is None else ids
    model.train()
    torch.manual_seed(7)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    torch.manual_seed(7)
    ref_loss, _, ref = loss_and_grads(model, ids, reference=True)
    assert nodes > 0
    assert rel_err(loss, ref_loss) < tolerance
    worst = max(ref, key=lambda n: rel_err(grads[n], ref[n]))
    assert rel_err(grads[worst], ref[worst]) < tolerance, worst


def near_tied_mixtral():
    """A tiny fp32 Mixtral (6 layers) whose routers' first two experts are tied to 1e-7."""
    model = make_model("mixtral", torch.float32, layers=6)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.gate.weight
            weight[1] = weight[0] + 1e-7 * torch.randn_like(weight[0])
    return model


def test_near_tied_routers_replay_the_forward_choice():
    """Mixtral's top-2 routers with their first two experts tied to 1e-7, fp32 float streams: the rebuilt inputs
    flip some choices unless they are replayed (measured: 6e-7 off the reference replayed, 0.13 not)."""
    model = revcompile.make_reversible(near_tied_mixtral())
    assert_matches_reference(model, 1e-4, ids=token_batch(model, batch=4, seq=64))


@pytest.mark.parametrize("select", ["argmax", "argmin", "max", "min", "sort", "argsort"])
def test_every_kind_of_selection_is_replayed(select):
    """A top-1 router that picks with argmax (Switch Transformer's), sort, ... between two near-tied experts, fp32
    float streams: the rebuilt inputs are ~1e-7 off, which flips some choices unless they are replayed.

    Measured (4 seeds, 6 layers, 256 tokens): worst gradient 3e-7 off the reference replayed, 0.17-0.55 when
    argmax, argmin, min, sort or argsort was not recorded; the bound 1e-4 sits between with a factor of 250 each way.
    """
    from plain_models import near_tied_top1_lm

    model = revcompile.make_reversible(near_tied_top1_lm(select))
    assert_matches_reference(model, 1e-4, ids=torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("select", ["topk", "argmax"])
def test_later_steps_record_and_replay_routing_inside_the_router_alone(select, monkeypatch):
    """A branch's first training call records its selections over every op and notes where they were made; later
    calls record (forward) and replay (backward) inside that module alone: Hugging Face Mixtral's router
    `mlp.gate`, a plain top-1 MoE's own forward (`ff`); attention branches not at all. The second step, recorded
    and replayed there, still matches the reference with near-tied routers on fp32 float streams (replay switched
    off in the second step: 0.13 and 0.37-0.73 off; replayed 5e-7 to 7e-7 over 3 seeds and 1 and 2 threads; bound
    1e-4). Routers replaced
    after that are found anew (recorded at the replaced ones, nothing was recorded: 0.13 off)."""
    from plain_models import near_tied_top1_lm
    from revcompile.runtime import replay

    if select == "topk":
        model, routers = near_tied_mixtral(), lambda m: [layer.mlp.gate for layer in m.model.layers]
    else:
        model, routers = near_tied_top1_lm(select), lambda m: [block.ff for block in m.blocks]
    revcompile.make_reversible(model)
    ids = token_batch(model, batch=4, seq=64) if select == "topk" else \
        torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))
    scoped, inside = [], replay._inside
    monkeypatch.setattr(replay, "_inside", lambda module, mode: scoped.append((module, type(mode))) or
                        inside(module, mode))
    assert_matches_reference(model, 1e-4, ids=ids)
    assert scoped == []  # the first call of each branch: over every op
    assert_matches_reference(model, 1e-4, ids=ids)
    assert scoped == [*((router, replay.RoutingRecorder) for router in routers(model)),
                      *((router, replay.RoutingReplayer) for router in reversed(routers(model)))]
    if select == "topk":  # routers replaced after the first steps (an adapter library wrapping them): learned anew
        for layer in model.model.layers:
            layer.mlp.gate = copy.deepcopy(layer.mlp.gate)
        scoped.clear()
        assert_matches_reference(model, 1e-4, ids=ids)
        assert scoped == []
        assert_matches_reference(model, 1e-4, ids=ids)
        assert [module for module, _ in scoped] == [*routers(model), *reversed(routers(model))]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_aux_loss_router_logits_carry_gradient_and_count_once(name):
    model = revcompile.make_reversible(make_model(name, torch.float64, router_aux_loss_coef=0.5))
    model.train()
    ids = token_batch(model, batch=2, seq=16)

    def step(reference):
        model.zero_grad(set_to_none=True)
        with revcompile.disable_inversion() if reference else torch.enable_grad():
            out = model(ids, labels=ids, output_router_logits=True)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    out, grads = step(False)
    ref, ref_grads = step(True)
    assert len(out.router_logits) == len(ref.router_logits) == 3  # once per layer, never again in the recompute
    assert all(r.grad_fn is not None for r in out.router_logits)
    assert rel_err(out.aux_loss, ref.aux_loss) < 1e-8 and rel_err(out.loss, ref.loss) < 1e-8
    routers = [n for n in ref_grads if "gate" in n and "proj" not in n and "expert" not in n]
    assert routers and max(rel_err(grads[n], ref_grads[n]) for n in routers) < 1e-8
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_weights_carry_their_gradient(dtype):
    """output_attentions=True in training (eager attention): the weights Hugging Face collects from inside the
    attention branch were recorded in the no-grad forward, so a loss on them (attention transfer) trained nothing
    through converted layers, silently. Returned by the reversible Function as the router logits are, they carry
    gradient: with a loss on them and the load-balancing loss, every gradient equals the reference's bit for bit
    (fp64 and bf16), each layer's weights collected once."""
    model = revcompile.make_reversible(make_model("mixtral", dtype, layers=3))
    ids = token_batch(model)

    def step(reference: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with revcompile.disable_inversion() if reference else nullcontext():
            out = model(ids, labels=ids, output_attentions=True, output_router_logits=True)
            (out.loss + out.aux_loss + sum(a.float().pow(2).sum() for a in out.attentions)).backward()
        return out.attentions, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (attentions, grads), (reference_attentions, reference) = step(False), step(True)
    assert len(attentions) == 3 and all(a.requires_grad for a in attentions)
    assert all(torch.equal(a, b) for a, b in zip(attentions, reference_attentions))
    assert grads.keys() == reference.keys() and all(torch.equal(grads[n], reference[n]) for n in reference)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cross_attention_weights_carry_their_gradient(dtype):
    """The same for the cross-attention weights of a decoder reading encoder states (BART's causal LM, converted
    whole): gradients with a loss on them equal the reference's, relative to the largest gradient (fp64: measured
    1.6e-16, bound 1e-8; a key bias, whose true gradient is 0, is only rounding), bf16 bit for bit."""
    model = make_model("bart", dtype, layers=2, add_cross_attention=True, is_decoder=True)
    encoded = torch.randn(2, 5, model.config.d_model, dtype=dtype, generator=torch.Generator().manual_seed(3))
    ids = token_batch(model)
    revcompile.make_reversible(model, example_inputs=dict(input_ids=ids[:1], encoder_hidden_states=encoded[:1],
                                                          use_cache=False))

    def step(reference: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with revcompile.disable_inversion() if reference else nullcontext():
            out = model(input_ids=ids, encoder_hidden_states=encoded, labels=ids, output_attentions=True,
                        use_cache=False)
            (out.loss + sum(a.float().pow(2).sum() for a in out.cross_attentions)).backward()
        assert len(out.cross_attentions) == 2 and all(a.requires_grad for a in out.cross_attentions)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads, reference = step(False), step(True)
    largest = max(float(g.abs().max()) for g in reference.values())
    worst = max(float((grads[n] - reference[n]).abs().max()) for n in reference) / largest
    assert grads.keys() == reference.keys() and worst <= (1e-8 if dtype == torch.float64 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_hidden_states_are_hidden_states_with_their_gradient(dtype):
    """output_hidden_states=True (TRL's value and reward heads read hidden states; it was an error): between
    converted layers Hugging Face's hook records packed streams, which the next layer replaces by the hidden state
    they merge into. A loss on every intermediate hidden state trains like the coupled reference's (fp64: gradients
    equal to 1e-12, measured 0 over seeds 0-2 at 1 and 2 threads; bf16 exact streams: bit for bit); without that
    gradient reaching the reversible backward they are off by far more. In eval they equal training's, and with
    max_run=1 the unconverted model's."""
    model = revcompile.make_reversible(make_model("mixtral", dtype=dtype, layers=4))
    ids = token_batch(model)

    def step(reference: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with revcompile.disable_inversion() if reference else nullcontext():
            out = model(ids, labels=ids, output_hidden_states=True)
            (out.loss + sum((h.float() ** 2).mean() for h in out.hidden_states[1:-1])).backward()
        return [h.detach() for h in out.hidden_states], {n: p.grad for n, p in model.named_parameters()}

    hidden, grads = step(False)
    reference_hidden, reference = step(True)
    assert [h.shape for h in hidden] == [ids.shape + (model.config.hidden_size,)] * 5
    assert all(torch.equal(a, b) for a, b in zip(hidden, reference_hidden))
    bound = 1e-12 if dtype == torch.float64 else 0.0
    assert max(rel_err(grads[n].double(), reference[n].double()) for n in reference) <= bound
    with torch.no_grad():
        evaluated = model.eval()(ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(evaluated, hidden))
    if dtype == torch.float64:  # (measured 4.2e-17)
        original = make_model("mixtral", dtype=dtype, layers=4).eval()
        single = revcompile.make_reversible(make_model("mixtral", dtype=dtype, layers=4), max_run=1).eval()
        with torch.no_grad():
            expected = original(ids, output_hidden_states=True).hidden_states
            assert all(torch.allclose(a, b, rtol=0, atol=1e-12)
                       for a, b in zip(single(ids, output_hidden_states=True).hidden_states, expected))


def test_router_jitter_and_attention_dropout_are_replayed():
    model = make_model("mixtral", torch.float64, router_jitter_noise=0.2, attention_dropout=0.2)
    revcompile.make_reversible(model)
    assert_matches_reference(model, 1e-8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_masks(side):
    # float32: in float64 transformers' own eager attention turns fully padded rows into NaN (unconverted too)
    model = revcompile.make_reversible(make_model("qwen3_moe", torch.float32))
    ids = token_batch(model, batch=2, seq=12)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :5] = 0
    else:
        mask[0, -5:] = 0

    def loss_with_mask(reference):
        model.zero_grad(set_to_none=True)
        with revcompile.disable_inversion() if reference else torch.enable_grad():
            loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    loss, grads = loss_with_mask(False)
    ref_loss, ref = loss_with_mask(True)
    assert torch.isfinite(loss) and rel_err(loss, ref_loss) < 1e-4
    assert max(rel_err(grads[n], ref[n]) for n in ref) < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_run_attention_by_slices_of_the_batch(side):
    """The probe saw no padding mask; the first padded call finds the mask's batch rows and checks them, then attention
    runs a sequence at a time with its rows of the mask: loss and gradients as in one piece (recompute_chunks=1).
    Measured: 6.2e-7 at worst (qwen3_moe and mixtral, seeds 0-2, 1 and 2 threads), bound 1e-5; a mask sliced
    wrongly moves them by O(1)."""
    torch.manual_seed(0)
    base = make_model("qwen3_moe", torch.float32)
    sliced = revcompile.make_reversible(copy.deepcopy(base), recompute_chunks=2)
    whole = revcompile.make_reversible(copy.deepcopy(base), recompute_chunks=1)
    ids = token_batch(base, batch=3, seq=12)
    mask = torch.ones_like(ids)
    mask[0, slice(None, 5) if side == "left" else slice(-5, None)] = 0
    results = []
    for model in (whole, sliced):
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    for layer in revcompile.converted_layers(sliced):  # the probe's layout, and the padded call's: the mask by batch
        layouts = layer._revcompile.layouts
        assert len(layouts) == 2 and layouts[1].batched[0]
    (loss, grads), (ref_loss, ref) = results[1], results[0]
    assert rel_err(loss, ref_loss) < 1e-5 and max(rel_err(grads[n], ref[n]) for n in ref) < 1e-5


def test_padded_layout_is_learned_by_every_layer_in_bf16():
    """bf16 weights: exact integer streams reach the later layers of a run packed; each layer checks the padded
    layout on values of the stream's shape and slices attention by the batch."""
    model = revcompile.make_reversible(make_model("olmoe", torch.bfloat16), recompute_chunks=2).train()
    ids = token_batch(model, batch=3, seq=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(len(layer._revcompile.layouts) == 2 for layer in revcompile.converted_layers(model))


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
def test_every_cpu_experts_implementation(experts):
    model = make_model("olmoe", torch.float32, experts_implementation=experts)
    assert model.config._experts_implementation == experts
    revcompile.make_reversible(model)
    assert_matches_reference(model, 1e-4)


@pytest.mark.parametrize("chunks", [None, 2], ids=["default", "sliced"])
def test_generate_with_kv_cache_matches_full_recompute(chunks):
    """With recompute_chunks=2 attention runs by halves of the batch without a cache, in one piece with one (a cache
    would see each half as a new step)."""
    model = revcompile.make_reversible(make_model("mixtral", torch.float64), recompute_chunks=chunks).eval()
    prompt = token_batch(model, batch=2, seq=6)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 12)


SHARED_INDEXERS = ["full", "shared", "full", "shared"]  # full layers select their own top-k, shared ones reuse it


def test_top_k_indices_handed_from_layer_to_layer_convert():
    """GLM-MoE-DSA's layers return their sparse attention's top-k indices and the next layer reads them (a shared
    layer raises without them). Integer state: the attention branch hands it on from the reversible forward, and the
    next layer keeps it as context. Every layer converts, gradients are the reference's, and with max_run=1 (each
    layer computing the original layer) the logits are the unconverted model's: indices handed on from the wrong
    layer, or from the wrong pass, would change them."""
    original = make_model("glm_moe_dsa", layers=4, indexer_types=SHARED_INDEXERS).eval()
    ids = token_batch(original, batch=2, seq=12)
    with torch.no_grad():
        expected = original(ids).logits
    model = revcompile.make_reversible(copy.deepcopy(original))
    plan = revcompile.analyze(model)
    assert [p.hands_on for p in plan.pairs] == [{1: "attn"}] * 3 + [{}] and not plan.skipped
    assert "output 1 (from attn)" in plan.table()
    assert_matches_reference(model, TOLERANCE[torch.float64], ids=ids)
    each_layer_alone = revcompile.make_reversible(copy.deepcopy(original), max_run=1).eval()
    with torch.no_grad():  # measured 0 over model seeds 0-2 at 1 and 2 threads (the zoo: at most 9.5e-16)
        assert rel_err(each_layer_alone(ids).logits, expected) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_router_state_handed_from_layer_to_layer_gets_its_gradient(dtype):
    """Each MoE routes by a state made from its input and the previous layer's (Zaya's router states): a float
    carried with gradient. It leaves each layer's reversible Function as an output; the next layer's backward gives
    it its gradient and this layer's recompute takes it in. Gradients equal the reference's: measured at most
    7.5e-16 in fp64 and exactly 0 in bf16 (exact streams) over seeds 0-2 at 1 and 2 threads; with that gradient
    dropped, 1.0 off."""
    from plain_models import RouterStateLM

    torch.manual_seed(0)
    model = revcompile.make_reversible(RouterStateLM(depth=4).to(dtype))
    plan = revcompile.analyze(model)
    assert [p.hands_on for p in plan.pairs] == [{1: "mlp"}] * 3 + [{}] and not plan.skipped
    assert_matches_reference(model, TOLERANCE[torch.float64] if dtype == torch.float64 else 1e-30,  # bf16: 0
                             ids=torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)))


def test_a_state_no_branch_computes_alone_is_refused():
    """CarryLM's carry is made by its MoE's router called again outside the MoE, and read by the next layer's
    attention: no branch computes it, so those layers stay as they are, and the plan says why."""
    from plain_models import CarryLM

    plan = revcompile.analyze(CarryLM())
    assert [s.layer for s in plan.skipped] == ["blocks.0", "blocks.1"]
    assert all("neither of its branches computes alone" in s.reason for s in plan.skipped)


def test_rwkv_generates_with_the_recurrent_state_its_layers_return():
    """RWKV's layers return their recurrent state, which generate() hands back to them at the next token: converted
    (midpoint over all 3 layers, not the original function), greedy tokens with that state equal those of
    recomputing the whole sequence at each token. (One sequence: with two, transformers' own RWKV broadcasts a
    token's shifted state across the batch and its cached tokens differ from its uncached ones.)"""
    model = revcompile.make_reversible(make_model("rwkv")).eval()
    prompt = token_batch(model, batch=1, seq=6)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (1, 14)


def test_save_pretrained_round_trip(tmp_path):
    model = make_model("qwen2_moe")
    revcompile.make_reversible(model).eval()
    ids = token_batch(model)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    # the original class name, by which serving engines (vLLM) pick the model class
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager",
                                         experts_implementation="eager")
    assert set(loaded.state_dict()) == set(model.state_dict())
    revcompile.make_reversible(loaded).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_undo_restores_state_dict_and_logits_exactly():
    model = make_model("glm4_moe").eval()
    ids = token_batch(model)
    keys, before = list(model.state_dict()), model(ids).logits.detach()
    revcompile.make_reversible(model)
    revcompile.undo(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(ids).logits.detach(), before)


def test_trainer_trains_a_converted_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    from revcompile.data import byte_batches, stdlib_text

    model = make_model("mixtral", torch.float32, vocab_size=256)
    model.config.use_cache = False
    revcompile.make_reversible(model)
    rows = torch.cat(byte_batches(stdlib_text(["textwrap"]), batch=8, seq=64, count=4))
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def test_bf16_weights_and_autocast_train_and_check_reports_the_error():
    """Float streams (exact=False) lose bits in bf16, and check() shows it; the default, exact streams, do not."""
    model = revcompile.make_reversible(make_model("mixtral", torch.bfloat16, layers=4), exact=False)
    ids = token_batch(model, seq=16)
    report = revcompile.check(model, ids)
    assert len(report.layers) == 4 and all(0 < r.input_error < 0.1 for r in report.layers)
    assert all(r.grad_cosine > 0.9 for r in report.layers)
    fp32 = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=4), exact=False)
    autocast = revcompile.check(fp32, ids, autocast=torch.bfloat16)
    assert autocast.worst_grad_error < 0.05 and autocast.worst_input_error < report.worst_input_error
    assert "rebuilt input rel. error" in str(report) and "worst rebuilt input error" in str(report)
    exact = revcompile.check(revcompile.make_reversible(make_model("mixtral", torch.bfloat16, layers=4)), ids)
    assert exact.exact and "exact: every layer's input rebuilt bit for bit" in str(exact)


def test_check_compares_steps_that_drew_the_same_dropout():
    """check()'s two steps draw the same random numbers: with attention dropout on, exact streams in bf16 give
    gradients equal to the reference's bit for bit (they were 0.44 off, and check() blamed the precision)."""
    model = revcompile.make_reversible(make_model("mixtral", torch.bfloat16, layers=3, attention_dropout=0.3))
    ids = token_batch(model, seq=16)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = revcompile.check(model, ids)
    assert report.exact and report.worst_grad_error == 0, report
    assert torch.equal(torch.get_rng_state(), state)  # check() leaves the caller's random numbers as they were


class NoisyFFN(nn.Module):
    """An FFN that draws noise from its own generator: not replayable, so recompute differs."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        noise = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) if self.training else 0
        return self.fc(x) * (1 + noise)


def test_check_warns_about_a_branch_that_is_not_deterministic_on_recompute():
    from plain_models import PlainLM

    model = PlainLM(depth=2).double()
    for block in model.blocks:
        block.ff = NoisyFFN(32).double()
    revcompile.make_reversible(model)
    ids = torch.randint(0, 64, (2, 8))

    def loss_fn(m, batch):
        logits = m(batch)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten())

    with pytest.warns(UserWarning, match="differ from the reference"):
        revcompile.check(model, ids, loss_fn=loss_fn)


def test_check_rejects_a_batch_the_model_cannot_take():
    model = revcompile.make_reversible(make_model("mixtral"))
    with pytest.raises(revcompile.RevcompileError, match="could not run this batch"):
        revcompile.check(model, torch.zeros(2, 8))  # float ids
    with pytest.raises(revcompile.RevcompileError, match="converted by revcompile"):
        revcompile.check(make_model("mixtral"), token_batch(model))


@pytest.mark.parametrize("converted_in", ["eval", "train"])
def test_dropout_in_a_layers_own_code_follows_the_mode_it_runs_in(converted_in):
    """OPT's decoder layer calls `F.dropout(h, p, training=self.training)` itself, which a trace holds as a
    constant: the converted layer must drop out in training and not in eval, whatever mode it was converted in
    (`from_pretrained` hands over a model in eval mode). With max_run=1 the converted OPT is the original function:
    its losses equal the original's, with the same dropout draws (both modes, both ways round; HF's loss is float32)."""
    from revcompile.models import tiny_model

    original = tiny_model("opt", dtype=torch.float64, num_hidden_layers=2)  # dropout 0.1
    model = getattr(copy.deepcopy(original), converted_in)()
    revcompile.make_reversible(model, max_run=1)
    ids = token_batch(model, batch=2, seq=16)
    losses = {}
    for mode in ("train", "eval", "train"):
        for m in (model, original):
            getattr(m, mode)()
        torch.manual_seed(0)
        expected = original(ids, labels=ids).loss
        torch.manual_seed(0)
        losses[mode] = model(ids, labels=ids).loss
        assert rel_err(losses[mode], expected) < 1e-6, mode
    assert rel_err(losses["train"], losses["eval"]) > 1e-3  # dropout did something in training


def test_a_causal_lm_whose_config_is_a_text_sub_config_reloads(tmp_path):
    """Emu3's causal LM saves an Emu3TextConfig, which AutoModelForCausalLM cannot load from a directory:
    revcompile.from_pretrained loads it with the class config.json names and converts it again, logits exact."""
    from revcompile.models import tiny_model

    model = revcompile.make_reversible(tiny_model("emu3", dtype=torch.float64, num_hidden_layers=2)).eval()
    ids = token_batch(model)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = revcompile.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager")
    assert type(loaded).__name__ == "Emu3ForCausalLM" and loaded._revcompile_plan.applied
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, logits)


@pytest.mark.parametrize("order", ["peft first", "revcompile first"])
def test_lora_adapters_train_through_a_converted_model(order):
    """PEFT's LoRA on the attention projections, the model converted after get_peft_model or before it: only the
    adapters train, backward rebuilds every layer, their gradients equal the reference's, and the chunked head is in
    place (make_reversible on a PeftModel crashed in the head's probe before)."""
    from peft import LoraConfig, get_peft_model

    from revcompile.runtime.head import has_chunked_head

    model = make_model("mixtral", layers=3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    if order == "peft first":
        model = revcompile.make_reversible(get_peft_model(model, lora))
    else:
        model = get_peft_model(revcompile.make_reversible(model), lora)
    with torch.no_grad():  # (LoRA's B starts at zero: no gradient would reach A)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert has_chunked_head(model)
    ids = token_batch(model, seq=16)
    model.train()
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, _, ref = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and grads.keys() == ref.keys() and all("lora_" in name for name in grads) and len(grads) == 12
    assert rel_err(loss, ref_loss) < 1e-8 and max(rel_err(grads[n], ref[n]) for n in ref) < 1e-8
