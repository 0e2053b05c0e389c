"""Rewrite pass: generate a scheme's coupled forward and its inverse as fx GraphModules, from its steps alone.

Each step becomes a call of its branch (`attn` or `mlp`, the GraphModules cut out by `extract`) and the step's
arithmetic, produced by running `Step.apply` (forward) or `Step.undo` (inverse, steps reversed) on fx proxies.
No scheme has a hand-written inverse.

Example:
    >>> coupled = coupling_module(get_scheme("symplectic"), branches, ("attention_mask",))
    >>> print(coupled.code)     # def forward(self, q, p, h0, attention_mask): attn = self.attn(p, ...
"""

from __future__ import annotations

from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer

from ..coupling import Scheme


def coupling_graph(scheme: Scheme, context_names: tuple[str, ...], inverse: bool = False) -> fx.Graph:
    """`(streams..., context...) -> streams` after the scheme's steps (or before them, when `inverse`)."""
    graph = fx.Graph()
    tracer = GraphAppendingTracer(graph)
    x = {s: fx.Proxy(graph.placeholder(s), tracer) for s in scheme.streams}
    context = [graph.placeholder(name) for name in context_names]
    for step in (reversed(scheme.steps) if inverse else scheme.steps):
        out = fx.Proxy(graph.call_module(step.branch, (x[step.reads].node, *context)), tracer)
        x[step.target] = step.undo(x, out) if inverse else step.apply(x, out)
    graph.output(tuple(x[s].node for s in scheme.streams))
    graph.lint()
    return graph


def coupling_module(scheme: Scheme, branches: dict[str, nn.Module], context_names: tuple[str, ...],
                    inverse: bool = False) -> fx.GraphModule:
    """The generated coupled layer (or its inverse) as a GraphModule calling `branches`."""
    name = f"{scheme.name.title().replace('_', '')}{'Inverse' if inverse else 'Coupling'}"
    return fx.GraphModule(nn.ModuleDict(branches), coupling_graph(scheme, context_names, inverse), class_name=name)
