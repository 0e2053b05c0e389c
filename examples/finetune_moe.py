"""Full fine-tuning of a pretrained tiny MoE on another real-text domain, three ways, as a user would do it.

    python examples/finetune_moe.py          # ~5 minutes on 2 cores -> bench/results/finetune.{md,json,png}

The model is the tiny Mixtral-style MoE that examples/pretrain_tiny_moe.py pretrains on the standard library's
sources (it is pretrained first if the cache is empty). It is fine-tuned, every parameter, on English prose: the
help topics that ship with Python (`pydoc_data`), with the same seed, batches and optimizer, by
- plain training,
- Hugging Face activation checkpointing,
- revcompile (default scheme, converted from the pretrained model).
Each method runs in a child process of its own (glibc's mmap threshold fixed, as in revcompile/measure.py), so
its peak RSS above the level before training (gradients, optimizer state and activations: everything training
adds to the loaded model) is its own. The table reports held-out loss before and after, its ratio to plain
training, that peak and the time.
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
from revcompile.measure import METHOD_LABELS, prepare, reset_peak_rss, rss_bytes  # noqa: E402

RESULTS = os.path.join(HERE, "..", "bench", "results")
METHODS = ("plain", "checkpointing", "revcompile")


def held_out_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(ids, labels=ids).loss) for ids in batches) / len(batches)
    model.train()
    return loss


def finetune(pretrained: torch.nn.Module, method: str, train: list[torch.Tensor], held_out: list[torch.Tensor],
             lr: float) -> dict:
    model = prepare(copy.deepcopy(pretrained), method)
    before = held_out_loss(model, held_out)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    base = rss_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    for ids in tqdm(train, desc=METHOD_LABELS[method], mininterval=5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    peak_mb = (rss_bytes("VmHWM") - base) / 2**20
    return dict(method=method, held_out_before=before, held_out_after=held_out_loss(model, held_out),
                losses=losses, peak_mb=peak_mb, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # one method, in a child process
    args = parser.parse_args()

    if args.only:
        text = pydoc_text()
        split = int(len(text) * 0.9)
        train = byte_batches(text[:split], args.batch, args.seq, args.steps, seed=1)
        held_out = byte_batches(text[split:], 8, args.seq, 8, seed=2)
        print(json.dumps(finetune(load_pretrained(), args.only, train, held_out, args.lr)))
        return
    load_pretrained()  # pretrain once, here, if the cache is empty
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    runs = []
    for method in METHODS:
        child = subprocess.run([sys.executable, __file__, "--only", method, *sys.argv[1:]], env=env, check=True,
                               stdout=subprocess.PIPE, text=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))

    plain = runs[0]["held_out_after"]
    rows = [[METHOD_LABELS[r["method"]], r["held_out_before"], r["held_out_after"], r["held_out_after"] / plain,
             r["peak_mb"], r["seconds"]] for r in runs]
    table = tabulate(rows, headers=["method", "held-out loss before", "after", "after / plain", "peak MB",
                                    "time s"], tablefmt="github", floatfmt=".4g")
    text_out = (f"# Full fine-tuning of a pretrained tiny MoE on pydoc_data prose\n\n`python examples/finetune_moe.py "
                f"--steps {args.steps}`; batch {args.batch} x {args.seq} bytes, AdamW lr {args.lr}, same seed and "
                f"batches for every method; held-out loss in nats per byte.\n\n{table}\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "finetune.md"), "w") as f:
        f.write(text_out)
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(runs, f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    window = 10
    for r in runs:
        smooth = [sum(r["losses"][max(0, i - window + 1):i + 1]) / len(r["losses"][max(0, i - window + 1):i + 1])
                  for i in range(len(r["losses"]))]
        ax.plot(smooth, label=METHOD_LABELS[r["method"]])
    ax.set(xlabel="step", ylabel=f"training loss (mean of {window} steps)",
           title="Fine-tuning a pretrained tiny MoE on pydoc_data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "finetune.png"), dpi=120)
    print(text_out)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
