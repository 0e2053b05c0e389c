"""GPU: peak memory and tokens/s of plain training, HF activation checkpointing and revcompile on an
OLMoE-1B-7B-sized MoE (random weights, bf16), at the largest batch each method fits.

Prepared for a session that is lent a GPU machine (the test suite never needs one):

    python bench/gpu.py --out bench/results          # -> gpu_<device>.{md,json,png}
    python bench/gpu.py --small --device cpu         # a dry run of the script itself, tiny config
    python bench/gpu.py --methods checkpointing checkpointing-chunked revcompile --vocab 151936 --suffix _vocab152k
    python bench/gpu.py --methods revcompile --optimizer adamw-in-backward --suffix _optim_in_backward
    python bench/gpu.py --methods revcompile --recompute-chunks 4 --suffix _sliced   # recompute by slices on CUDA
    python bench/gpu.py --methods revcompile --slice-tokens 32768 --suffix _slices32k  # a CUDA slice budget to try
    python bench/gpu.py --methods checkpointing-chunked revcompile --head liger --suffix _liger  # Liger's kernel

The vocabulary is OLMoE's 50,304 unless --vocab says otherwise. revcompile chunks the LM head and loss by default;
"checkpointing-chunked" is HF checkpointing with the same chunked loss, "checkpointing-offload-chunked" that with the
layer inputs it keeps offloaded to pinned host memory (transformers' `offload=True`: the device holds one layer's
recompute, the host the rest, at the price of a copy each way), "revcompile-original-head" revcompile with
Hugging Face's. --optimizer adds AdamW's step to every step (after backward, or inside it with
revcompile.optimizer_in_backward), so the total peak includes gradients and optimizer state.

For each method the batch doubles (seq fixed) until the step runs out of memory or the time budget is spent.
Memory is torch.cuda.max_memory_allocated above the level of weights + allocated gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import revcompile  # noqa: E402
from revcompile.measure import METHOD_LABELS, PhasePeaks, hf_checkpointing, prepare  # noqa: E402
from revcompile.models import tiny_config  # noqa: E402
from revcompile.runtime.head import has_chunked_head  # noqa: E402

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                   max_position_embeddings=4096)
SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             num_experts=8, num_experts_per_tok=2, vocab_size=512, max_position_embeddings=512)


def set_method(model: torch.nn.Module, method: str, device: str, recompute_chunks: int | None = None,
               head: str = "chunked") -> None:
    """Set `model` up for `method`; `head` is the kernel of the chunked loss (revcompile's and the chunked
    baseline's): "chunked", "liger" or "cce"."""
    if revcompile.converted_layers(model) or has_chunked_head(model):
        revcompile.undo(model)
    hf_checkpointing(model, on=False)
    ids = torch.randint(0, 100, (1, 8), device=device)
    example = dict(input_ids=ids, use_cache=False)
    if method in ("revcompile", "revcompile-original-head"):
        revcompile.make_reversible(model, example_inputs=example,
                                   head="original" if method == "revcompile-original-head" else head,
                                   recompute_chunks=recompute_chunks)
    elif method in ("checkpointing-chunked", "checkpointing-offload-chunked"):
        # (on the CPU of a dry run, activations are in host memory already, and pinning needs an accelerator)
        hf_checkpointing(model, offload=method == "checkpointing-offload-chunked" and device.startswith("cuda"))
        revcompile.chunked_head(model, example_inputs=example, kernel=head)
    else:
        prepare(model, method)


def run(args: argparse.Namespace) -> list[dict]:
    cuda = args.device.startswith("cuda")
    sizes = dict(SMALL if args.small else OLMOE_1B_7B, **({"vocab_size": args.vocab} if args.vocab else {}))
    config = tiny_config("olmoe", attn_implementation="sdpa", experts_implementation="grouped_mm" if cuda else "eager",
                         **sizes)
    torch.manual_seed(0)
    with torch.device(args.device):  # (on CUDA drawn in bf16 at once: a float32 copy first would be 28 GB here)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f}B parameters, {config.num_hidden_layers} layers", flush=True)
    results = []
    for method in args.methods:
        deadline = time.time() + args.budget_s / len(args.methods)
        set_method(model, method, args.device, args.recompute_chunks, args.head)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6) if args.optimizer == "adamw" else None
        in_backward = (revcompile.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-6)
                       if args.optimizer == "adamw-in-backward" else None)
        batches = iter(args.batches) if args.batches else None
        batch = next(batches) if batches else 1
        while batch is not None and batch <= args.max_batch and time.time() < deadline:
            ids = torch.randint(0, config.vocab_size, (batch, args.seq), device=args.device)
            row = dict(method=method, batch=batch, seq=args.seq, tokens=batch * args.seq, params_b=params / 1e9,
                       vocab=config.vocab_size, optimizer=args.optimizer, head=args.head)

            def step():
                model(ids, labels=ids).loss.backward()
                if opt is not None:
                    opt.step()
                model.zero_grad(set_to_none=args.optimizer is not None)

            try:
                step()  # warm-up; allocates gradients (and optimizer state)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                step_s = (time.perf_counter() - start) / args.steps
                row.update(ok=True, step_s=step_s, tokens_per_s=batch * args.seq / step_s,
                           peak_gb=((torch.cuda.max_memory_allocated() - base) / 2**30) if cuda else None,
                           total_peak_gb=(torch.cuda.max_memory_allocated() / 2**30) if cuda else None)
                if cuda:  # one more step, its peak split by phase (the optimizer's step counts in the last)
                    phases = PhasePeaks(model, base, cuda=True)
                    step()
                    row.update({k.replace("_mb", "_gb"): v / 1024 for k, v in phases.finish().items()})
            except torch.OutOfMemoryError:
                row.update(ok=False)
            finally:
                ids = None
                model.zero_grad(set_to_none=False)
                if cuda:
                    torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
            if not row["ok"]:
                break
            batch = next(batches, None) if batches else 2 * batch
        if in_backward is not None:
            in_backward.remove()
        opt = None
    return results


