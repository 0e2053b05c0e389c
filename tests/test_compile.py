"""torch.compile: make_reversible(compile=True) and the "revcompile" Dynamo backend train like the eager model.

Hugging Face's default "eager" experts loop over a data-dependent set of experts, which breaks Dynamo's graph at
`nonzero`; these tests use its "grouped_mm" experts, whose graph is whole (see README, "torch.compile").
"""

import copy
import functools
import logging
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import count_reversible_nodes, lm_loss, loss_and_grads, make_model, rel_err
from plain_models import (AuxLossBlock, CarryLM, CollectingLM, PlainLM, PostNormBlock, TorchLevelQuirksBlock,
                          near_tied_top1_lm)
from torch import fx
from torch._dynamo.utils import counters

import revcompile
from revcompile.models import TINY_FAMILIES
from revcompile.runtime.compiled import LayerBranch
from revcompile.runtime.layer import observe_reconstruction
from revcompile.capture.tracer import dynamic_names
from revcompile.errors import RevcompileError
from revcompile.runtime.replay import run_recorded, run_replayed

FAMILIES = ("mixtral", "qwen2_moe")
STEPS = 3
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-5, 1e-4  # fp32, relative
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(name: str) -> torch.nn.Module:
    model = make_model(name, torch.float32, layers=3, experts_implementation="grouped_mm")
    model.config.use_cache = False
    return model.train()


def batches(model) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, model.config.vocab_size, (2, 16), generator=generator) for _ in range(STEPS)]


def compile_counts() -> tuple[int, int]:
    """(graphs Dynamo made, frames it compiled) so far: unchanged means nothing was compiled again."""
    return counters["stats"]["unique_graphs"], counters["frames"]["total"]


def train(model, data, forward=None, reference=False) -> dict:
    """STEPS SGD steps; per step the loss, the reversible nodes in its graph, the gradients and compile counts."""
    forward = model if forward is None else forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {"loss": [], "nodes": [], "grads": [], "counts": []}
    for step, ids in enumerate(data):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(step)  # the same random numbers in every run (PhiMoE's router samples in training)
        with revcompile.disable_inversion() if reference else nullcontext():
            loss = forward(ids, labels=ids).loss
            out["nodes"].append(count_reversible_nodes(loss))
            loss.backward()
        out["loss"].append(float(loss.detach()))
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        out["counts"].append(compile_counts())
        optimizer.step()
    return out


