"""Peak memory of one training step against depth: plain, HF activation checkpointing, torch selective
checkpointing and revcompile, side by side in one run (each measurement a child process; see
revcompile/measure.py for what is measured and how).

    python bench/memory.py                      # CPU, depths 4 8 16 32 64 -> bench/results/memory_cpu.{md,json,png}
    python bench/memory.py --device cuda        # on a GPU machine
    python bench/memory.py --dtype bfloat16 --methods plain checkpointing revcompile revcompile-float
                                                # bf16 weights: exact (integer) streams against float ones
    python bench/memory.py --lora 16 --depths 8 16 32 --methods plain checkpointing revcompile
                                                # LoRA fine-tuning (PEFT), base weights frozen
    python bench/memory.py --model-type glm_moe_dsa --set index_topk=64 --methods plain checkpointing revcompile
                                                # another family at the same sizes, with its own fields

Config (issue 2): tiny Mixtral, hidden 128, 4 experts top-2, batch 4 x 512 tokens, sdpa attention, fp32 (or
`--dtype`; in bf16 revcompile's default is exact streams, `revcompile-float` the float ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.measure import (  # noqa: E402
    MEMORY_CONFIG,
    METHOD_LABELS,
    METHODS,
    SPEED_METHODS,
    measure_step,
    onednn_for_memory,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=SPEED_METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot")
    parser.add_argument("--from-json", help="redraw the table and plot from an earlier run's JSON")
    parser.add_argument("--repeats", type=int, default=3, help="children per point; the median peak is reported")
    parser.add_argument("--lora", type=int, help="LoRA rank: PEFT's LoRA on the attention projections, base frozen "
                                                  "(results to memory_<device>_lora.*)")
    parser.add_argument("--model-type", default=MEMORY_CONFIG["model_type"],
                        help="the transformers model_type built tiny at the same sizes (results to "
                             "memory_<device>_<model type>.* for another than the default)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", type=_config_field,
                        help="more config fields (values read as JSON, else as strings), e.g. index_topk=64")
    args = parser.parse_args()
    from transformers import CONFIG_MAPPING

    if args.model_type not in CONFIG_MAPPING:
        parser.error(f"--model-type {args.model_type!r} is not a model_type of the installed transformers "
                     f"(for example {MEMORY_CONFIG['model_type']}, glm_moe_dsa, qwen3_moe)")
    config = {**MEMORY_CONFIG, "model_type": args.model_type, **dict(args.set)}

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        results = []
        for depth in tqdm(args.depths, desc="depths"):
            for method in args.methods:
                # NOTE: RSS moves by about +-1 MB from run to run (allocator, interpreter); the median of a few
                # children keeps that noise out of the ratios
                runs = [measure_step(method, depth, device=args.device, dtype=args.dtype, lora=args.lora,
                                     onednn=onednn_for_memory(args.device, args.dtype), **config)
                        for _ in range(args.repeats)]
                median = statistics.median(r["peak_mb"] for r in runs)
                results.append(dict(runs[0], peak_mb=median, peak_mb_runs=[r["peak_mb"] for r in runs]))
    peak = {(r["method"], r["depth"]): r["peak_mb"] for r in results}
    rows = [[d, *(peak[m, d] for m in args.methods)] for d in args.depths]
    table = tabulate(rows, headers=["depth", *(f"{METHOD_LABELS[m]} MB" for m in args.methods)], tablefmt="github",
                     floatfmt=".1f")
    notes = []
    if "revcompile" in args.methods:
        lo, hi = min(args.depths), max(args.depths)
        notes.append(f"revcompile depth {hi} / depth {lo}: {peak['revcompile', hi] / peak['revcompile', lo]:.2f}x")
        if "checkpointing" in args.methods:
            for d in args.depths:
                notes.append(f"revcompile / HF checkpointing at depth {d}: "
                             f"{peak['revcompile', d] / peak['checkpointing', d]:.2f}")
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    command = f"python bench/memory.py --device {args.device} --dtype {args.dtype} --methods {' '.join(args.methods)}"
    command += f" --depths {' '.join(map(str, args.depths))}" + (f" --lora {args.lora}" if args.lora else "")
    default_model = args.model_type == MEMORY_CONFIG["model_type"]
    command += "" if default_model else f" --model-type {args.model_type}"
    command += f" --set {' '.join(f'{k}={json.dumps(v)}' for k, v in args.set)}" if args.set else ""
    lora = f", LoRA rank {args.lora}" if args.lora else ""
    frozen = " (PEFT LoRA on q/k/v/o, base weights frozen)" if args.lora else ""
    text = (f"# Peak memory of one training step ({args.device}, {args.dtype}{lora})\n\n`{command}`;"
            f" {cfg}, {args.dtype}{frozen}. Peak above the pre-step level (weights and gradients excluded), median of "
            f"{args.repeats} child processes per point.\n\n{table}\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")
    os.makedirs(args.out, exist_ok=True)
    suffix = ("" if args.dtype == "float32" else f"_{args.dtype}") + ("_lora" if args.lora else "") + \
        ("" if default_model else f"_{args.model_type}")
    stem = os.path.join(args.out, f"memory_{args.device.split(':')[0]}{suffix}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in args.methods:
        ax.plot(args.depths, [peak[method, d] for d in args.depths], marker="o", label=METHOD_LABELS[method])
    ax.set(xscale="log", yscale="log", xlabel="layers", ylabel="step peak memory above weights+grads (MB)",
           title=f"Training-step memory vs depth\n(tiny {args.model_type}, {args.device}, {args.dtype}{lora})")
    ax.set_xticks(args.depths, [str(d) for d in args.depths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(text)


def _config_field(text: str) -> tuple[str, object]:
    """FIELD=VALUE -> (field, value read as JSON, else the string)."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


if __name__ == "__main__":
    main()
