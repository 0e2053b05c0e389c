"""Every scheme on the project's pretrained tiny MoE: how far conversion moves the function, how much distillation
brings it back, what a training step costs, and how exact inversion is in bf16.

    python bench/schemes.py                     # -> bench/results/schemes.{md,json,png}   (~10 minutes, 2 cores)
    python bench/schemes.py --small             # a quick dry run (few steps, short sequences)
    python bench/schemes.py --schemes fixed_point fixed_point:anderson=0 --out /tmp/s   # a scheme with options

Model: examples/pretrain_tiny_moe.py's Mixtral-style MoE (8 layers, hidden 128, 4 experts top-2) pretrained on
standard-library sources (pretrained first if the cache is empty). Per scheme:
- KL(original || converted), nats per token on held-out text (modules not in the pretraining set), at conversion
  and after `--distill-steps` steps of `revcompile.distill` (AdamW, lr 1e-3, batch 8 x 128);
- peak memory and time of one training step (batch 4 x 512 tokens, fp32) relative to plain training, each in a
  child process (revcompile/measure.py);
- precision: `revcompile.check` in fp32, with bf16 weights, and with fp32 weights under bf16 autocast: the worst
  relative error of a rebuilt layer input and of a layer's gradients, over the 8 layers, with exact (integer)
  streams where the scheme allows them and with float streams;
- fixed_point and revffn: the fraction of fixed-point inversions that converged in forward (the rest kept their
  input), and the iterations (branch calls) an inversion took on average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import revcompile  # noqa: E402
from revcompile.data import byte_batches, stdlib_text  # noqa: E402
from revcompile.measure import measure_step, parse_scheme  # noqa: E402
from revcompile.models import as_loaded  # noqa: E402
from revcompile.pretrained import CACHE, PRETRAIN_MODULES, load_pretrained  # noqa: E402
from revcompile.runtime.streams import exact_refusal  # noqa: E402
from revcompile.schemes import get_scheme  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HELD_OUT = ["shlex", "fnmatch", "difflib"]


def inversions(model) -> tuple[float | None, float | None]:
    """(the fraction of fixed-point inversions that converged, their mean iterations), or Nones without any."""
    stats = [layer._revcompile.inversions for layer in revcompile.converted_layers(model)
             if layer._revcompile.scheme.implicit]
    total = sum(s.solved + s.stored for s in stats)
    if not total:
        return None, None
    return sum(s.solved for s in stats) / total, sum(s.iterations for s in stats) / total


PRECISIONS = (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
              ("autocast", torch.float32, torch.bfloat16))


def precision(original, spec: str, ids: torch.Tensor) -> dict:
    """Worst rebuilt-input and gradient errors over the layers: fp32, bf16 weights, fp32 weights under bf16 autocast;
    with exact streams (where the scheme allows them) and with float streams."""
    figures = {}
    scheme, options = parse_scheme(spec)
    modes = ("exact", "float") if exact_refusal(get_scheme(scheme, **options)) is None else ("float",)
    for mode in modes:
        for label, dtype, autocast in PRECISIONS:
            model = revcompile.make_reversible(as_loaded(copy.deepcopy(original), dtype), scheme, exact=mode == "exact",
                                               **options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # check() warns past the tolerance: the table shows it instead
                report = revcompile.check(model, ids, autocast=autocast)
            figures[f"{label}_{mode}"] = [report.worst_input_error, report.worst_grad_error, report.exact]
    return figures


def _precision_cell(r: dict, label: str) -> str:
    """"exact / 2.1e-3 (float: 0.81 / 0.77)": rebuilt-input error ("exact": bit for bit) / gradient error."""
    def pair(figures):
        return f"{'exact' if figures[2] else f'{figures[0]:.2g}'} / {figures[1]:.2g}"
    cell = pair(r[f"{label}_float"])
    return f"{pair(r[f'{label}_exact'])} (float: {cell})" if f"{label}_exact" in r else f"float: {cell}"


def scheme_figures(original, spec: str, held_out, train, ids, args) -> dict:
    scheme, options = parse_scheme(spec)
    model = revcompile.make_reversible(copy.deepcopy(original), scheme, **options)
    result = {"scheme": spec, "kl_converted": revcompile.kl_divergence(original, model.eval(), held_out)}
    if scheme == "fixed_point":  # the original function: nothing to distill
        result.update(kl_distilled=result["kl_converted"], distill_s_per_step=None)
        model.train()
        model(ids, labels=ids).loss.backward()  # one step, for the inversion statistics
    else:
        start = time.perf_counter()
        revcompile.distill(model, original, train, lr=args.lr, progress=False)
        result["distill_s_per_step"] = (time.perf_counter() - start) / len(train)
        result["kl_distilled"] = revcompile.kl_divergence(original, model.eval(), held_out)
    result["converged"], result["iterations"] = inversions(model)
    result.update(precision(original, spec, ids))
    return result


def cost(method: str, args) -> dict:
    runs = [measure_step(method, 8, batch=args.batch, seq=args.seq, steps=args.time_steps, pretrained=CACHE)
            for _ in range(args.repeats)]
    return {"peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "step_s": statistics.median(r["step_s"] for r in runs)}


def _schemes_flag(args) -> str:
    return "" if args.schemes == list(revcompile.SCHEMES) else " --schemes " + " ".join(args.schemes)


def write(results: list[dict], plain: dict, args) -> None:
    rows = []
    for r in results:
        rows.append([r["scheme"], r["kl_converted"], r["kl_distilled"], r["peak_mb"] / plain["peak_mb"],
                     r["step_s"] / plain["step_s"], *(_precision_cell(r, label) for label, _, _ in PRECISIONS),
                     "" if r["converged"] is None else f"{r['converged']:.2f}",
                     "" if r.get("iterations") is None else f"{r['iterations']:.1f}"])
    table = tabulate(rows, headers=["scheme", "KL at conversion", f"KL after {args.distill_steps} distill steps",
                                    "memory vs plain", "time vs plain", "fp32: input / grad err",
                                    "bf16 weights: input / grad err", "bf16 autocast: input / grad err",
                                    "fixed point converged", "iterations per inversion"], tablefmt="github",
                     floatfmt=".3g")
    text = ("# Schemes on the pretrained tiny MoE\n\n"
            f"`python bench/schemes.py{' --small' if args.small else ''}{_schemes_flag(args)}`: the Mixtral-style "
            "MoE of examples/pretrain_tiny_moe.py (8 layers, hidden 128, 4 experts top-2, pretrained on "
            "standard-library sources). KL(original || converted) in nats per token on held-out modules "
            f"({', '.join(HELD_OUT)}). "
            f"Memory and time: one training step, batch {args.batch} x {args.seq} tokens, fp32, CPU, relative to "
            f"plain training ({plain['peak_mb']:.1f} MB above the pre-step level, {plain['step_s']:.2f} s; median "
            f"of {args.repeats} child processes). fp32 / bf16 (weights) / autocast (fp32 weights, bf16 "
            "autocast): worst relative error over the 8 layers of the input backward rebuilt (\"exact\": bit for "
            "bit) and of the layer's gradients against the same model without inversion (revcompile.check), with "
            "exact streams (where the scheme allows them) and, in brackets, float streams "
            "(exact=False).\n\n" + table + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "schemes.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "schemes.json"), "w") as f:
        json.dump({"plain": plain, "schemes": results, "args": vars(args)}, f, indent=1)

    names = [r["scheme"] for r in results]
    fig, (ax_kl, ax_cost) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = torch.arange(len(names)).numpy()
    floor = 1e-6  # fixed_point's KL is 0: drawn at the floor of the log axis
    ax_kl.bar(x - 0.2, [max(r["kl_converted"], floor) for r in results], 0.4, label="at conversion")
    ax_kl.bar(x + 0.2, [max(r["kl_distilled"], floor) for r in results], 0.4,
              label=f"after {args.distill_steps} distill steps")
    ax_kl.set_yscale("log")
    for i, r in enumerate(results):
        if r["kl_converted"] == 0:
            ax_kl.annotate("exact", (i, floor), ha="center", va="bottom")
    ax_kl.set_ylabel("KL(original || converted), nats/token")
    ax_kl.set_xticks(x, names, rotation=30)
    ax_kl.legend()
    ax_cost.bar(x - 0.2, [r["peak_mb"] / plain["peak_mb"] for r in results], 0.4, label="peak memory")
    ax_cost.bar(x + 0.2, [r["step_s"] / plain["step_s"] for r in results], 0.4, label="step time")
    ax_cost.axhline(1, color="gray", lw=0.8)
    ax_cost.set_yscale("log")
    ax_cost.set_ylabel("relative to plain training (log)")
    ax_cost.set_xticks(x, names, rotation=30)
    ax_cost.legend()
    fig.suptitle("revcompile schemes on the pretrained tiny MoE (CPU, fp32)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "schemes.png"), dpi=120)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=list(revcompile.SCHEMES),
                        help="scheme names, each with options if wanted: fixed_point:anderson=0,max_iters=100")
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--time-steps", type=int, default=3, help="timed steps per child (median)")
    parser.add_argument("--repeats", type=int, default=2, help="child processes per method (median)")
    parser.add_argument("--small", action="store_true", help="a quick dry run")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--from-json", help="redraw the table and plot from an earlier run's JSON")
    args = parser.parse_args()
    for spec in args.schemes:
        try:
            scheme, options = parse_scheme(spec)
            get_scheme(scheme, **options)
        except (ValueError, revcompile.RevcompileError) as error:
            parser.error(f"--schemes {spec}: {error}")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        write(saved["schemes"], saved["plain"], argparse.Namespace(**{**saved["args"], "out": args.out}))
        return
    if args.small:
        args.distill_steps, args.seq, args.time_steps, args.repeats = 5, 64, 1, 1
        args.out = os.path.join(args.out, "small")

    warnings.filterwarnings("ignore", message=".*KV cache.*")
    torch.manual_seed(0)
    original = load_pretrained().eval()
    held_out = byte_batches(stdlib_text(HELD_OUT), 4, 128, 8, seed=99)
    train = byte_batches(stdlib_text(PRETRAIN_MODULES), 8, 128, args.distill_steps, seed=5)
    ids = held_out[0]
    plain = cost("plain", args)
    results = []
    for scheme in tqdm(args.schemes, desc="schemes"):
        result = scheme_figures(original, scheme, held_out, train, ids, args)
        result.update(cost(f"revcompile:{scheme}", args))
        results.append(result)
    write(results, plain, args)


if __name__ == "__main__":
    main()
