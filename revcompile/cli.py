"""Command line: `revcompile diff MODEL`, `revcompile check MODEL`, `revcompile demo`.

MODEL is a transformers model_type (a tiny config is built, random weights, no download) or a local directory
with a config.json. Errors are one line on stderr and exit status 2, never a traceback; `check` exits with 1 when
the gradient error exceeds the dtype's tolerance.

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
from .runtime.hf_outputs import OtherOutputs

DEFAULT_LAYERS = 8  # of `check`'s tiny config
LAYERS_HELP = ("only the model's first N decoder layers: of a local model directory, its config cut to N layers "
               "and their weights, the others never read (a large checkpoint in the memory of N layers)")


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


def cmd_diff(args: argparse.Namespace) -> int:
    import revcompile
    from revcompile.models import load_model

    model = load_model(args.model, layers=args.layers)
    revcompile.make_reversible(model, scheme=args.scheme)
    plan = revcompile.analyze(model)
    print(plan, end="\n\n")
    firsts = list({id(pair.structure): pair for pair in reversed(plan.pairs)}.values())[::-1]  # one per structure
    for number, pair in enumerate(firsts, 1):
        layers = [p.layer for p in plan.pairs if p.structure is pair.structure]
        print(f"==== converted layer structure {number} of {len(firsts)}: {', '.join(layers)} ====\n")
        show_structure(pair, args.dot, prefix=f"{pair.layer}." if len(firsts) > 1 else "")
    if args.dot:
        print(f"\nwrote .dot graphs to {args.dot}")
    return 0


def show_structure(pair, dot: str | None, prefix: str = "") -> None:
    """Print one converted layer's graphs (traced, branches, coupling, inverse) and op counts; write .dot files."""
    runtime = pair.module._revcompile
    before = fx.GraphModule(pair.module, pair.structure.trace.graph, class_name=runtime.original_class.__name__)
    branches, coupled, inverse = runtime.generated()
    print(f"== {pair.layer} before (traced layer graph) ==\n{before.code.strip()}\n")
    # the pair's own branches, cut out of the layer graph (a scheme may compose them, with adapters, into others)
    cut = runtime.role_branches()
    handing = {b.branch: b.positions for b in branches.values() if isinstance(b, OtherOutputs)}
    for name, branch in cut.items():
        also = f"; it also returns the layer's output {', '.join(map(str, handing[branch]))}" if branch in handing \
            else ""
        print(f"== branch {name} (cut out of the layer graph{also}) ==\n{branch.code.strip()}\n")
    for name, branch in branches.items():
        if (branch.branch if isinstance(branch, OtherOutputs) else branch) not in cut.values():
            print(f"== branch {name} (composed by the scheme) ==\n{branch}\n")
    print(f"== {pair.layer} ({pair.form}) after: generated {pair.scheme} coupling ==\n{coupled.code.strip()}\n")
    print(f"== generated inverse ==\n{inverse.code.strip()}\n")
    # the coupling's calls of its branches are not ops; the ops inside the pair's two branches are (the layer's own
    # children, say `module mlp`, are called there)
    old = op_counts(pair.structure.trace.graph)
    new = op_counts(coupled.graph, skip_modules=tuple(branches)) + op_counts(*(b.graph for b in cut.values()))
    rows = [[op, old[op], new[op], f"{new[op] - old[op]:+d}"] for op in sorted(old | new) if old[op] != new[op]]
    print("== op count changes per layer forward: the traced layer against the generated coupling plus the "
          "pair's two branches (each counted once; the coupling's calls of branches are not counted) ==")
    print(tabulate(rows, headers=["op", "traced layer", "coupling + branches", "change"]) if rows else "(none)")
    if dot:
        os.makedirs(dot, exist_ok=True)
        for name, graph in (("before", before.graph), ("after", coupled.graph), ("inverse", inverse.graph),
                            *((f"branch_{n}", b.graph) for n, b in cut.items())):
            with open(os.path.join(dot, f"{prefix}{name}.dot"), "w") as f:
                f.write(to_dot(graph, name))


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    import revcompile
    from revcompile.models import load_model

    local = os.path.isdir(args.model)
    torch.manual_seed(0)
    model = load_model(args.model, layers=args.layers or (None if local else DEFAULT_LAYERS),
                       dtype=getattr(torch, args.dtype))
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.seq > positions:
        raise RevcompileError(f"--seq {args.seq} is longer than the model's {positions} positions")
    model.config.use_cache = False
    revcompile.make_reversible(model, scheme=args.scheme)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    autocast = getattr(torch, args.autocast) if args.autocast else None
    report = revcompile.check(model, ids.to(next(model.parameters()).device), autocast=autocast)
    print(report)
    return 0 if report.within_tolerance else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(depth=args.depth, steps=args.steps)
    return 0


def int_at_least(minimum: int):
    """argparse type: an integer >= minimum, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    from .schemes import SCHEMES

    parser = argparse.ArgumentParser(prog="revcompile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "a transformers model_type (tiny config, random weights, no download) or a local model directory"
    scheme_help = (f"coupling scheme: {', '.join(SCHEMES)} (default: chosen per layer form, symplectic for "
                   "attention/FFN pairs and midpoint for layers converted whole)")
    diff = sub.add_parser("diff", help="show a model's layer graph before and after conversion, and the inverse")
    diff.add_argument("model", help=model_help)
    diff.add_argument("--scheme", choices=list(SCHEMES), metavar="SCHEME", help=scheme_help)
    diff.add_argument("--layers", type=positive_int, metavar="N", help=LAYERS_HELP + " (default: all)")
    diff.add_argument("--dot", metavar="DIR", help="also write the graphs as Graphviz .dot files into DIR (prefixed "
                                                   "with the layer when the model has several layer structures)")
    diff.set_defaults(func=cmd_diff)
    check = sub.add_parser("check", help="per-layer reconstruction and gradient error against the reference; "
                                         "exit status 1 when the gradient error exceeds the dtype's tolerance")
    check.add_argument("model", help=model_help)
    check.add_argument("--scheme", choices=list(SCHEMES), metavar="SCHEME", help=scheme_help)
    check.add_argument("--dtype", default="float32", choices=["float64", "float32", "bfloat16"],
                       help="dtype of the weights and streams (default %(default)s)")
    check.add_argument("--autocast", choices=["bfloat16", "float16"],
                       help="run the step under torch.autocast with this dtype (default: no autocast)")
    check.add_argument("--layers", type=positive_int, metavar="N",
                       help=LAYERS_HELP + f" (default: {DEFAULT_LAYERS} of a tiny config, all of a local model)")
    check.add_argument("--batch", type=positive_int, default=2, metavar="N",
                       help="sequences in the batch (default %(default)s)")
    check.add_argument("--seq", type=int_at_least(2), default=64, metavar="N",
                       help="tokens per sequence, at least 2 for a next-token loss (default %(default)s)")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="convert a tiny Mixtral, train it, compare memory with the baselines")
    demo.add_argument("--depth", type=positive_int, default=8, metavar="N",
                      help="number of layers (default %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=4, metavar="N",
                      help="training steps (default %(default)s)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except (RevcompileError, ValueError, OSError) as err:
        print(f"revcompile: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
