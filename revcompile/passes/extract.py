"""Rewrite pass: cut a residual branch out of a layer graph as a GraphModule `branch(x, *context) -> B(x)`, or
make the whole layer's update `f(x, *context) -> layer(x)[0] - x` (`whole_layer_graph_of`). Either may also return
some of the layer's other outputs (`hands_out`: DSA's top-k indices, RWKV's recurrent state, router logits).

The branch is every node the added value depends on, down to (not including) the residual stream, which becomes
the placeholder `x`. The GraphModule is rooted at the layer, so it calls the layer's own children: parameters are
shared, nothing is copied.

Example:
    >>> branch_graph = branch_graph_of(trace, residual)
    >>> attn = fx.GraphModule(layer, branch_graph)      # attn(x, *context) == the attention branch
"""

from __future__ import annotations

import operator

from torch import fx

from ..capture.tracer import LayerTrace
from .residuals import NotReversible, Residual, hidden_output


def writes_in_place(node: fx.Node) -> bool:
    """Does `node` write to its first argument (`x[i] = v`, `x.add_(y)`, `torch.Tensor.index_add_(x, ...)`)?"""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.setitem:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


# ops whose result may share its input's storage: a write into the result is a write into the input
_VIEWS = frozenset({"getitem", "__getitem__", "view", "view_as", "narrow", "select", "transpose", "permute", "t",
                    "unsqueeze", "squeeze", "expand", "expand_as", "as_strided", "diagonal", "unflatten", "reshape",
                    "flatten", "split", "chunk", "unbind", "movedim", "swapaxes", "swapdims", "unfold", "detach"})


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def written_tensor(node: fx.Node) -> fx.Node | None:
    """The node whose tensor an in-place `node` writes into, followed back through views (`x[..., :d].copy_(y)`
    writes into x), or None when `node` writes nothing."""
    if not writes_in_place(node):
        return None
    target = node.args[0]
    while target.op in ("call_function", "call_method") and _op_name(target) in _VIEWS and target.args and \
            isinstance(target.args[0], fx.Node):
        target = target.args[0]
    return target


def _writes(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """tensor node -> the in-place writes into it."""
    writes: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        written = written_tensor(node)
        if written is not None:
            writes.setdefault(written, []).append(node)
    return writes


def _needed(roots, stream: fx.Node, writes: dict[fx.Node, list[fx.Node]]) -> set[fx.Node]:
    """Every node `roots` depend on, down to (not including) `stream`, with every write into a needed tensor."""
    needed, pending = set(), list(roots)
    while pending:
        node = pending.pop()
        if node in needed or node is stream:
            continue
        needed.add(node)
        pending.extend(node.all_input_nodes)
        pending.extend(writes.get(node, ()))
    return needed


def computes(trace: LayerTrace, residual: Residual, value: fx.Node) -> bool:
    """Can the branch of `residual` also return `value`: is it made from what the branch computes and the context,
    with no module call of its own (a module called twice would run, and update a cache, twice) and without
    reading the layer's input?"""
    writes = _writes(trace.graph)
    more = _needed([value], residual.stream, writes) - _needed([residual.branch], residual.stream, writes)
    return not any(node.op == "call_module" or (node.op == "placeholder" and node.target not in trace.context_names)
                   for node in more)


def branch_graph_of(trace: LayerTrace, residual: Residual, hands_out: tuple[fx.Node, ...] = ()) -> fx.Graph:
    """A new graph computing `residual.branch` from the placeholder `x` and the layer's context placeholders; with
    `hands_out` (values the layer hands to the rest of the model: router logits), the graph returns
    `(branch, *hands_out)`, or raises NotReversible when one of them is not computed from the branch's inputs."""
    # NOTE: a graph of torch-level ops (Dynamo's) may fill a tensor in place, directly (`inv_perm[perm] = arange(n)`)
    # or through a view (DeepSeek-V3's attention: `key_states = k.new_empty(...)`, then `key_states[..., :d] = k_nope`
    # as a slice's `copy_`); the write has no user, so data flow alone would leave it out and the branch would read
    # uninitialised memory. A needed tensor brings every write into it along.
    writes = _writes(trace.graph)

    def reads_the_layer_input(nodes: set[fx.Node]) -> fx.Node | None:
        return next((n for n in nodes if n.op == "placeholder" and n.target not in trace.context_names), None)

    needed = _needed([residual.branch], residual.stream, writes)
    if hands_out:
        handed = _needed(hands_out, residual.stream, writes)
        if reads_the_layer_input(handed) is not None:
            raise NotReversible(f"values handed out ({', '.join(n.name for n in hands_out)}) are not computed from "
                                "the branch's input")
        needed |= handed
    source = reads_the_layer_input(needed)
    if source is not None:
        raise AssertionError(f"branch reads the layer input {source.target} other than through its stream")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {residual.stream: graph.placeholder("x")}
    for node in trace.graph.nodes:
        if node.op == "placeholder" and node.target in trace.context_names:
            env[node] = graph.placeholder(node.target)
    for node in trace.graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output((env[residual.branch], *(env[node] for node in hands_out)) if hands_out else env[residual.branch])
    graph.lint()
    return graph


def other_outputs(graph: fx.Graph) -> dict[int, fx.Node]:
    """The layer's outputs after its hidden state that are graph values, by position in its output tuple (what
    returns None or a constant there is left out)."""
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(result, (tuple, list)):
        return {}
    return {i: value for i, value in enumerate(result) if i and isinstance(value, fx.Node)}


def whole_layer_graph_of(trace: LayerTrace, hands_out: tuple[fx.Node, ...] = ()) -> fx.Graph:
    """A new graph computing the whole layer's update f(x) = layer(x) - x (its first output, when it returns several),
    from the placeholder `x` and the layer's context placeholders; with `hands_out` (other outputs of the layer),
    the graph returns `(f, *hands_out)`.

    Example:
        >>> f = fx.GraphModule(layer, whole_layer_graph_of(trace))    # f(x, *context) + x == layer(x, ...)[0]
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in trace.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder("x" if node.target == trace.hidden_name else node.target)
        elif node.op == "output":
            hidden = next(env[n] for n in env if n.op == "placeholder" and n.target == trace.hidden_name)
            update = graph.call_function(operator.sub, (env[hidden_output(trace.graph)], hidden))
            graph.output((update, *(env[value] for value in hands_out)) if hands_out else update)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return graph