def report(results: list[dict], args: argparse.Namespace) -> str:
    from tabulate import tabulate

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    phases = ("layers_forward_gb", "kept_gb", "head_gb", "layers_backward_gb")
    rows = [[METHOD_LABELS[r["method"]], r["batch"], r["tokens"], "OOM" if not r["ok"] else f"{r['peak_gb']:.1f}"
             if r["peak_gb"] is not None else "-", f"{r['total_peak_gb']:.1f}" if r.get("total_peak_gb") else "-",
             f"{r['tokens_per_s']:.0f}" if r["ok"] else "-",
             *(f"{r[p]:.1f}" if p in r else "-" for p in phases)] for r in results]
    best = {}
    for r in results:
        if r["ok"] and r["batch"] >= best.get(r["method"], {}).get("batch", 0):
            best[r["method"]] = r
    plain = best.get("plain")
    summary = [[METHOD_LABELS[m], b["batch"], b["tokens"], f"{b['tokens_per_s']:.0f}",
                f"{b['tokens'] / plain['tokens']:.1f}x" if plain else "-"] for m, b in best.items()]
    return (f"# GPU: OLMoE-1B-7B-sized MoE, random weights, bf16 ({device})\n\n"
            f"`python bench/gpu.py {' '.join(sys.argv[1:])}`; seq {args.seq}, loss kernel {args.head!r}, "
            + (f"batches {args.batches}" if args.batches else f"batch doubled until OOM (max {args.max_batch})")
            + "; peak = max_memory_allocated above weights + gradients."
            + " Split of one more step by phase (GB above weights + gradients): the layers' forward peak, what the "
            "layers keep when the LM head starts, the head's peak (its forward and backward), the layers' backward "
            "peak (and the optimizer's step).\n\n"
            + tabulate(rows, headers=["method", "batch", "tokens", "step peak GB", "total peak GB", "tokens/s",
                                      "layers' forward", "kept at the head", "head", "layers' backward"],
                       tablefmt="github")
            + "\n\nLargest batch that fit, and its throughput:\n\n"
            + tabulate(summary, headers=["method", "batch", "tokens/step", "tokens/s", "tokens/step vs plain"],
                       tablefmt="github") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny config, for a dry run")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", help="these batch sizes instead of doubling from 1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=360, help="time for all methods; each gets an equal share")
    parser.add_argument("--methods", nargs="+",
                        default=["plain", "checkpointing", "checkpointing-chunked", "revcompile"])
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: OLMoE's 50304; --small: 512)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw-in-backward"],
                        help="also step AdamW in every step (after backward, or inside it)")
    parser.add_argument("--recompute-chunks", type=int, help="revcompile's recompute_chunks (default: by device, one "
                        "piece on CUDA): the MoE in N slices of the sequence, attention in N slices of the batch")
    parser.add_argument("--slice-tokens", type=int, help="revcompile's default slice budget on this device "
                        "(revcompile.runtime.slicing.AUTO_SLICE_TOKENS; CUDA has none: one piece), to measure one")
    parser.add_argument("--head", choices=["chunked", "liger", "cce"], default="chunked",
                        help="the kernel of the chunked loss, for revcompile and HF checkpointing + chunked loss")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--suffix", default="", help="appended to the result files' names")
    args = parser.parse_args()
    if args.slice_tokens:
        from revcompile.runtime.slicing import AUTO_SLICE_TOKENS

        AUTO_SLICE_TOKENS[torch.device(args.device).type] = args.slice_tokens
    results = run(args)
    text = report(results, args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "gpu_" + ("cpu_dry_run" if not args.device.startswith("cuda") else
                                            torch.cuda.get_device_name().split()[-1].lower()) + args.suffix)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
