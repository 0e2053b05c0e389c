"""Analysis pass: find a layer's residual branches.

A residual branch is `add(r, B(r))` (or `r + c * B(r)`, Granite's residual_multiplier) where `r` dominates B's
subgraph: every path from the layer's hidden-state input to B's output runs through `r`. Dominators come from
networkx over the part of the fx graph that depends on the hidden state; context inputs (masks, rotary
embeddings) may feed a branch freely. A pre-norm layer is a chain: hidden -> r1 + B1 -> r2 + B2 -> output.

Anything else raises NotReversible with the reason, in the user's words (post-norm, a residual taken after a
module, a reshape of the stream); `find_parallel_residual` finds the parallel form `x + A(x) + M(x)`.

Example:
    >>> chain = find_residual_chain(trace.graph, trace.hidden_name)
    >>> [r.branch.name for r in chain]
    ['getitem', 'mlp']
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from ..errors import RevcompileError


SEQUENTIAL, PARALLEL, WHOLE = "sequential", "parallel", "whole layer"
# the branches (roles) a layer of each form is cut into; schemes build theirs from them (schemes/branches.py)
FORM_ROLES = {SEQUENTIAL: ("attn", "mlp"), PARALLEL: ("attn", "mlp"), WHOLE: ("layer",)}


class NotReversible(RevcompileError):
    """A layer whose structure no coupling can invert; the message is the reason shown in the plan."""


@dataclass
class Residual:
    """`add = stream + branch`, where `branch` may be `c * B(stream)` (then `scale` is c)."""

    add: fx.Node
    stream: fx.Node
    branch: fx.Node
    scale: float | None


_ADDS = {operator.add, torch.add, "add"}
_MULS = {operator.mul, torch.mul, "mul"}


def _is(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets and len(node.args) == 2


def hidden_flow(graph: fx.Graph, hidden: fx.Node) -> nx.DiGraph:
    """The data-flow graph of the nodes that depend on `hidden`, as networkx edges producer -> consumer."""
    flow = nx.DiGraph()
    flow.add_node(hidden)
    for node in graph.nodes:  # fx keeps nodes in topological order
        for producer in node.all_input_nodes:
            if producer in flow:
                flow.add_edge(producer, node)
    return flow


_OP_WORDS = {"view": "a reshape", "reshape": "a reshape", "to": "a dtype cast", "float": "a dtype cast",
             "type": "a dtype cast", "mul": "a multiplication", "truediv": "a division", "div": "a division",
             "sub": "a subtraction", "add": "an add"}


def _describe(node: fx.Node) -> str:
    """A node in the user's words: a module by its name, an operation by what it does."""
    if node.op == "call_module":
        return f"`{node.target}`"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return _OP_WORDS.get(name, f"`{name}`")


def _origin(node: fx.Node, hidden: fx.Node, flow: nx.DiGraph) -> fx.Node:
    """The module (or the layer input) a value comes from, looking through operations on the way."""
    while node is not hidden and node.op != "call_module":
        inputs = [n for n in node.all_input_nodes if n in flow]
        if not inputs:
            break
        node = inputs[0]
    return node


def _dominates(idom: dict, a: fx.Node, b: fx.Node) -> bool:
    while b in idom and idom[b] is not b:
        b = idom[b]
        if b is a:
            return True
    return False


def _constant_scale(node: fx.Node, flow: nx.DiGraph) -> float | None:
    if _is(node, _MULS):
        constants = [a for a in node.args if isinstance(a, (int, float))]
        if len(constants) == 1:
            return float(constants[0])
    return None


def hidden_output(graph: fx.Graph) -> fx.Node:
    """The node of the layer's output hidden state: its first output when it returns several (attention weights)."""
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(result, (tuple, list)):
        result = result[0]
    # `[h] + outputs[1:]` (GPT's blocks): a list made in Python, extended with a traced value
    while isinstance(result, fx.Node) and _is(result, _ADDS) and isinstance(result.args[0], (tuple, list)):
        result = result.args[0][0]
    return result


def find_residual_chain(graph: fx.Graph, hidden_name: str) -> list[Residual]:
    """The layer's residual branches in execution order, or NotReversible with the reason."""
    hidden = next(n for n in graph.nodes if n.op == "placeholder" and n.target == hidden_name)
    result = hidden_output(graph)
    flow = hidden_flow(graph, hidden)
    idom = nx.immediate_dominators(flow, hidden)

    chain: list[Residual] = []
    node = result
    while node is not hidden:
        if not isinstance(node, fx.Node) or node not in flow:
            raise NotReversible("its output does not depend on its hidden-state input")
        if not _is(node, _ADDS):
            inner = [a for a in node.all_input_nodes if _is(a, _ADDS)]
            if chain == [] and inner and node.op == "call_module":
                raise NotReversible(f"post-norm: it ends in {_describe(node)} applied after the residual add, so its "
                                    "input cannot be recovered by subtracting the branches from its output")
            raise NotReversible(f"the residual stream goes through {_describe(node)} between residual adds, so its "
                                "input cannot be recovered by subtracting the branches from its output")
        left, right = node.args
        for stream, branch in ((left, right), (right, left)):
            if isinstance(stream, fx.Node) and isinstance(branch, fx.Node) and branch in flow \
                    and _dominates(idom, stream, branch):
                chain.append(Residual(node, stream, branch, _constant_scale(branch, flow)))
                node = stream
                break
        else:
            origins = [_origin(a, hidden, flow) for a in node.args if isinstance(a, fx.Node) and a in flow]
            after = next((o for o in origins if o is not hidden), None)
            if after is None:
                raise NotReversible("its residual adds do not form a chain of branches, each added to the stream once")
            raise NotReversible(f"the residual is taken after {_describe(after)} (its add does not add a branch to "
                                "the residual stream passed on unchanged), so its input cannot be recovered from "
                                "its output")
    chain.reverse()
    return chain


def _sum_terms(node: fx.Node, root: bool = True) -> list[fx.Node]:
    """The terms of the add tree ending in `node` (adds used only inside the tree are expanded)."""
    if not _is(node, _ADDS) or (not root and len(node.users) != 1):
        return [node]
    return [t for a in node.args for t in (_sum_terms(a, False) if isinstance(a, fx.Node) else [a])]


def find_parallel_residual(graph: fx.Graph, hidden_name: str) -> list[Residual] | None:
    """`x + A(x) + M(x)` (in any order of the adds): two branches reading the layer input, neither reading the
    other, added to it in one sum. The Residuals of A and M, in the order they run; None for another shape.

    Example:
        >>> [r.branch.target for r in find_parallel_residual(trace.graph, "hidden_states")]   # phi
        ['self_attn', 'mlp']
    """
    hidden = next(n for n in graph.nodes if n.op == "placeholder" and n.target == hidden_name)
    result = hidden_output(graph)
    if not isinstance(result, fx.Node):
        return None
    terms = _sum_terms(result)
    branches = [t for t in terms if t is not hidden]
    flow = hidden_flow(graph, hidden)
    if len(terms) != 3 or len(branches) != 2 or not all(isinstance(b, fx.Node) and b in flow for b in branches):
        return None
    first, second = branches
    if nx.has_path(flow, first, second) or nx.has_path(flow, second, first):
        return None  # one branch reads the other: not parallel
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [Residual(result, hidden, b, _constant_scale(b, flow)) for b in sorted(branches, key=order.get)]
