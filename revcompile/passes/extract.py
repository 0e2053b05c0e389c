"""Rewrite pass: cut a residual branch out of a layer graph as a GraphModule `branch(x, *context) -> B(x)`.

The branch is every node the added value depends on, down to (not including) the residual stream, which becomes
the placeholder `x`. The GraphModule is rooted at the layer, so it calls the layer's own children: parameters are
shared, nothing is copied.

Example:
    >>> branch_graph = branch_graph_of(trace, residual)
    >>> attn = fx.GraphModule(layer, branch_graph)      # attn(x, *context) == the attention branch
"""

from __future__ import annotations

from torch import fx

from ..capture.tracer import LayerTrace
from .residuals import Residual


def branch_graph_of(trace: LayerTrace, residual: Residual) -> fx.Graph:
    """A new graph computing `residual.branch` from the placeholder `x` and the layer's context placeholders."""
    needed: set[fx.Node] = set()
    pending = [residual.branch]
    while pending:
        node = pending.pop()
        if node in needed or node is residual.stream:
            continue
        needed.add(node)
        pending.extend(node.all_input_nodes)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {residual.stream: graph.placeholder("x")}
    for node in trace.graph.nodes:
        if node.op == "placeholder" and node.target in trace.context_names:
            env[node] = graph.placeholder(node.target)
    for node in trace.graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif node in needed and node not in env:
            raise AssertionError(f"branch reads the layer input {node.target} other than through its stream")
    graph.output(env[residual.branch])
    graph.lint()
    return graph