def assert_same_training(run: dict, expected: dict) -> None:
    for step in range(len(expected["loss"])):
        assert abs(run["loss"][step] - expected["loss"][step]) <= LOSS_TOLERANCE * abs(expected["loss"][step])
        grads, ref = run["grads"][step], expected["grads"][step]
        assert grads.keys() == ref.keys()
        worst = max(ref, key=lambda n: rel_err(grads[n], ref[n]))
        assert rel_err(grads[worst], ref[worst]) < GRAD_TOLERANCE, (step, worst)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. NOTE: for bit-for-bit comparisons of gradients: Inductor's CPU kernel for
    a scatter-add (the gradient of gpt_oss's expert biases, gathered per token) adds with atomics from several
    threads, in an order that changes from run to run (measured: 3 of 54 gradients 1e-3 to 7e-3 off at 2 threads,
    none at 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_bit_for_bit(run: dict, expected: dict) -> None:
    assert run["loss"] == expected["loss"]
    for grads, ref in zip(run["grads"], expected["grads"], strict=True):
        assert grads.keys() == ref.keys() and all(torch.equal(grads[n], ref[n]) for n in ref)


@functools.cache
def compiled_run(name: str) -> tuple:
    """(eager model, compiled model, compiled run, eager run, reference run, compile counts before the first step)."""
    eager = revcompile.make_reversible(tiny(name))
    compiled = revcompile.make_reversible(tiny(name), compile=True)
    reference = revcompile.make_reversible(tiny(name))
    data = batches(eager)
    before = compile_counts()
    return (eager, compiled, train(compiled, data), train(eager, data), train(reference, data, reference=True),
            before)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_training_matches_eager_and_reference(name):
    _, _, run, eager, reference, _ = compiled_run(name)
    assert run["nodes"] == [3] * STEPS and reference["nodes"] == [0] * STEPS, "inversion must run, not in the reference"
    assert_same_training(run, eager)
    assert_same_training(run, reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_branch_graph_is_compiled_once_and_never_again(name):
    """Three layers share one compiled graph per branch and grad mode; steps 2 and 3 compile nothing."""
    _, compiled, run, _, _, before = compiled_run(name)
    compiler = revcompile.converted_layers(compiled)[0]._revcompile.compiler
    assert len(compiler) == 2  # the attention and the MoE branch graph, shared by the three layers
    assert run["counts"][0][0] - before[0] <= 2 * len(compiler)  # at most a no-grad and a recompute graph each
    assert run["counts"][-1] == run["counts"][0], "recompiled after the first step"


def test_generate_after_compiled_training_compiles_nothing():
    """generate() with the KV cache runs the branches eagerly: before, each decoded token compiled every layer's
    attention again (the cache grows, each layer reads its own entry) until Dynamo's recompile limit."""
    eager, compiled, *_ = compiled_run("mixtral")
    same_weights = copy.deepcopy(eager)
    same_weights.load_state_dict(compiled.state_dict())
    prompt = batches(compiled)[0][:, :6]
    before = compile_counts()
    tokens = compiled.eval().generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    compiled.train()
    assert compile_counts() == before
    assert torch.equal(tokens, same_weights.eval().generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True))


def test_routing_is_replayed_inside_the_compiled_branch():
    """The compiled MoE branch, recorded on x and replayed on an input that would route elsewhere, gives the eager
    branch's replayed output and gradients: the selection really comes from the recording."""
    eager, compiled, *_ = compiled_run("mixtral")
    layer = revcompile.converted_layers(compiled)[0]
    branch = layer._revcompile.generated()[0]["mlp"]
    eager_branch = fx.GraphModule(layer, compiled._revcompile_plan.pairs[0].structure.branch_graphs[1])
    captured = {}

    def grab(module, args, kwargs):
        _, context, signature = module._revcompile.bind(module, args, kwargs)
        captured["context"] = [context[name] for name in dynamic_names(signature)]

    hook = revcompile.converted_layers(eager)[0].register_forward_pre_hook(grab, with_kwargs=True)
    ids = batches(eager)[0]
    with torch.no_grad():
        eager(ids)
    hook.remove()
    context = captured["context"]
    x = torch.randn(*ids.shape, compiled.config.hidden_size)
    with torch.no_grad():
        _, replay = run_recorded(branch, (x, *context), rng=False)
    moved = torch.randn(*ids.shape, compiled.config.hidden_size, requires_grad=True)
    _, fresh = run_recorded(eager_branch, (moved.detach(), *context), rng=False)
    assert not torch.equal(fresh.routing[0].long(), replay.routing[0].long()), "the test needs other choices"
    out = run_replayed(branch, (moved, *context), replay)
    grad, = torch.autograd.grad(out.sum(), moved)
    expected = run_replayed(eager_branch, (moved, *context), replay)
    expected_grad, = torch.autograd.grad(expected.sum(), moved)
    assert rel_err(out.detach(), expected.detach()) < LOSS_TOLERANCE and rel_err(grad, expected_grad) < GRAD_TOLERANCE


@pytest.mark.parametrize("select, path", [("argmax", "compile=True"), ("sort", "compile=True"), ("argmax", "backend")])
def test_compiled_branches_replay_argmax_and_sort_routers(select, path, monkeypatch):
    """compile=True and the backend in fp32 (float streams) with a near-tied top-1 router that picks by argmax or
    sort: the compiled recompute replays the forward's choices (measured: worst gradient 4.7e-7 and 3.9e-7 off the
    reference; 0.51 and 0.34 when those selections were not recorded). With compile=True each branch's recompute
    and backward run as one compiled call (torch.func.vjp, `compiled.BranchVjp`), the choices replayed inside it
    (4.9e-7 to 5.3e-7 over 3 seeds, 1 and 2 threads, as in two calls; 0.51 when the replayer was entered around
    the call instead of inside the function vjp transforms)."""
    calls = []
    vjp = LayerBranch.vjp
    monkeypatch.setattr(LayerBranch, "vjp", lambda self, *args: calls.append(vjp(self, *args)) or calls[-1])
    model = near_tied_top1_lm(select)
    if path == "backend":
        model = torch.compile(model, backend="revcompile")
    else:
        revcompile.make_reversible(model, compile=True)
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, _, ref = loss_and_grads(model, ids, reference=True)
    assert nodes == 6 and rel_err(loss, ref_loss) < LOSS_TOLERANCE
    assert max(rel_err(grads[n], ref[n]) for n in ref) < GRAD_TOLERANCE
    if path == "compile=True":
        assert len(calls) == 12 and all(c is not None for c in calls)  # 6 layers x 2 branches, one call each


def test_a_branch_torch_func_cannot_trace_recomputes_in_two_calls():
    """transformers' fp32 grouped_mm experts under Dynamo run a custom op that torch.func cannot transform: the
    MoE branch's one-call graph fails to trace once and it recomputes in two calls; attention stays one call (the
    training itself is checked against eager and the reference above)."""
    _, compiled, *_ = compiled_run("mixtral")
    runtime = revcompile.converted_layers(compiled)[0]._revcompile
    trained = [branches for (_, training), (branches, _, _) in runtime._built.items() if training]
    assert trained and all(b["attn"]._vjp.unsupported is None for b in trained)
    assert all("fake tensor" in b["mlp"]._vjp.unsupported for b in trained)


def test_backend_converts_and_trains_like_make_reversible(caplog):
    """torch.compile(model, backend="revcompile") converts the three layers of Dynamo's graph: same losses and
    gradients as make_reversible in eager mode, inversion running, nothing compiled again after the first step."""
    eager = revcompile.make_reversible(tiny("mixtral"))
    model = tiny("mixtral")
    data = batches(model)
    with caplog.at_level(logging.INFO, logger="revcompile.backend"):
        run = train(model, data, forward=torch.compile(model, backend="revcompile"))
    assert "converted model.layers.0..model.layers.2" in caplog.text
    assert run["nodes"] == [3] * STEPS
    assert_same_training(run, train(eager, data))
    assert run["counts"][-1] == run["counts"][0]


def with_router_logits(model: torch.nn.Module) -> torch.nn.Module:
    """`model` collecting its router logits for the load-balancing loss, weighted heavily enough to show in the
    routers' gradients."""
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.5
    return model


def test_backend_converts_layers_whose_router_logits_are_collected():
    """With output_router_logits=True each layer's router logits leave the layer in Dynamo's graph, for the
    load-balancing loss. The MoE branch hands them out through the reversible Function (which takes their
    gradient in backward): every layer converts, and losses (the aux loss in them) and gradients, the routers'
    included, are make_reversible's."""
    eager = revcompile.make_reversible(with_router_logits(tiny("mixtral")))
    model = with_router_logits(tiny("mixtral"))
    data = batches(model)[:2]
    run = train(model, data, forward=torch.compile(model, backend="revcompile"))
    assert run["nodes"] == [3] * len(data)
    assert_same_training(run, train(eager, data))


def test_backend_converts_the_graph_dynamo_makes_for_a_new_sequence_length():
    """A second sequence length makes Dynamo compile again with symbolic sizes (its automatic dynamic shapes): that
    graph converts too, trains like make_reversible at every length, and the lengths after it compile nothing."""
    eager = revcompile.make_reversible(tiny("mixtral"))
    model = tiny("mixtral")
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(3, model.config.vocab_size, (2, seq), generator=generator) for seq in (16, 24, 32, 12)]
    run = train(model, data, forward=torch.compile(model, backend="revcompile"))
    assert run["nodes"] == [3] * len(data)
    assert_same_training(run, train(eager, data))
    # NOTE: the third length still compiles: each branch's own graph turns dynamic on its second shape
    assert run["counts"][-1] == run["counts"][2]


# every family of the tiny-model list, as Dynamo captures it whole: grouped_mm experts (the eager loop breaks the
# graph), sdpa attention where the family takes it
_BACKEND_OPTIONS = {"gpt_oss": {"experts_implementation": "grouped_mm"}, "llama": {"attn_implementation": "sdpa"}}


def backend_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A 3-layer tiny `name` to train through the backend, Dynamo's caches emptied first (the wrappers the families
    share would reach its recompile limit)."""
    torch._dynamo.reset()
    options = _BACKEND_OPTIONS.get(name, {"experts_implementation": "grouped_mm", "attn_implementation": "sdpa"})
    model = make_model(name, dtype, layers=3, **options)
    model.config.use_cache = False
    return model.train()


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_backend_converts_each_tiny_family_at_two_sequence_lengths(name):
    """Each family's three layers convert in Dynamo's graph for a first sequence length and in its symbolic-size
    graph for a second, and train like make_reversible at both."""
    models = [backend_model(name, torch.float32) for _ in range(2)]
    eager, model = revcompile.make_reversible(models[0]), models[1]
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(3, model.config.vocab_size, (2, seq), generator=generator) for seq in (16, 24)]
    run = train(model, data, forward=torch.compile(model, backend="revcompile"))
    assert run["nodes"] == [3, 3]
    assert_same_training(run, train(eager, data))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TINY_FAMILIES if name != "llama"])
def test_backend_converts_each_tiny_moe_family_with_router_logits(name):
    """Each MoE family's three layers convert with output_router_logits=True and train like make_reversible, the
    load-balancing loss's gradient included."""
    eager, model = (revcompile.make_reversible(with_router_logits(backend_model(name, torch.float32))),
                    with_router_logits(backend_model(name, torch.float32)))
    data = batches(model)[:2]
    run = train(model, data, forward=torch.compile(model, backend="revcompile"))
    assert run["nodes"] == [3, 3]
    assert_same_training(run, train(eager, data))


