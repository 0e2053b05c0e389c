"""Grad-mode pass: a `with torch.no_grad():` block in a layer's code becomes detached values.

Dynamo's graphs hold such a block as two `torch._C._set_grad_enabled` calls, and the layer tracer records it the
same way (`capture/tracer.py`; torch.fx alone drops it, and what the block computes would carry gradient: a silent
change of the model's gradients). A branch cannot keep the calls: the second one switches grad *on*, inside the
reversible Function's no-grad forward too. So the switches are removed and every value computed while grad was off
is detached where it is made: what leaves the block carries no gradient, as under no_grad.

Example:
    >>> detach_where_grad_is_off(trace.graph)    # in place; a graph without switches is left as it is
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map_only


def switches_grad_mode(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch._C._set_grad_enabled


def detached(value: Any) -> Any:
    """`value` with every tensor in it detached (a tensor, a tuple of them, or anything else as it is)."""
    return tree_map_only(torch.Tensor, torch.Tensor.detach, value)


def detach_where_grad_is_off(graph: fx.Graph) -> None:
    """Remove the graph's grad-mode switches; each value computed while grad was off is detached where it is made."""
    grad_off = False
    for node in list(graph.nodes):
        if switches_grad_mode(node):
            grad_off = not node.args[0]
            graph.erase_node(node)
        elif grad_off and node.op not in ("placeholder", "output"):
            with graph.inserting_after(node):
                detach = graph.call_function(detached, (node,))
            detach.meta = dict(node.meta)
            node.replace_all_uses_with(detach, delete_user_cb=lambda user: user is not detach)
