"""Command line: `revcompile diff MODEL`, `revcompile check MODEL`, `revcompile demo`.

MODEL is a transformers model_type (a tiny config is built, random weights, no download) or a local directory
with a config.json. Errors are one line on stderr and exit status 2, never a traceback.

Example:
    $ revcompile diff mixtral
    $ revcompile diff qwen2_moe --dot graphs/
    $ revcompile check olmoe --dtype bfloat16 --layers 16
    $ revcompile demo
"""

from __future__ import annotations

import argparse
import operator
import os
import sys
import warnings
from collections import Counter

from tabulate import tabulate
from torch import fx

from .errors import RevcompileError


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        return next((f"op {k}" for k, v in vars(operator).items() if v is node.target), f"fn {node.target.__name__}")
    return f"method {node.target}"


def op_counts(*graphs: fx.Graph, skip_modules: tuple[str, ...] = ()) -> Counter:
    """How many times each operation runs in `graphs` (calls of the `skip_modules` are not counted)."""
    counts: Counter = Counter()
    for graph in graphs:
        for node in graph.nodes:
            if node.op in ("call_module", "call_function", "call_method") and node.target not in skip_modules:
                counts[_op_name(node)] += 1
    return counts


def to_dot(graph: fx.Graph, name: str) -> str:
    """Graphviz text of an fx graph (render with `dot -Tsvg`)."""
    lines = [f'digraph "{name}" {{', "  rankdir=TB; node [shape=box, fontname=monospace];"]
    for node in graph.nodes:
        label = node.name if node.op in ("placeholder", "output") else f"{node.name}\\n{_op_name(node)}"
        lines.append(f'  "{node.name}" [label="{label}"];')
        lines.extend(f'  "{src.name}" -> "{node.name}";' for src in node.all_input_nodes)
    return "\n".join(lines + ["}"]) + "\n"


def cmd_diff(args: argparse.Namespace) -> None:
    import revcompile
    from revcompile.models import load_model

    model = load_model(args.model)
    revcompile.make_reversible(model, scheme=args.scheme)
    plan = model._revcompile_plan
    print(plan, end="\n\n")
    pair = plan.pairs[0]
    before = fx.GraphModule(pair.module, pair.structure.trace.graph,
                            class_name=pair.module._revcompile.original_class.__name__)
    branches, coupled, inverse = pair.module._revcompile.generated()
    print(f"== {pair.layer} before (traced layer graph) ==\n{before.code.strip()}\n")
    # the pair's own branches, cut out of the layer graph (a scheme may compose them, with adapters, into others)
    cut = pair.module._revcompile.role_branches()
    for name, branch in cut.items():
        print(f"== branch {name} (cut out of the layer graph) ==\n{branch.code.strip()}\n")
    for name, branch in branches.items():
        if branch not in cut.values():
            print(f"== branch {name} (composed by the scheme) ==\n{branch}\n")
    print(f"== {pair.layer} ({pair.form}) after: generated {pair.scheme} coupling ==\n{coupled.code.strip()}\n")
    print(f"== generated inverse ==\n{inverse.code.strip()}\n")
    old = op_counts(pair.structure.trace.graph)
    new = op_counts(coupled.graph, *(b.graph for b in cut.values()), skip_modules=tuple(branches))
    rows = [[op, old[op], new[op], f"{new[op] - old[op]:+d}"] for op in sorted(old | new) if old[op] != new[op]]
    print("== op count changes per layer (forward) ==")
    print(tabulate(rows, headers=["op", "before", "after", "change"]) if rows else "(none)")
    if args.dot:
        os.makedirs(args.dot, exist_ok=True)
        for name, graph in (("before", before.graph), ("after", coupled.graph), ("inverse", inverse.graph),
                            *((f"branch_{n}", b.graph) for n, b in cut.items())):
            with open(os.path.join(args.dot, f"{name}.dot"), "w") as f:
                f.write(to_dot(graph, name))
        print(f"\nwrote .dot graphs to {args.dot}")


def cmd_check(args: argparse.Namespace) -> None:
    import torch

    import revcompile
    from revcompile.models import load_model

    overrides = {"num_hidden_layers": args.layers} if args.layers and not os.path.isdir(args.model) else {}
    torch.manual_seed(0)
    model = load_model(args.model, **overrides).to(getattr(torch, args.dtype))
    model.config.use_cache = False
    revcompile.make_reversible(model, scheme=args.scheme)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    autocast = getattr(torch, args.autocast) if args.autocast else None
    print(revcompile.check(model, ids.to(next(model.parameters()).device), autocast=autocast))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(depth=args.depth, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from .schemes import SCHEMES

    parser = argparse.ArgumentParser(prog="revcompile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    diff = sub.add_parser("diff", help="show a model's layer graph before and after conversion, and the inverse")
    diff.add_argument("model", help="a transformers model_type (tiny random config) or a local model directory")
    diff.add_argument("--scheme", choices=sorted(SCHEMES), help="default: chosen per layer form")
    diff.add_argument("--dot", metavar="DIR", help="also write the graphs as Graphviz .dot files into DIR")
    diff.set_defaults(func=cmd_diff)
    check = sub.add_parser("check", help="per-layer reconstruction and gradient error against the reference")
    check.add_argument("model", help="a transformers model_type (tiny random config) or a local model directory")
    check.add_argument("--scheme", choices=sorted(SCHEMES), help="default: chosen per layer form")
    check.add_argument("--dtype", default="float32", choices=["float64", "float32", "bfloat16"])
    check.add_argument("--autocast", choices=["bfloat16", "float16"], help="run the step under torch.autocast")
    check.add_argument("--layers", type=int, default=8, help="layers of the tiny config (default 8)")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seq", type=int, default=64)
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="convert a tiny Mixtral, train it, compare memory with the baselines")
    demo.add_argument("--depth", type=int, default=8, help="number of layers (default 8)")
    demo.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        args.func(args)
    except (RevcompileError, ValueError, OSError) as err:
        print(f"revcompile: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
