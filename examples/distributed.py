"""Train a converted tiny MoE across processes with FSDP2 or DDP: on CPU with gloo, or on GPUs with nccl.

    torchrun --standalone --nproc_per_node 2 examples/distributed.py --fsdp      # or --ddp; --bf16 for bf16 compute

The order matters: revcompile.make_reversible(model) first, then the engine (fully_shard on each decoder layer and
on the root, or DistributedDataParallel). Each rank trains on its own batches of standard-library source (bytes,
nothing downloaded); rank 0 prints the loss of each step (the mean over ranks) and every rank's peak memory.
--plain trains the unconverted model, for comparison. Without torchrun it runs as a single process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import revcompile
from revcompile.data import VOCAB, byte_batches, stdlib_text
from revcompile.measure import reset_peak_rss, rss_bytes
from revcompile.models import tiny_model

TEXT_MODULES = ["json", "email", "http", "argparse", "csv", "logging"]


def wrap(model: torch.nn.Module, engine: str, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Hand the (already converted) model to the engine: FSDP2 per decoder layer and root (bf16: computing in
    bf16 with fp32 weights and reductions, FSDP2's MixedPrecisionPolicy), or DDP."""
    if engine == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def peak_mb(device: torch.device, before: int) -> float:
    """This process's peak memory since the training started, above the level then (MB)."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes("VmHWM")
    return (peak - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--fsdp", action="store_const", dest="engine", const="fsdp", help="FSDP2 (the default)")
    engine.add_argument("--ddp", action="store_const", dest="engine", const="ddp", help="DistributedDataParallel")
    parser.add_argument("--plain", action="store_true", help="train the unconverted model instead")
    parser.add_argument("--bf16", action="store_true", help="compute in bf16 (FSDP2's mixed precision; DDP: autocast)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    args.engine = args.engine or "fsdp"

    if "RANK" not in os.environ:  # not launched by torchrun: one process on a free loopback port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = tiny_model("mixtral", seed=0, num_hidden_layers=args.layers, hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                       attn_implementation="sdpa").to(device)  # same seed: the same weights on every rank
    model.config.use_cache = False
    if not args.plain:
        revcompile.make_reversible(model)  # first: it converts the unwrapped model
    model = wrap(model, args.engine, device, args.bf16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = byte_batches(stdlib_text(TEXT_MODULES), args.batch, args.seq, args.steps, seed=rank)  # own data
    if rank == 0:
        what = "plain" if args.plain else f"reversible ({len(revcompile.converted_layers(model))} converted layers)"
        print(f"{args.engine} on {world} ranks ({dist.get_backend()}, {device.type}); tiny Mixtral, {args.layers} "
              f"layers, hidden 128, {what}, {'bf16' if args.bf16 else 'fp32'}; per rank {args.batch} x {args.seq} "
              "tokens a step", flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes("VmRSS")
        reset_peak_rss()
    for step, ids in enumerate(batches, 1):
        start = time.perf_counter()
        ids = ids.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16 and args.engine == "ddp"):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}  loss {mean.item() / world:.4f}  {time.perf_counter() - start:.2f} s", flush=True)

    peaks = [None] * world
    dist.all_gather_object(peaks, peak_mb(device, before))
    if rank == 0:
        kind = "peak allocated" if cuda else "peak RSS"
        print(f"{kind} above the pre-training level, MB: " + ", ".join(f"rank {r} {p:.1f}" for r, p in
                                                                         enumerate(peaks)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
