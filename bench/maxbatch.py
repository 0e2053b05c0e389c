"""The largest batch whose whole training step (layers, LM head and loss) stays under a memory cap, at a real
vocabulary: HF activation checkpointing with its default loss and with revcompile's chunked loss, and revcompile,
on a tiny Mixtral (hidden 256, vocab 32,000, seq 512; each measurement a child process, see revcompile/measure.py).

    python bench/maxbatch.py --depth 16         # CPU, cap 512 MB -> bench/results/maxbatch_d16.{md,json,png}
    python bench/maxbatch.py --depth 16 --search --cap-mb 256   # -> maxbatch_d16_search.*
    python bench/maxbatch.py --depth 64 --search --cap-mb 256 --max-runs 11 --resume OLD.json  # close a search

The sequence length stays fixed (512). Each step's peak is split by phase (revcompile.measure.PhasePeaks): what the
layers keep when the head starts, the head's working set, the layers' backward. Two ways to find the batch:
- default (`--fit-batches 1 2`): measure the peak at a few small batches and fit a straight line (memory grows
  linearly with batch: `fixed + per_sequence * batch`); the largest batch is where the line reaches the cap. For a
  machine where a step at the searched batch takes minutes.
- `--search`: measure until the bracket closes. The batch doubles from 1 until a step goes over the cap, then the
  bracket is split where a straight line through the peaks measured reaches the cap.
The cap applies to the step's peak above weights and gradients (`peak_mb`), not to the process total. With
`--optimizer-batch B` the script also measures, at batch B, the total peak (weights, gradients, AdamW state and
the step) of revcompile with AdamW stepped after backward and inside it (revcompile.optimizer_in_backward).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.measure import HEAD_METHODS, METHOD_LABELS, measure_step, onednn_for_memory  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# issue 12's configuration: tiny Mixtral at a real vocabulary, where the logits are the largest tensors of a step
CONFIG = dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_attention_heads=8,
              num_key_value_heads=8)


def measure(method: str, batch: int, args: argparse.Namespace, **extra) -> dict:
    """One step of `method` at `batch` in a child process, its peak split by phase."""
    return measure_step(method, args.depth, device=args.device, dtype=args.dtype, batch=batch, seq=args.seq,
                        split=True, warmup_batch=1, onednn=onednn_for_memory(args.device, args.dtype),
                        vocab_size=args.vocab, **dict(CONFIG, model_type=args.family), **extra)


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


def largest_batch(method: str, args: argparse.Namespace, earlier: list[dict] = ()) -> dict:
    """Search the largest batch of `method` under args.cap_mb in at most args.max_runs child runs, continuing from
    the `earlier` runs of a search that stopped before closing (`--resume`; they count toward args.max_runs).

    Returns the method, `batch` (largest known to fit, 0 if none), `over` (smallest known not to fit, None if
    none), their peaks and every run's measurement; `over == batch + 1` means the search closed.
    """
    runs: list[dict] = list(earlier)
    peak: dict[int, float] = {run["batch"]: run["peak_mb"] for run in runs}
    progress = tqdm(total=args.max_runs, initial=len(runs), desc=METHOD_LABELS[method], unit="run", leave=False)

    def fits(batch: int) -> bool:
        run = measure(method, batch, args)
        run["fits"] = run["peak_mb"] <= args.cap_mb
        runs.append(run)
        peak[batch] = run["peak_mb"]
        progress.update()
        progress.set_postfix(batch=batch, peak_mb=f"{run['peak_mb']:.0f}")
        return run["fits"]

    fit = max((run["batch"] for run in runs if run["fits"]), default=0)
    over = min((run["batch"] for run in runs if not run["fits"]), default=None)
    while (over is None or over - fit > 1) and len(runs) < args.max_runs:
        candidate = next_batch(fit, over, peak, args.cap_mb)
        if fits(candidate):
            fit = candidate
        else:
            over = candidate
    progress.close()
    return {"method": method, "batch": fit, "peak_mb": peak.get(fit), "over": over, "over_peak_mb": peak.get(over),
            "runs": runs}


def fitted_batch(method: str, args: argparse.Namespace) -> dict:
    """Measure `method` at args.fit_batches and fit peak = fixed + per_sequence * batch (least squares); the
    largest batch is where that line reaches the cap (0 if batch 1 does not fit)."""
    runs = [measure(method, batch, args) for batch in tqdm(args.fit_batches, desc=METHOD_LABELS[method], leave=False)]
    xs, ys = [r["batch"] for r in runs], [r["peak_mb"] for r in runs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    fixed = mean_y - slope * mean_x
    batch = max(0, math.floor((args.cap_mb - fixed) / slope)) if slope > 0 else math.inf
    return {"method": method, "batch": batch, "per_sequence_mb": slope, "fixed_mb": fixed, "runs": runs}


def megabytes(value: float | None) -> str:
    """`value` in MB with one decimal, or "-" when unmeasured."""
    return "-" if value is None else f"{value:.1f}"


def report(results: list[dict], optimizer_runs: list[dict], args: argparse.Namespace) -> str:
    """The markdown tables and notes."""
    batch = {r["method"]: r["batch"] for r in results}

    def ratio(method: str, base: str) -> str:
        return f"{batch[method] / batch[base]:.1f}x" if batch.get(base) else "-"

    hidden = CONFIG["hidden_size"]
    rows = []
    for r in results:
        last = r["runs"][-1] if args.search else max(r["runs"], key=lambda run: run["batch"])
        if args.search:  # the split of the largest batch that fit
            last = next((run for run in reversed(r["runs"]) if run["fits"]), last)
        rows.append([METHOD_LABELS[r["method"]], r["batch"], r["batch"] * args.seq, ratio(r["method"], "checkpointing"),
                     ratio(r["method"], "checkpointing-chunked"),
                     megabytes(r.get("per_sequence_mb")), megabytes(r.get("fixed_mb")), last["batch"],
                     megabytes(last["peak_mb"]), f"{last['peak_mb'] * 1024 / (last['batch'] * args.seq):.1f}",
                     megabytes(last.get("layers_forward_mb")), megabytes(last["kept_mb"]),
                     megabytes(last["head_mb"] - last["kept_mb"]), megabytes(last["layers_backward_mb"]),
                     megabytes(last["weights_mb"] + last["grads_mb"])])
    table = tabulate(rows, headers=["method", "largest batch", "tokens / step", "vs HF ckpt", "vs HF ckpt + chunked",
                                    "MB / sequence", "fixed MB", "measured at batch", "step peak MB",
                                    "step peak KB / token", "layers' forward peak", "kept by the layers at the head",
                                    "head working set", "layers' backward peak", "weights + grads MB"],
                     tablefmt="github")
    how = (f"batch searched in child runs until the bracket closed (at most {args.max_runs} per method)" if args.search
           else f"peaks measured at batches {', '.join(map(str, args.fit_batches))} (one child process each) and "
                "fitted with a straight line, fixed MB + MB / sequence x batch; the largest batch is where it reaches "
                "the cap (extrapolated, not run)")
    notes = [f"sequence fixed at {args.seq} tokens; tokens / step = batch x {args.seq}; {how}",
             f"cap {args.cap_mb:g} MB on the step's peak above the pre-step level: weights and gradients "
             "(allocated before the step) are not counted",
             f"split of one measured step (peak {'max_memory_allocated' if args.device.startswith('cuda') else 'RSS'} "
             "by phase, above the pre-step level): the peak of the layers' "
             "forward; what the layers keep for backward when the LM head starts; the head's working set (peak from "
             "the head's forward to the gradient of its input, minus what was kept); the peak of the layers' backward "
             "after it",
             f"the floor of a reversible step is its streams and their gradients: 3 streams (symplectic: q, p, h0) "
             f"x hidden {hidden} x (4 + 4) bytes (fp32 streams, or int32 exact streams in a 16-bit model; the packed "
             f"gradients travel in fp32 either way) = {3 * hidden * 8 / 1024:g} KB per token, plus one slice of one "
             "branch's recompute (a constant: at most 2,048 tokens on CPU)",
             f"{args.depth} layers, tiny {args.family} ("
             f"{', '.join(f'{k}={v}' for k, v in CONFIG.items() if k != 'model_type')}, 4 experts top-2), "
             f"vocab {args.vocab}, sdpa attention, eager experts, {args.dtype}, {args.device}"]
    notes += [f"{METHOD_LABELS[r['method']]}: the search stopped at {args.max_runs} runs before closing; the "
              f"largest batch is at least {r['batch']}" + (f" and below {r['over']}" if r["over"] else "")
              for r in results if args.search and (r["over"] is None or r["over"] - r["batch"] > 1)]
    command = (f"python bench/maxbatch.py --device {args.device} --depth {args.depth} --cap-mb {args.cap_mb:g} "
               + (f"--family {args.family} " if args.family != "mixtral" else "")
               + (f"--dtype {args.dtype} " if args.dtype != "float32" else "") +
               f"--seq {args.seq} --vocab {args.vocab} --methods {' '.join(args.methods)} "
               + (f"--search --max-runs {args.max_runs}" if args.search else
                  f"--fit-batches {' '.join(map(str, args.fit_batches))}")
               + (f" --optimizer-batch {args.optimizer_batch}" if args.optimizer_batch else ""))
    text = (f"# Largest batch under a {args.cap_mb:g} MB step-memory cap, vocab {args.vocab} ({args.device}, "
            f"{args.family}, {args.dtype})\n\n"
            f"`{command}`\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    if optimizer_runs:
        rows = [[METHOD_LABELS[r["method"]], r["optimizer"], r["batch"], megabytes(r["total_peak_mb"]),
                 megabytes(r["weights_mb"]), megabytes(r["peak_mb"])] for r in optimizer_runs]
        text += ("\n## Optimizer state and gradients\n\n" + tabulate(
            rows, headers=["method", "optimizer", "batch", "total peak MB (above the process before the model)",
                           "weights MB", "step peak above weights, grads, state MB"], tablefmt="github")
            + "\n\n- adamw: AdamW.step() after backward, zero_grad(set_to_none=True); adamw-in-backward: "
              "revcompile.optimizer_in_backward(model, torch.optim.AdamW), each parameter stepped and its gradient "
              "freed as soon as backward completes it\n")
    return text


def plot(results: list[dict], args: argparse.Namespace, path: str) -> None:
    """Bar chart of tokens per step at the largest batch, one bar a method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [textwrap.fill(METHOD_LABELS[r["method"]], 22) for r in results]
    tokens = [r["batch"] * args.seq for r in results]
    bars = ax.bar(labels, tokens, color=[f"C{HEAD_METHODS.index(r['method'])}" for r in results])
    ax.bar_label(bars, [f"batch {r['batch']}" for r in results])
    ax.set(ylabel=f"tokens per step (batch x {args.seq})",
           title=f"Largest step under {args.cap_mb:g} MB above weights+grads\n"
                 f"(tiny {args.family}, {args.depth} layers, vocab {args.vocab}, {args.dtype}, {args.device})")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-mb", type=float, default=512, help="cap on the step's peak above weights+grads")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", nargs="+", default=["checkpointing", "checkpointing-chunked", "revcompile"],
                        choices=HEAD_METHODS)
    parser.add_argument("--search", action="store_true", help="search the batch instead of fitting a line")
    parser.add_argument("--fit-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-runs", type=int, default=10, help="--search: child runs per method at most")
    parser.add_argument("--optimizer-batch", type=int, default=0,
                        help="also measure revcompile's total peak with AdamW and AdamW in backward at this batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", default="mixtral", help="the tiny model's family (a transformers model_type)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights' dtype")
    parser.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot")
    parser.add_argument("--from-json", help="redraw the table and plot from an earlier run's JSON (run with the same "
                        "options) instead of measuring")
    parser.add_argument("--spot", type=int, nargs="+", help="only measure these batches of each method (one JSON "
                        "line a run, nothing written): to check a bracket after a change without a search")
    parser.add_argument("--resume", help="--search: continue an earlier run's searches (its JSON) that stopped "
                        "before closing, up to --max-runs runs per method in all")
    args = parser.parse_args()

    if args.spot:  # a bracket checked without a search: one JSON line a run, nothing written
        for method in args.methods:
            for batch in args.spot:
                run = measure(method, batch, args)
                print(json.dumps(dict(run, fits=run["peak_mb"] <= args.cap_mb)), flush=True)
        return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, optimizer_runs = saved["results"], saved["optimizer_runs"]
    elif args.resume:
        with open(args.resume) as f:
            saved = json.load(f)
        results = [largest_batch(r["method"], args, r["runs"]) for r in tqdm(saved["results"], desc="methods")]
        optimizer_runs = saved["optimizer_runs"]
    else:
        find = largest_batch if args.search else fitted_batch
        results = [find(method, args) for method in tqdm(args.methods, desc="methods")]
        optimizer_runs = [measure("revcompile", args.optimizer_batch, args, optimizer=optimizer)
                          for optimizer in ("adamw", "adamw-in-backward")] if args.optimizer_batch else []
    text = report(results, optimizer_runs, args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"maxbatch_d{args.depth}" + ("_search" if args.search else "")
                        + (f"_{args.family}" if args.family != "mixtral" else "")
                        + (f"_{args.dtype}" if args.dtype != "float32" else ""))
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"cap_mb": args.cap_mb, "depth": args.depth, "seq": args.seq, "vocab": args.vocab,
                   "device": args.device, "results": results, "optimizer_runs": optimizer_runs}, f, indent=1)
    plot(results, args, stem + ".png")
    print(text)


if __name__ == "__main__":
    main()