@pytest.mark.slow
def test_backend_with_router_logits_in_bf16_is_its_reference_bit_for_bit(one_thread):
    """In bf16 (exact streams) a tiny Mixtral collecting router logits trains through the backend with losses (the
    aux loss in them) and gradients equal to its disable_inversion() reference's, bit for bit."""
    models = [with_router_logits(backend_model("mixtral", torch.bfloat16)) for _ in range(2)]
    data = batches(models[0])[:2]
    run, reference = (train(model, data, forward=torch.compile(model, backend="revcompile"), reference=k == 1)
                      for k, model in enumerate(models))
    assert run["nodes"] == [3, 3] and reference["nodes"] == [0, 0]
    assert_bit_for_bit(run, reference)


def backend_converter(model, recompute_chunks: int | None = None):
    """The backend's converter of the graph Dynamo captures for one training call of `model` (nothing compiled)."""
    from revcompile.backend import _Converter
    from revcompile.schemes import get_scheme

    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    torch.compile(model, backend=capture)(ids, labels=ids)
    gm, example_inputs = graphs[0]
    return _Converter(gm, list(example_inputs), get_scheme("symplectic"), recompute_chunks, False, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_backend_in_bf16_rebuilds_every_input_and_is_its_reference_bit_for_bit(name, one_thread):
    """In bf16 (exact streams), backward rebuilds every converted layer's input bit for bit from its output, in
    Dynamo's graph for a first sequence length and in its symbolic-size graph for a second, and losses and gradients
    equal the disable_inversion() reference's bit for bit. (Before forward and recompute ran one compiled graph,
    gpt_oss's inputs were off by ~1e-3; with the forward alone moved to the with-grad graph, qwen2_moe's, qwen3_moe's
    and olmoe's were, and their gradients were 1e-2 to 3e-1 off the reference's.)"""
    models = [backend_model(name, torch.bfloat16) for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(3, models[0].config.vocab_size, (2, seq), generator=generator) for seq in (16, 24)]
    errors = []
    with observe_reconstruction(lambda layer, error: errors.append(error)):
        run = train(models[0], data, forward=torch.compile(models[0], backend="revcompile"))
    # NOTE: Dynamo keeps, per code object, which sizes it saw change: the reference, compiled after the run saw two
    # lengths, would get symbolic sizes from its first length on (other kernels) unless Dynamo starts afresh
    torch._dynamo.reset()
    reference = train(models[1], data, forward=torch.compile(models[1], backend="revcompile"), reference=True)
    assert errors == [0.0] * 3 * len(data)
    assert_bit_for_bit(run, reference)


def test_backend_names_the_kv_cache_as_what_keeps_a_layer_unconverted():
    """Training with Hugging Face's default use_cache=True puts a KV cache in Dynamo's graph: no layer converts, and
    the reason says to pass use_cache=False."""
    from revcompile.backend import NotConvertible

    model = make_model("mixtral", torch.float32, layers=2, experts_implementation="grouped_mm").train()
    assert model.config.use_cache
    with pytest.raises(NotConvertible, match="use_cache=False"):
        backend_converter(model).analyze()


def test_backend_says_when_recompute_chunks_has_no_effect(caplog):
    """Dynamo's graph writes the sizes into the branches, so none passes the check for slices: recompute_chunks
    would do nothing, and the backend says so instead of ignoring it."""
    model = tiny("mixtral")
    converter = backend_converter(model, recompute_chunks=4)
    with caplog.at_level(logging.WARNING, logger="revcompile.backend"):
        converter.rewrite(converter.analyze())
    assert "recompute_chunks=4 has no effect" in caplog.text


def test_backend_keeps_no_grad_blocks_and_writes_through_views():
    """Two things Dynamo's torch-level graph holds and a layer's own fx trace does not, each found in a Hugging Face
    family: a `with torch.no_grad():` block (two grad-mode switches, PhiMoE's router) converts and what it computes
    stays without gradient; a tensor filled through views' `copy_` (DeepSeek-V3's keys) is filled in the branch
    too (left out, the branch read uninitialised memory). Same losses and gradients as make_reversible, whose
    branches run the modules' own code."""
    torch.manual_seed(0)
    model = PlainLM(TorchLevelQuirksBlock, depth=2)
    eager = revcompile.make_reversible(copy.deepcopy(model), example_inputs=torch.randint(0, 64, (2, 8)))
    forward = torch.compile(model, backend="revcompile")
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8), generator=generator)
        losses = []
        for net, call in ((model, forward), (eager, eager)):
            net.zero_grad(set_to_none=True)
            loss = lm_loss(call, ids)
            losses.append((loss, count_reversible_nodes(loss)))
            loss.backward()
        (loss, nodes), (expected, expected_nodes) = losses
        assert nodes == expected_nodes == 2
        assert abs(float(loss) - float(expected)) <= LOSS_TOLERANCE * abs(float(expected))
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert rel_err(p.grad, q.grad) < GRAD_TOLERANCE, name


