"""Exact streams against float streams: how exactly backward rebuilds the inputs and the gradients, per precision,
and what the integer streams cost in memory and time.

    python bench/exact.py            # -> bench/results/exact.{md,json,png} (about 15 minutes on 2 cores)

Precision: `revcompile.check` (one step with inversion against the same coupled model under
`disable_inversion()`) on tiny olmoe, qwen3_moe, mixtral and deepseek_v3, 16 layers, random weights, batch 2 x 64,
in fp32, bf16 weights, fp32 weights under bf16 autocast and fp16 weights; the worst rebuilt-input error and the
worst layer-gradient error over the 16 layers. Cost: one training step of the memory benchmark's tiny Mixtral
(bf16, `--cost-depths` layers, batch 4 x 512) with exact and with float streams, child processes, peak RSS above the
pre-step level and the median of 3 step times.

    python bench/exact.py --kernels  # -> bench/results/exact_kernels_<device>.{md,json,png} (a minute)

Kernels: one exact step and one undo on a stream of the GPU speed benchmark's size (8 x 1024 tokens x hidden 1024,
bf16), eager (the operators dispatched) against compile=True's fused functions (`streams.compiled_steps`: the
kernels in Inductor's generated code), each timed over 10 calls after a warm-up.

    python bench/exact.py --headroom # -> bench/results/exact_headroom.{md,json} (a minute)

Headroom: what more room above a run's input costs (`exact_headroom`, the bits between the input's largest value and
the integer range; the grid's step grows with it): the logits of each family in bf16 weights on exact streams at
several headrooms, and on float streams, relative to the same weights' fp64 float streams.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
from tabulate import tabulate
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import revcompile  # noqa: E402
from revcompile.measure import MEMORY_CONFIG, measure_step  # noqa: E402
from revcompile.models import tiny_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "deepseek_v3")
PRECISIONS = {"fp32": (torch.float32, None), "bf16 weights": (torch.bfloat16, None),
              "bf16 autocast": (torch.float32, torch.bfloat16), "fp16 weights": (torch.float16, None)}
# (scheme, exact) rows: the function-changing schemes that add (exact possible) and MEFT, which cannot be
SCHEMES = [("symplectic", True), ("symplectic", False), ("midpoint", True), ("midpoint", False),
           ("leapfrog", True), ("leapfrog", False), ("meft1", False), ("meft2", False), ("meft3", False)]


def precision_row(family: str, scheme: str, exact: bool, precision: str, layers: int) -> dict:
    dtype, autocast = PRECISIONS[precision]
    model = tiny_model(family, num_hidden_layers=layers, dtype=dtype, use_cache=False)
    revcompile.make_reversible(model, scheme, exact=exact)
    ids = torch.randint(3, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = revcompile.check(model, ids, autocast=autocast)
    return dict(family=family, scheme=scheme, exact=exact, precision=precision, input_error=report.worst_input_error,
                grad_error=report.worst_grad_error, bit_exact=report.exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--scheme-family", default="olmoe", help="the family of the per-scheme table")
    parser.add_argument("--cost-depths", type=int, nargs="+", default=[8, 32], help="layers of the cost runs")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--kernels", action="store_true", help="only the eager vs compiled step kernels")
    parser.add_argument("--device", default="cpu", help="--kernels: where the stream lives")
    parser.add_argument("--headroom", action="store_true", help="only the precision cost of exact_headroom")
    args = parser.parse_args()
    if args.kernels:
        return kernels(args.device, args.out)
    if args.headroom:
        return headroom(args.families, args.out)
    if args.scheme_family not in args.families:  # (its symplectic row comes from the family table)
        parser.error(f"--scheme-family {args.scheme_family} must be one of --families")

    jobs = [(f, "symplectic", e, p) for f in args.families for p in PRECISIONS for e in (True, False)]
    jobs += [(args.scheme_family, s, e, p) for s, e in SCHEMES if s != "symplectic" for p in PRECISIONS]
    rows = [precision_row(*job, args.layers) for job in tqdm(jobs, desc="checks")]
    costs = []
    for depth in tqdm(args.cost_depths, desc="cost"):
        for method in ("revcompile", "revcompile-float"):
            costs.append(measure_step(method, depth, dtype="bfloat16", steps=3, **MEMORY_CONFIG))

    def cell(r):
        exact = "exact" if r["bit_exact"] else f"{r['input_error']:.2g}"
        return f"{exact} / {r['grad_error']:.2g}"

    by = {(r["family"], r["scheme"], r["exact"], r["precision"]): r for r in rows}
    headers = ["family", "streams", *PRECISIONS]
    family_table = tabulate([[f, "exact" if e else "float", *(cell(by[f, "symplectic", e, p]) for p in PRECISIONS)]
                             for f in args.families for e in (True, False)], headers=headers, tablefmt="github")
    scheme_table = tabulate([[s, "exact" if e else "float", *(cell(by[args.scheme_family, s, e, p])
                                                              for p in PRECISIONS)] for s, e in SCHEMES],
                            headers=["scheme", "streams", *PRECISIONS], tablefmt="github")
    cost = {(c["method"], c["depth"]): c for c in costs}
    cost_table = tabulate([[d, cost["revcompile-float", d]["peak_mb"], cost["revcompile", d]["peak_mb"],
                            cost["revcompile", d]["peak_mb"] / cost["revcompile-float", d]["peak_mb"],
                            cost["revcompile", d]["step_s"] / cost["revcompile-float", d]["step_s"]]
                           for d in args.cost_depths],
                          headers=["layers", "float streams peak MB", "exact streams peak MB", "exact / float memory",
                                   "exact / float time"], tablefmt="github", floatfmt=".3g")
    text = (f"# Exact streams against float streams\n\n`python bench/exact.py`. Each cell: worst rebuilt-input error "
            f"over the {args.layers} layers (\"exact\" when every input was rebuilt bit for bit) / worst layer-"
            "gradient relative error against `disable_inversion()`. Tiny models, random weights, batch 2 x 64.\n\n"
            f"## symplectic, {args.layers} layers\n\n{family_table}\n\n## every scheme on {args.scheme_family}, "
            f"{args.layers} layers\n\n{scheme_table}\n\nMEFT's steps multiply a stream by 0.1: integers cannot undo "
            "that exactly, so MEFT runs on float streams (exact=True is refused with that reason).\n\n"
            "## cost, bf16 training step (tiny Mixtral hidden 128, batch 4 x 512, CPU)\n\n" + cost_table + "\n")
    write(args.out, "exact", text, {"precision": rows, "cost": costs})
    plot(rows, args.families, os.path.join(args.out, "exact.png"), args.layers)


def write(out: str, stem: str, text: str, data) -> str:
    """Write `text` to out/stem.md and `data` to out/stem.json, print the text; returns out/stem."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem)
    with open(path + ".md", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(text)
    return path


def headroom(families: list[str], out: str, layers: int = 8, headrooms: tuple[int, ...] = (12, 16, 20, 24, 28)) -> None:
    """Logits relative error against fp64 float streams, bf16 weights, per family and headroom (and float streams)."""
    columns = {f"exact, headroom {h}{' (default)' if h == 16 else ''}": {"exact": True, "exact_headroom": h}
               for h in headrooms}
    columns["float streams"] = {"exact": False}
    rows = []
    for family in tqdm(families, desc="headroom"):
        reference = revcompile.make_reversible(tiny_model(family, dtype=torch.float64, num_hidden_layers=layers),
                                               exact=False)
        ids = torch.randint(3, 100, (4, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference.eval()(ids).logits
        row = {"family": family}
        for name, options in columns.items():
            model = revcompile.make_reversible(tiny_model(family, dtype=torch.bfloat16, num_hidden_layers=layers),
                                               **options)
            with torch.no_grad():
                logits = model.eval()(ids).logits.double()
            row[name] = float((logits - expected).norm() / expected.norm())
        rows.append(row)
    table = tabulate([[r["family"], *(r[c] for c in columns)] for r in rows], headers=["family", *columns],
                     tablefmt="github", floatfmt=".2g")
    text = (f"# What exact_headroom costs\n\n`python bench/exact.py --headroom`: tiny models, {layers} layers, random "
            "weights in bf16, batch 4 x 64, eval; the logits' relative error against the same weights in fp64 on "
            "float streams. Each headroom bit doubles the grid's step (values up to the run input's largest times "
            "2**headroom fit in int32).\n\n" + table + "\n")
    write(out, "exact_headroom", text, rows)


def kernels(device: str, out: str, shape: tuple[int, ...] = (8, 1024, 1024)) -> None:
    """Eager against compiled exact-stream arithmetic: kernels launched and time, for a step and an undo."""
    import re
    import time

    from torch._inductor.utils import run_and_get_code
    from torch.utils._python_dispatch import TorchDispatchMode

    from revcompile.runtime.streams import FixedPoint, compiled_steps, step_integers, undo_integers

    class Operators(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(word in str(func) for word in ("view", "detach", "alias")):  # (no kernel)
                self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    def milliseconds(fn, call_args, calls=10):
        fn(*call_args)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        start = time.perf_counter()
        for _ in range(calls):
            fn(*call_args)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        return (time.perf_counter() - start) / calls * 1e3

    generator = torch.Generator(device).manual_seed(0)
    h = torch.randn(shape, generator=generator, device=device).to(torch.bfloat16)
    fmt = FixedPoint.choose(h)
    target, branch_out = fmt.quantize(h), torch.randn(shape, generator=generator, device=device).to(torch.bfloat16)
    common = (target, branch_out, [], (), False, *fmt.grid(branch_out))
    launch = re.compile(r"\btriton_\w+\.run\(" if device.startswith("cuda") else r"\bcpp_fused_\w+\(")
    rows = []
    for name, eager, fused, call_args in (("step", step_integers, compiled_steps()[0], (*common, fmt.overflow)),
                                          ("undo", undo_integers, compiled_steps()[1], common)):
        with Operators() as dispatched:
            eager(*call_args)
        _, codes = run_and_get_code(fused, *call_args)
        launched = sum(len(launch.findall(code)) for code in codes)  # kernel calls in Inductor's wrapper code
        rows.append(dict(op=name, eager_kernels=len(dispatched.names), eager_ops=" ".join(dispatched.names),
                         eager_ms=milliseconds(eager, call_args), compiled_kernels=launched,
                         compiled_ms=milliseconds(fused, call_args)))
    table = tabulate([[r["op"], r["eager_kernels"], r["eager_ms"], r["compiled_kernels"], r["compiled_ms"],
                       r["eager_ms"] / r["compiled_ms"]] for r in rows],
                     headers=["", "eager kernels", "eager ms", "compiled kernels", "compiled ms", "eager / compiled"],
                     tablefmt="github", floatfmt=".3g")
    text = (f"# Exact-stream arithmetic, eager and compiled ({device})\n\n`python bench/exact.py --kernels --device "
            f"{device}`: one step and one undo on a bf16 stream of {' x '.join(map(str, shape))} (int32 integers), "
            "eager against `compiled_steps()` (what compile=True and the torch.compile backend run), 10 calls "
            f"each after a warm-up.\n\n{table}\n\nEager operators: " +
            "; ".join(f"{r['op']}: {r['eager_ops']}" for r in rows) + "\n")
    stem = write(out, f"exact_kernels_{device.split(':')[0]}", text, {"device": device, "shape": shape, "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["eager_ms"] for r in rows], 0.4, label="eager")
    ax.bar([i + 0.2 for i in x], [r["compiled_ms"] for r in rows], 0.4, label="compiled (compile=True, backend)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['eager_kernels']} kernels", (i - 0.2, r["eager_ms"]), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{r['compiled_kernels']}", (i + 0.2, r["compiled_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["op"] for r in rows])
    ax.set_ylabel("ms per call")
    ax.set_title(f"exact-stream arithmetic, {device}, bf16 {' x '.join(map(str, shape))}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def plot(rows: list[dict], families: list[str], path: str, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (2 * len(families))
    for i, precision in enumerate(PRECISIONS):
        for j, family in enumerate(families):
            for k, exact in enumerate((False, True)):
                r = next(r for r in rows if (r["family"], r["scheme"], r["exact"], r["precision"]) ==
                         (family, "symplectic", exact, precision))
                x = i + (2 * j + k) * width - 0.4
                ax.bar(x, max(r["grad_error"], 1e-9), width, color="tab:green" if exact else "tab:red",
                       label=("exact streams" if exact else "float streams") if i == j == 0 else None)
    ax.set_xticks(range(len(PRECISIONS)), list(PRECISIONS))
    ax.set(yscale="log", ylabel="worst layer-gradient error vs reference",
           title=f"symplectic, {layers} layers, {', '.join(families)}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
