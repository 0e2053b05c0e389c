"""The residual plan: which layers form attention -> FFN/MoE pairs, and why the others were left alone.

`analyze` runs the capture and analysis passes once per distinct layer structure and returns a Plan; printing
it shows a table.

Example:
    >>> plan = revcompile.analyze(model)
    >>> plan.pairs[0].kinds
    ('attention', 'moe')
    >>> print(plan)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate
from torch import fx, nn

from .capture import LayerCall, LayerTrace, example_call, find_stacks, trace_layer
from .capture.tracer import bind_call, call_signature, unwrapped_forward
from .distributed import ORDER, refuse_wrapped
from .errors import RevcompileError
from .passes.classify import ATTENTION, FFN, MOE, classify_branches
from .passes.extract import branch_graph_of
from .passes.residuals import NotReversible, Residual, find_residual_chain


@dataclass
class LayerStructure:
    """What the passes found in one distinct layer structure (shared by every layer that has it)."""

    trace: LayerTrace
    chain: list[Residual]
    branch_graphs: list[fx.Graph]
    kinds: list[str] = field(default_factory=list)
    splits_by_token: list[bool] = field(default_factory=list)  # may backward recompute it a slice at a time?

    def branch_modules(self, i: int) -> tuple[str, ...]:
        return tuple(n.target for n in self.branch_graphs[i].nodes if n.op == "call_module")


@dataclass
class Pair:
    """An attention branch followed by an FFN or MoE branch, in one layer."""

    layer: str
    stack: str
    index: int
    kinds: tuple[str, str]
    modules: tuple[tuple[str, ...], tuple[str, ...]]
    scales: tuple[float | None, float | None]
    module: nn.Module = field(repr=False)
    call: LayerCall = field(repr=False)
    structure: LayerStructure = field(repr=False)


@dataclass
class Skipped:
    layer: str
    reason: str


@dataclass
class Plan:
    """Result of `revcompile.analyze`: the pairs found, what was skipped and why, and the layer stacks."""

    stacks: list[str]
    pairs: list[Pair]
    skipped: list[Skipped]
    structures: int
    applied: bool = False  # the plan a converted model follows (make_reversible sets it)
    head: str | None = None  # set by make_reversible: how the LM head and loss run (see runtime/head.py)

    def table(self) -> str:
        rows = [[p.layer, "+".join(p.modules[0]), "+".join(p.modules[1]), p.kinds[1],
                 ", ".join("1" if s is None else f"{s:g}" for s in p.scales)] for p in self.pairs]
        headers = ["layer", "attention branch", "FFN/MoE branch", "kind", "residual scale"]
        runtimes = [getattr(p.module, "_revcompile", None) for p in self.pairs]
        if any(rt is not None and rt.scheme.implicit for rt in runtimes):  # converted with fixed-point inversion
            headers.append("fixed point (forwards so far)")
            rows = [row + [_inversions(rt.inversions)] for row, rt in zip(rows, runtimes)]
        text = tabulate(rows, headers=headers)
        if self.skipped:
            text += "\n\n" + tabulate([[s.layer, s.reason] for s in self.skipped], headers=["skipped", "reason"])
        return text

    def __str__(self) -> str:
        head = (f"revcompile plan{' (applied)' if self.applied else ''}: {len(self.pairs)} pairs, "
                f"{len(self.skipped)} skipped, in {', '.join(self.stacks)} "
                f"({self.structures} distinct layer structure{'s' if self.structures != 1 else ''} traced)")
        return head + "\n" + self.table() + (f"\n\nLM head and loss: {self.head}" if self.head else "")


def _inversions(stats) -> str:
    if not stats.solved + stats.stored:
        return "not run yet"
    return (f"{stats.solved} inverted, {stats.stored} kept input, <= {stats.max_iterations} iterations"
            if stats.stored else f"{stats.solved} inverted, <= {stats.max_iterations} iterations")


def layer_branches(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[LayerTrace, list[Residual], list[fx.Graph]]:
    """Trace one layer for a call and cut out its residual branches (NotReversible with the reason otherwise)."""
    trace = trace_layer(layer, args, kwargs)
    chain = find_residual_chain(trace.graph, trace.hidden_name)
    if len(chain) != 2:
        raise NotReversible(f"found {len(chain)} residual branch{'es' if len(chain) != 1 else ''}; a pair is an "
                            "attention branch followed by an FFN/MoE branch")
    return trace, chain, [branch_graph_of(trace, r) for r in chain]


def _analyze_layer(layer: nn.Module, call: LayerCall) -> LayerStructure:
    trace, chain, graphs = layer_branches(layer, call.args, call.kwargs)
    kinds, splits = classify_branches(layer, trace, chain, [fx.GraphModule(layer, g) for g in graphs], call)
    if kinds[0] != ATTENTION or kinds[1] not in (FFN, MOE):
        raise NotReversible(f"branches are {kinds[0]} then {kinds[1]}; a pair is attention then FFN/MoE")
    return LayerStructure(trace, chain, graphs, kinds, splits)


def structure_key(layer: nn.Module, call: LayerCall) -> tuple:
    """Layers with equal keys trace to the same graph: class, children's classes, call signature, scalar attributes."""
    scalars = tuple(sorted((k, v) for k, v in vars(layer).items()
                           if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))))
    children = tuple((name, type(child)) for name, child in layer.named_children())
    _, _, context = bind_call(unwrapped_forward(layer), layer, call.args, call.kwargs)
    return type(layer), children, call_signature(context), scalars


