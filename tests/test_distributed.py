"""Converted models under PyTorch's distributed engines: two processes on CPU with gloo (loopback, a file store).

One training step under FSDP2 (fully_shard on each converted layer, then the root) and under DDP gives the loss and
the gathered gradients of a single-process run of the same converted model on the global batch (fp32, 1e-5), while
the two ranks route their tokens to different experts; under FSDP2's bf16 mixed precision, the same gradients as
ordinary autograd bit for bit. Wrong orders raise RevcompileError instead of hanging.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    lm_loss,
    loss_and_grads,
    make_model,
    rel_err,
    reversible_nodes,
    token_batch,
)
from plain_models import SparsePreNormBlock
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import revcompile
from revcompile.errors import RevcompileError
from revcompile.runtime.replay import RoutingRecorder

WORLD = 2
LAYERS = 3
MODELS = {  # make_model arguments
    "mixtral": {"name": "mixtral", "num_local_experts": 8},  # transformers v5: all experts in one fused parameter
    "plain_sparse": {"name": "plain", "block": SparsePreNormBlock},  # 8 expert modules, unchosen ones skipped
}
DEADLINE_S = 120  # a deadlock fails the test after this long instead of hanging the run


def build(model_name: str):
    return revcompile.make_reversible(make_model(dtype=torch.float32, layers=LAYERS, **MODELS[model_name])).train()


def _counting_allreduce(reduced: list[int], bucket):
    """DDP comm hook: DDP's default all-reduce (a mean), noting how many gradient elements each call reduces."""
    reduced.append(bucket.buffer().numel())
    return allreduce_hook(None, bucket)


def gathered_grads(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            for name, p in model.named_parameters() if p.grad is not None}


def step_loss(model, ids: torch.Tensor, engine: str) -> torch.Tensor:
    """The LM loss; under fsdp2-bf16 plus the router's load-balancing loss and a loss on every hidden state (what
    Hugging Face collects from inside and between the converted layers must come through FSDP2's casts too)."""
    if engine != "fsdp2-bf16":
        return lm_loss(model, ids)
    out = model(ids, labels=ids, output_hidden_states=True, output_router_logits=True)
    return out.loss + out.aux_loss + sum(h.float().pow(2).mean() for h in out.hidden_states)