def test_backend_leaves_an_unconvertible_graph_to_inductor(caplog):
    """Post-norm layers cannot be coupled: the graph goes to Inductor unchanged, with one log line saying why."""
    torch.manual_seed(0)
    model = PlainLM(PostNormBlock, depth=2)
    ids = torch.randint(0, 64, (2, 8))
    with caplog.at_level(logging.WARNING, logger="revcompile.backend"):
        out = torch.compile(model, backend="revcompile")(ids)
    lines = [r.getMessage() for r in caplog.records if r.name == "revcompile.backend"]
    assert len(lines) == 1 and "goes to Inductor unchanged" in lines[0] and "between residual adds" in lines[0], lines
    assert rel_err(out.detach(), model(ids).detach()) < LOSS_TOLERANCE


def test_backend_is_registered_by_its_entry_point(tmp_path):
    assert "revcompile" in torch._dynamo.list_backends()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    target = "revcompile.backend:revcompile_backend"
    assert f'[project.entry-points.torch_dynamo_backends]\nrevcompile = "{target}"' in pyproject
    # an installed package is found through its entry point alone: a minimal dist-info, revcompile never imported
    info = tmp_path / "revcompile-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: revcompile\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[torch_dynamo_backends]\nrevcompile = {target}\n")
    code = ("import sys, torch._dynamo; fn = torch._dynamo.lookup_backend('revcompile'); "
            "print(fn.__module__, fn.__name__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["revcompile.backend", "revcompile_backend"]


@pytest.fixture(scope="module")
def compiled_bf16_plain_lm():
    """A 2-block plain MoE LM in bf16 (exact streams) with compiled branches, and a batch for it."""
    torch.manual_seed(0)
    return revcompile.make_reversible(PlainLM(depth=2).to(torch.bfloat16), compile=True), torch.randint(0, 64, (2, 16))


def test_exact_steps_at_a_new_grid_compile_nothing(compiled_bf16_plain_lm):
    """Each run chooses its fixed-point grid from its input; compiled steps take the grid's scale as a tensor, so
    steps on inputs ten and a hundred times larger (other grids) compile nothing more than the first step did."""
    model, ids = compiled_bf16_plain_lm
    counts = []
    for scale in (1.0, 10.0, 10.0):
        with torch.no_grad():
            model.embed.weight.mul_(scale)
        model(ids).float().logsumexp(-1).mean().backward()
        counts.append(compile_counts())
    assert counts[2] == counts[1] == counts[0]


def test_a_compiled_recompute_that_chooses_other_experts_raises(compiled_bf16_plain_lm):
    """Compiled branches with exact streams (bf16) record the recompute's expert choices again and compare them with
    the forward's on the device: a difference (here the routers' weights negated between forward and backward)
    raises at the end of the run's backward, instead of giving the gradient of other experts."""
    model, ids = compiled_bf16_plain_lm
    model(ids).float().logsumexp(-1).mean().backward()  # the same choices: no error
    loss = model(ids).float().logsumexp(-1).mean()
    with torch.no_grad():
        for block in model.blocks:
            block.ff.router.weight.neg_()
    with pytest.raises(RevcompileError, match="chose other experts"):
        loss.backward()


@pytest.mark.parametrize("make, aux_of", [
    (CollectingLM, lambda model: sum(logits.pow(2).mean() for logits in model.collected)),
    (lambda: PlainLM(AuxLossBlock), lambda model: sum(block.ff.aux_loss for block in model.blocks))])
def test_backend_converts_a_plain_moe_that_stores_its_aux_values(monkeypatch, make, aux_of):
    """A plain PyTorch MoE appending its router logits to a list, or keeping an aux loss in `self.aux_loss` (which
    make_reversible leaves as it is, see test_analysis.py): in Dynamo's graph the stored values are outputs of the
    layer, so the backend converts it, here with revcompile's own collector (transformers' is hidden, as in a
    process that never imported it). The aux loss trains the routers as in the disable_inversion() reference, and
    does train them."""
    monkeypatch.delitem(sys.modules, "transformers.utils.output_capturing", raising=False)
    torch.manual_seed(0)
    models = [make()]
    models += [copy.deepcopy(models[0]) for _ in range(2)]
    ids = torch.randint(0, 64, (2, 16))

    def grads(model, aux: float, reference: bool = False) -> dict:
        with revcompile.disable_inversion() if reference else nullcontext():
            loss = torch.compile(model, backend="revcompile")(ids).float().logsumexp(-1).mean() + aux * aux_of(model)
            assert count_reversible_nodes(loss) == (0 if reference else 3)
            loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "router" in n}

    run, reference, without_aux = grads(models[0], 0.5), grads(models[1], 0.5, reference=True), grads(models[2], 0.0)
    assert max(rel_err(run[n], reference[n]) for n in reference) < GRAD_TOLERANCE
    assert min(rel_err(without_aux[n], reference[n]) for n in reference) > 0.1


