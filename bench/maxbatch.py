"""The largest batch whose training step stays under a memory cap: plain training, HF activation checkpointing
and revcompile, on issue 2's configuration at depth 16 (each measurement a child process; see
revcompile/measure.py).

    python bench/maxbatch.py                    # CPU, depth 16, cap 192 MB -> bench/results/maxbatch.{md,json,png}

The sequence length stays fixed (512) and the batch size is searched. It doubles from 1 until a step goes over
the cap, then the bracket is split until it closes. Memory grows about linearly with batch, so both phases aim by
a straight line through the peaks already measured: growth stops one past where the line reaches the cap, and the
bracket is split where it does; a search closes in a run or two past the doubling, where halving takes four.
The cap applies to the step's peak above weights and gradients (`peak_mb`), not to the process total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.measure import MEMORY_CONFIG, METHOD_LABELS, METHODS, measure_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def crossing(small: int, large: int, peak: dict[int, float], cap_mb: float) -> float:
    """The batch where the straight line through the peaks measured at two batches reaches the cap (inf if flat)."""
    slope = (peak[large] - peak[small]) / (large - small)
    return math.inf if slope <= 0 else large + (cap_mb - peak[large]) / slope


def next_batch(fit: int, over: int | None, peak: dict[int, float], cap_mb: float) -> int:
    """The batch to measure next, given the largest batch that fit and the smallest that did not (None: none yet).

    Growing: double, but go no further than one past where the last two peaks, extrapolated, reach the cap.
    Bracketed: the batch inside (fit, over) where the peaks at its ends, interpolated, reach the cap.
    """
    if over is None:
        if len(peak) < 2:
            return max(1, 2 * fit)
        limit = crossing(*sorted(peak)[-2:], peak, cap_mb)
        return 2 * fit if limit >= 2 * fit else math.floor(limit) + 1
    return min(max(math.floor(crossing(fit, over, peak, cap_mb)), fit + 1), over - 1)


def largest_batch(method: str, args: argparse.Namespace) -> dict:
    """Search the largest batch of `method` under args.cap_mb in at most args.max_runs child runs.

    Returns the method, `batch` (largest known to fit, 0 if none), `over` (smallest known not to fit, None if
    none), their peaks and every run's measurement; `over == batch + 1` means the search closed.
    """
    runs: list[dict] = []
    peak: dict[int, float] = {}
    progress = tqdm(total=args.max_runs, desc=METHOD_LABELS[method], unit="run", leave=False)

    def fits(batch: int) -> bool:
        config = dict(MEMORY_CONFIG, batch=batch, seq=args.seq)
        run = measure_step(method, args.depth, device=args.device, **config)
        run["fits"] = run["peak_mb"] <= args.cap_mb
        runs.append(run)
        peak[batch] = run["peak_mb"]
        progress.update()
        progress.set_postfix(batch=batch, peak_mb=f"{run['peak_mb']:.0f}")
        return run["fits"]

    fit, over = 0, None
    while (over is None or over - fit > 1) and len(runs) < args.max_runs:
        candidate = next_batch(fit, over, peak, args.cap_mb)
        if fits(candidate):
            fit = candidate
        else:
            over = candidate
    progress.close()
    return {"method": method, "batch": fit, "peak_mb": peak.get(fit), "over": over, "over_peak_mb": peak.get(over),
            "runs": runs}


def megabytes(value: float | None) -> str:
    """`value` in MB with one decimal, or "-" when unmeasured."""
    return "-" if value is None else f"{value:.1f}"


def report(results: list[dict], args: argparse.Namespace) -> str:
    """The markdown table and notes."""
    plain = next((r["batch"] for r in results if r["method"] == "plain"), 0)
    rows = [[METHOD_LABELS[r["method"]], r["batch"], r["batch"] * args.seq,
             f"{r['batch'] / plain:.1f}x" if plain else "-",
             megabytes(r["peak_mb"]), "-" if r["over"] is None else f"{r['over']} ({megabytes(r['over_peak_mb'])})",
             len(r["runs"])] for r in results]
    table = tabulate(rows, headers=["method", "largest batch", "tokens / step", "vs plain", "its step peak MB",
                                    "smallest batch over the cap (MB)", "child runs"], tablefmt="github")
    cfg = ", ".join(f"{k}={v}" for k, v in MEMORY_CONFIG.items() if k not in ("batch", "seq"))
    notes = [f"sequence fixed at {args.seq} tokens, batch size searched; tokens / step = batch x {args.seq}",
             f"cap {args.cap_mb:g} MB on the step's peak above the pre-step level: weights and gradients "
             "(allocated before the step) are not counted",
             f"{args.depth} layers, {cfg}, fp32, {args.device}"]
    notes += [f"{METHOD_LABELS[r['method']]}: the search stopped at {args.max_runs} runs before closing; the "
              f"largest batch is at least {r['batch']}" + (f" and below {r['over']}" if r["over"] else "")
              for r in results if r["over"] is None or r["over"] - r["batch"] > 1]
    return (f"# Largest batch under a {args.cap_mb:g} MB step-memory cap ({args.device})\n\n"
            f"`python bench/maxbatch.py --device {args.device} --depth {args.depth} --cap-mb {args.cap_mb:g} "
            f"--seq {args.seq} --max-runs {args.max_runs} --methods {' '.join(args.methods)}`\n\n"
            f"{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")


def plot(results: list[dict], args: argparse.Namespace, path: str) -> None:
    """Bar chart of tokens per step at the largest batch, one bar a method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [METHOD_LABELS[r["method"]] for r in results]
    tokens = [r["batch"] * args.seq for r in results]
    bars = ax.bar(labels, tokens, color=[f"C{METHODS.index(r['method'])}" for r in results])
    ax.bar_label(bars, [f"batch {r['batch']}" for r in results])
    ax.set(ylabel=f"tokens per step (batch x {args.seq})",
           title=f"Largest step under {args.cap_mb:g} MB above weights+grads\n"
                 f"(tiny Mixtral, {args.depth} layers, {args.device})")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-mb", type=float, default=192, help="cap on the step's peak above weights+grads")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--seq", type=int, default=MEMORY_CONFIG["seq"])
    parser.add_argument("--methods", nargs="+", default=["plain", "checkpointing", "revcompile"], choices=METHODS)
    parser.add_argument("--max-runs", type=int, default=10, help="child runs per method at most")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot")
    args = parser.parse_args()

    results = [largest_batch(method, args) for method in tqdm(args.methods, desc="methods")]
    text = report(results, args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "maxbatch")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"cap_mb": args.cap_mb, "depth": args.depth, "seq": args.seq, "device": args.device,
                   "results": results}, f, indent=1)
    plot(results, args, stem + ".png")
    print(text)


if __name__ == "__main__":
    main()
