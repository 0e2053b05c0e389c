"""A torch.fx tracer for one decoder layer of an unmodified model.

transformers v5 has no fx tracer of its own, so this is ours. The layer's direct children (attention, MLP/MoE,
norms) are leaves: their insides never reach the graph, so whatever they do (flash kernels, data-dependent expert
loops) cannot break the trace. Decorators around `forward` (deprecated-argument shims, Hugging Face's
checkpointing wrapper) are unwrapped, `**kwargs` are expanded into one placeholder per name actually passed, and
children that return tuples are unpacked by fx's proxies (`out, _ = self.mlp(x)`).

Example:
    >>> trace = trace_layer(model.model.layers[0], call)   # call: a recorded LayerCall
    >>> print(trace.graph)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import RevcompileError


@dataclass
class LayerTrace:
    """A layer's fx graph, with the names of its inputs: the hidden state first, then the context."""

    graph: fx.Graph
    hidden_name: str
    context_names: tuple[str, ...]


def bind_call(forward: Callable, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[str, Any, dict[str, Any]]:
    """Split a layer call into (hidden-state name, hidden state, context by name).

    Keyword arguments collected by `**kwargs` become context entries of their own.
    """
    signature = inspect.signature(forward)
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise RevcompileError(f"{type(layer).__name__}.forward takes *args; revcompile needs named arguments")
    try:
        bound = signature.bind(layer, *args, **kwargs)
    except TypeError as err:
        raise RevcompileError(f"cannot bind a call of {type(layer).__name__}: {err}") from err
    names = list(bound.arguments)
    hidden_name = names[1]
    context: dict[str, Any] = {}
    for name in names[2:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            context.update(bound.arguments[name])
        else:
            context[name] = bound.arguments[name]
    return hidden_name, bound.arguments[hidden_name], context


def unwrapped_forward(layer: nn.Module) -> Callable:
    """The layer class's own forward, below any decorators."""
    return inspect.unwrap(type(layer).forward)


class _LayerTracer(fx.Tracer):
    """Traces `forward(layer, hidden, **context)` with the layer's children as leaves."""

    def __init__(self, forward: Callable, hidden_name: str, context_names: tuple[str, ...]):
        super().__init__()
        self._forward = forward
        self._names = (hidden_name, *context_names)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True  # only the root layer is traced through; its children are opaque calls

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in self._names]
        forward, root, names = self._forward, self.root, self._names

        def traced(*_):
            return forward(root, proxies[0], **dict(zip(names[1:], proxies[1:])))

        return traced, []


def trace_layer(layer: nn.Module, args: tuple, kwargs: dict) -> LayerTrace:
    """Trace one layer for a call shaped like `layer(*args, **kwargs)` (the values are not used, only names).

    Raises RevcompileError with the reason when the layer's own code cannot be traced (for example, Python control
    flow on a tensor value).
    """
    forward = unwrapped_forward(layer)
    hidden_name, _, context = bind_call(forward, layer, args, kwargs)
    tracer = _LayerTracer(forward, hidden_name, tuple(context))
    try:
        graph = tracer.trace(layer)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... all mean "not traceable"
        raise RevcompileError(f"{type(layer).__name__}.forward cannot be traced with torch.fx: "
                              f"{type(err).__name__}: {err}") from err
    return LayerTrace(graph, hidden_name, tuple(context))