def test_backend_leaves_layers_that_hand_state_to_the_next_layer():
    """A value a layer hands to a later layer beside its output (state carried from layer to layer, here made by
    the MoE's router) is not handed out through the reversible Function: those layers stay as they are, and the
    reason says why."""
    from revcompile.backend import NotConvertible, _Converter
    from revcompile.schemes import get_scheme

    torch.manual_seed(0)
    graphs = []
    torch.compile(CarryLM(), backend=lambda gm, inputs: graphs.append((gm, inputs)) or gm.forward)(
        torch.randint(0, 64, (2, 8)))
    converter = _Converter(graphs[0][0], list(graphs[0][1]), get_scheme("symplectic"), None, False, None)
    with pytest.raises(NotConvertible) as refused:
        converter.analyze()
    for name in ("blocks.0", "blocks.1"):
        assert f"{name}: it hands values to later layers beside its output" in str(refused.value)
    assert "state carried from layer to layer" in str(refused.value)


def test_torch_compile_of_a_converted_model_keeps_bf16_exact():
    """torch.compile(make_reversible(model)) (the Trainer's torch_compile=True): Inductor compiled the layers'
    forward branches while backward recomputed them eagerly, and the two rounded differently: in bf16 the rebuilt
    inputs were 6e-4 to 1e-3 off and the gradients 1 % off the compiled reference's, silently. The converted layers
    are hidden from torch.compile (they run eagerly, the rest compiled): every input rebuilt bit for bit, and the
    gradients equal those of the same compiled model under disable_inversion() bit for bit."""
    model = make_model("mixtral", torch.bfloat16, layers=3, experts_implementation="grouped_mm", use_cache=False)
    revcompile.make_reversible(model)
    compiled = torch.compile(model)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    errors = []
    with observe_reconstruction(lambda layer, error: errors.append(error)):
        _, nodes, grads = loss_and_grads(compiled, ids, reference=False)
    _, _, reference = loss_and_grads(compiled, ids, reference=True)
    assert nodes == 3 and errors == [0.0, 0.0, 0.0]
    assert grads.keys() == reference.keys() and all(torch.equal(grads[n], reference[n]) for n in reference)
