"""Rewrite pass: generate a scheme's coupled forward and its inverse as fx GraphModules, from its steps alone.

Each step becomes a call of its branch (the GraphModules cut out by `extract`, or a scheme's composition of them)
and the step's arithmetic, produced by running `Step.apply` (forward) or `Step.undo` (inverse, steps reversed) on
fx proxies. An implicit step's inverse is a call of `FixedPointSolve`, which iterates the same `Step.undo`.
No scheme has a hand-written inverse.

Example:
    >>> coupled = coupling_module(get_scheme("symplectic"), branches, ("attention_mask",))
    >>> print(coupled.code)     # def forward(self, q, p, h0, attention_mask): attn = self.attn(p, ...
"""

from __future__ import annotations

from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer

from ..coupling import Scheme, Step, fixed_point


class FixedPointSolve(nn.Module):
    """`(*streams after an implicit step, *context) -> x[target] before it`, by fixed-point iteration."""

    def __init__(self, scheme: Scheme, step: Step, branch: nn.Module):
        super().__init__()
        self.scheme, self.step, self.branch = scheme, step, branch

    def forward(self, *args):
        after = dict(zip(self.scheme.streams, args))
        context = args[len(self.scheme.streams):]

        def evaluate(state):
            return self.branch(*(state[s] for s in self.step.reads), *context)

        return fixed_point(self.step, after, evaluate, self.scheme.tol, self.scheme.max_iters).value


def solver_name(step: Step) -> str:
    return f"solve_{step.branch}"


def coupling_graph(scheme: Scheme, context_names: tuple[str, ...], inverse: bool = False) -> fx.Graph:
    """`(streams..., context...) -> streams` after the scheme's steps (or before them, when `inverse`)."""
    graph = fx.Graph()
    tracer = GraphAppendingTracer(graph)
    x = {s: fx.Proxy(graph.placeholder(s), tracer) for s in scheme.streams}
    context = [graph.placeholder(name) for name in context_names]
    if inverse:
        x = scheme.unpermute(x)
    for step in (reversed(scheme.steps) if inverse else scheme.steps):
        if inverse and step.implicit:
            x[step.target] = fx.Proxy(graph.call_module(solver_name(step), (*(x[s].node for s in scheme.streams),
                                                                          *context)), tracer)
            continue
        out = fx.Proxy(graph.call_module(step.branch, (*(x[s].node for s in step.reads), *context)), tracer)
        x[step.target] = step.undo(x, out) if inverse else step.apply(x, out)
    if not inverse:
        x = scheme.permute(x)
    graph.output(tuple(x[s].node for s in scheme.streams))
    graph.lint()
    return graph


def coupling_module(scheme: Scheme, branches: dict[str, nn.Module], context_names: tuple[str, ...],
                    inverse: bool = False) -> fx.GraphModule:
    """The generated coupled layer (or its inverse) as a GraphModule calling `branches`."""
    modules = dict(branches)
    if inverse:
        modules.update({solver_name(step): FixedPointSolve(scheme, step, branches[step.branch])
                        for step in scheme.steps if step.implicit})
    name = f"{scheme.name.title().replace('_', '')}{'Inverse' if inverse else 'Coupling'}"
    return fx.GraphModule(nn.ModuleDict(modules), coupling_graph(scheme, context_names, inverse), class_name=name)