def analyze(model: nn.Module, example_inputs: Any = None) -> Plan:
    """Find the residual attention -> FFN/MoE pairs of `model` without changing it.

    example_inputs: one forward call's input (a tensor, a tuple of arguments or a dict of keywords); by default a
    few random tokens for the model's embedding. On a converted model it returns the plan in effect
    (`plan.applied` is True). Raises RevcompileError when the model is not an nn.Module or has no layer stack.
    """
    if not isinstance(model, nn.Module):
        raise RevcompileError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_revcompile_plan", None) is not None:
        return model._revcompile_plan
    if any(hasattr(m, "_revcompile") for m in model.modules()):
        raise RevcompileError("part of this model is already converted by revcompile (make_reversible was called on "
                              "a submodule): analyze that submodule, or call revcompile.undo on it first")
    refuse_wrapped(model, f"revcompile converts the model before a distributed engine wraps it: {ORDER}")
    stacks = find_stacks(model, example_call(model, example_inputs))
    if not stacks:
        raise RevcompileError(f"{type(model).__name__} has no layer stack (an nn.ModuleList whose layers are "
                              "called in order on each other's output); nothing to convert")
    names = {m: n for n, m in model.named_modules()}
    structures: dict[tuple, LayerStructure | NotReversible] = {}
    pairs, skipped = [], []
    for stack in stacks:
        for index, (layer, call) in enumerate(zip(stack.layers, stack.calls)):
            key = structure_key(layer, call)
            if key not in structures:
                try:
                    structures[key] = _analyze_layer(layer, call)
                except RevcompileError as reason:
                    structures[key] = reason if isinstance(reason, NotReversible) else NotReversible(str(reason))
                except Exception as err:  # a layer the passes do not understand is reported, never half-converted
                    first_line = (str(err).strip().splitlines() or [""])[0][:160]
                    structures[key] = NotReversible(f"analysis failed ({type(err).__name__}: {first_line})")
            found = structures[key]
            if isinstance(found, NotReversible):
                skipped.append(Skipped(names[layer], str(found)))
                continue
            pairs.append(Pair(names[layer], stack.name, index, tuple(found.kinds),
                              (found.branch_modules(0), found.branch_modules(1)),
                              tuple(r.scale for r in found.chain), layer, call, found))
    return Plan([s.name for s in stacks], pairs, skipped, len(structures))