def _rank_step(rank: int, engine: str, model_name: str, init_method: str, out_dir: str) -> None:
    """One rank: convert, wrap (make_reversible first), one training step on its half of the global batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        model = build(model_name)
        ids = token_batch(model, batch=WORLD)[rank:rank + 1]
        layers = revcompile.converted_layers(model)
        reduced: list[int] = []
        if engine.startswith("fsdp2"):
            # fsdp2-bf16: bf16 compute, fp32 reductions; cast_forward_inputs (the default) casts each layer's inputs
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if engine == "fsdp2-bf16" else MixedPrecisionPolicy()
            for layer in layers:
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            if model_name == "plain_sparse":  # expert modules unused on one rank: FSDP2's own switch for MoE
                model.set_reduce_scatter_unused_params(True)
        else:
            model = DistributedDataParallel(model)
            model.register_comm_hook(reduced, _counting_allreduce)
        loss = step_loss(model, ids, engine)
        nodes = reversible_nodes(loss)
        result = {
            "loss": loss.item(),
            "nodes": len(nodes),
            # layer outputs still held by their slot after forward: 0 when each was handed on to the next layer
            "held": sum(n.call.out_slot is not None and n.call.out_slot.tensor is not None for n in nodes),
            # parameters resharded after forward, so the backward recompute needs them all-gathered again
            "resharded": all(isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                             for layer in layers for p in layer.parameters()),
            "exact": [n.call.streams.exact for n in nodes],
        }
        with torch.profiler.profile() as prof:
            loss.backward()
        result["fsdp_reductions"] = Counter(e.name for e in prof.events()
                                            if e.name.startswith("FSDP::post_backward_reduce"))
        result["ddp_reduced"] = sum(reduced)
        result["grads"] = gathered_grads(model)
        if engine == "fsdp2-bf16":  # the same step under ordinary autograd (the same FSDP2 casts and reductions)
            model.zero_grad(set_to_none=True)
            with revcompile.disable_inversion():
                reference = step_loss(model, ids, engine)
                reference.backward()
            result["reference_loss"], result["reference_grads"] = reference.item(), gathered_grads(model)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(engine: str, model_name: str, tmp_path) -> list[dict]:
    """Run `_rank_step` in WORLD spawned processes; fail (not hang) if they do not finish by the deadline."""
    context = mp.get_context("spawn")
    procs = [context.Process(target=_rank_step, daemon=True,
                             args=(rank, engine, model_name, f"file://{tmp_path}/store", str(tmp_path)))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + DEADLINE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, f"{len(hung)} of {WORLD} ranks still running after {DEADLINE_S} s: a deadlock"
    assert [proc.exitcode for proc in procs] == [0] * WORLD, "a rank failed; its traceback is in the captured stderr"
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def experts_chosen(model, ids: torch.Tensor) -> list[set[int]]:
    """For each router call of a forward on `ids`, the set of experts its top-k chose."""
    recorder = RoutingRecorder()
    with torch.no_grad(), recorder:
        lm_loss(model, ids)
    return [set(choice.flatten().tolist()) for choice in recorder.choices]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_one_step_equals_a_single_process_run(engine, model_name, tmp_path):
    ranks = run_ranks(engine, model_name, tmp_path)
    model = build(model_name)
    ids = token_batch(model, batch=WORLD)
    chosen = [experts_chosen(model, ids[rank:rank + 1]) for rank in range(WORLD)]
    assert chosen[0] != chosen[1], "the ranks must route their tokens to different experts"
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)

    assert nodes == LAYERS and all(r["nodes"] == LAYERS for r in ranks), "the reversible path must run on every rank"
    assert all(r["held"] == 0 for r in ranks), "each layer's output must leave its slot in forward (flat memory)"
    assert rel_err(torch.tensor(sum(r["loss"] for r in ranks) / WORLD), loss) < 1e-5
    gathered = ranks[0]["grads"]
    for name, _ in model.named_parameters():
        if name in grads:
            assert rel_err(gathered[name], grads[name]) < 1e-5, name
        else:  # no rank chose this expert: the engine may give it a zero gradient, never another one
            assert name not in gathered or not gathered[name].any(), name
    if engine == "fsdp2":
        assert all(r["resharded"] for r in ranks)
        assert all(len(r["fsdp_reductions"]) == LAYERS + 1 and set(r["fsdp_reductions"].values()) == {1}
                   for r in ranks), "each sharded module's gradients must be reduce-scattered exactly once"
    else:
        trainable = sum(p.numel() for p in model.parameters())
        assert all(r["ddp_reduced"] == trainable for r in ranks), "each gradient must be all-reduced exactly once"


def test_fsdp2_mixed_precision_keeps_bf16_exact(tmp_path):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16) on fp32 weights, the usual way to train in bf16: the runs
    are on exact streams and every gathered gradient equals the same step's under ordinary autograd bit for bit.

    FSDP2 casts each sharded layer's floating-point inputs to bf16 (cast_forward_inputs), the packed integer
    streams too: the loss was nan on both ranks until a layer takes its run's streams from behind the cast
    (runtime/layer.py `_before_cast`); the loss here includes the load-balancing loss and every hidden state
    (`step_loss`), which were nan too until the hidden states followed the cast.
    """
    ranks = run_ranks("fsdp2-bf16", "mixtral", tmp_path)
    for r in ranks:
        assert r["nodes"] == LAYERS and all(r["exact"]) and r["held"] == 0 and r["resharded"]
        assert r["loss"] == r["reference_loss"]
        assert r["grads"].keys() == r["reference_grads"].keys()
        assert all(torch.equal(g, r["reference_grads"][name]) for name, g in r["grads"].items())
        assert len(r["fsdp_reductions"]) == LAYERS + 1 and set(r["fsdp_reductions"].values()) == {1}


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: fully_shard and DistributedDataParallel need one."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_converting_a_wrapped_model_is_refused(process_group):
    sharded = make_model("mixtral", torch.float32)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    with pytest.raises(RevcompileError, match=r"sharded by fully_shard .*make_reversible\(model\) first"):
        revcompile.make_reversible(sharded)
    assert not revcompile.converted_layers(sharded)
    with pytest.raises(RevcompileError, match=r"DistributedDataParallel; .*make_reversible\(model\) first"):
        revcompile.make_reversible(DistributedDataParallel(make_model("mixtral", torch.float32)))


def test_sharding_inside_a_converted_layer_is_refused(process_group):
    """Its gradients would be lost without a word (the recompute's own FSDP hooks reduce them too early)."""
    model = build("mixtral")
    fully_shard(model.model.layers[0].mlp)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with pytest.raises(RevcompileError, match=r"mlp, inside a converted .* shard whole converted layers"):
        lm_loss(model, token_batch(model))
    with pytest.raises(RevcompileError, match="call it before fully_shard"):
        revcompile.undo(model)
