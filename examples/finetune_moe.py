"""Full fine-tuning of a pretrained tiny MoE on another real-text domain, three ways, as a user would do it.

    python examples/finetune_moe.py          # ~5 minutes on 2 cores -> bench/results/finetune.{md,json,png}
    python examples/finetune_moe.py --dtype bfloat16 --methods revcompile-reference revcompile revcompile-float \
        --seeds 0 1 --steps 150                 # bf16 weights -> bench/results/finetune_bfloat16.{md,json,png}

The model is the tiny Mixtral-style MoE that examples/pretrain_tiny_moe.py pretrains on the standard library's
sources (it is pretrained first if the cache is empty). It is fine-tuned, every parameter, on English prose: the
help topics that ship with Python (`pydoc_data`), with the same seed, batches and optimizer, by
- plain training,
- Hugging Face activation checkpointing,
- revcompile (default scheme, converted from the pretrained model).
Each method runs in a child process of its own (glibc's mmap threshold fixed, as in revcompile/measure.py), so
its peak RSS above the level before training (gradients, optimizer state and activations: everything training
adds to the loaded model) is its own. The table reports held-out loss before and after, its ratio to the first
method's, that peak and the time; the plot shows the held-out loss every `--eval-every` steps.

With `--dtype bfloat16` (weights and optimizer state in bf16) and `--seeds`, the question is whether reversible
training in bf16 follows the same model trained with ordinary autograd: `revcompile-reference` (the converted model,
`invert=False`) under each seed gives the run-to-run noise band, `revcompile` (exact streams, the default) and
`revcompile-float` (exact=False) are run with the first seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from revcompile.pretrained import load_pretrained  # noqa: E402
from revcompile.data import byte_batches, pydoc_text  # noqa: E402
from revcompile.measure import METHOD_LABELS, SPEED_METHODS, prepare, reset_peak_rss, rss_bytes  # noqa: E402
from revcompile.models import as_loaded  # noqa: E402

RESULTS = os.path.join(HERE, "..", "bench", "results")
METHODS = ("plain", "checkpointing", "revcompile")


def held_out_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(ids, labels=ids).loss) for ids in batches) / len(batches)
    model.train()
    return loss


def finetune(pretrained: torch.nn.Module, method: str, train: list[torch.Tensor], held_out: list[torch.Tensor],
             lr: float, dtype: torch.dtype, seed: int, eval_every: int) -> dict:
    model = prepare(as_loaded(copy.deepcopy(pretrained), dtype), method)
    before = held_out_loss(model, held_out)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, curve = [], [(0, before)]
    base = rss_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    for step, ids in enumerate(tqdm(train, desc=METHOD_LABELS[method], mininterval=5), 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if step % eval_every == 0:
            curve.append((step, held_out_loss(model, held_out)))
    seconds = time.perf_counter() - start
    peak_mb = (rss_bytes("VmHWM") - base) / 2**20
    return dict(method=method, seed=seed, held_out_before=before, held_out_after=held_out_loss(model, held_out),
                losses=losses, curve=curve, peak_mb=peak_mb, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=SPEED_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the batch order and initial state; the first method runs under each")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--from-json", help="redraw the table and plot from an earlier run's JSON")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # "method:seed", in a child process
    args = parser.parse_args()

    if args.only:
        method, seed = args.only.split(":")
        text = pydoc_text()
        split = int(len(text) * 0.9)
        train = byte_batches(text[:split], args.batch, args.seq, args.steps, seed=1 + int(seed))
        held_out = byte_batches(text[split:], 8, args.seq, 8, seed=2)
        print(json.dumps(finetune(load_pretrained(), method, train, held_out, args.lr, getattr(torch, args.dtype),
                                  int(seed), args.eval_every)))
        return
    if args.from_json:
        with open(args.from_json) as f:
            runs = json.load(f)
    else:
        load_pretrained()  # pretrain once, here, if the cache is empty
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        runs = []
        jobs = [(args.methods[0], seed) for seed in args.seeds] + [(m, args.seeds[0]) for m in args.methods[1:]]
        for method, seed in jobs:
            child = subprocess.run([sys.executable, __file__, "--only", f"{method}:{seed}", *sys.argv[1:]], env=env,
                                   check=True, stdout=subprocess.PIPE, text=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    write_report(runs, args)


def write_report(runs: list[dict], args: argparse.Namespace) -> None:
    """The table (and how far each run's training losses are from the first run's), the JSON and the plot."""
    first = runs[0]
    rows = [[METHOD_LABELS[r["method"]], r["seed"], r["held_out_before"], r["held_out_after"],
             r["held_out_after"] / first["held_out_after"], r["peak_mb"], r["seconds"]] for r in runs]
    table = tabulate(rows, headers=["method", "seed", "held-out loss before", "after", f"after / {first['method']}",
                                    "peak MB", "time s"], tablefmt="github", floatfmt=".4g")
    notes = []
    for r in runs[1:]:
        if r["seed"] != first["seed"]:  # other batches: only the held-out loss compares
            continue
        if r["losses"] == first["losses"] and r["curve"] == first["curve"]:
            verdict = "identical to the first run's, bit for bit"
        else:
            gap = max(abs(a - b) for a, b in zip(r["losses"], first["losses"]))
            verdict = f"not the first run's (training losses up to {gap:.3g} apart)"
        notes.append(f"- {METHOD_LABELS[r['method']]}, same seed: the training losses of all {len(r['losses'])} steps "
                     f"and the held-out evaluations {verdict}")
    name = "finetune" if args.dtype == "float32" else f"finetune_{args.dtype}"
    command = " ".join(a for a in sys.argv[1:] if not a.startswith("--from-json") and a != args.from_json)
    text_out = (f"# Full fine-tuning of a pretrained tiny MoE on pydoc_data prose ({args.dtype})\n\n"
                f"`python examples/finetune_moe.py {command}`; batch {args.batch} x {args.seq} "
                f"bytes, AdamW lr {args.lr}, same batches for every method of one seed; held-out loss in nats per "
                f"byte.\n\n{table}\n\n" + "\n".join(notes) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text_out)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(runs, f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, marker=".", label=f"{METHOD_LABELS[r['method']]}, seed {r['seed']}")
    ax.set(xlabel="step", ylabel="held-out loss (nats per byte)",
           title=f"Fine-tuning a pretrained tiny MoE on pydoc_data ({args.dtype})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=120)
    print(text_out)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
