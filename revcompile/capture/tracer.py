"""A torch.fx tracer for one decoder layer of an unmodified model.

transformers v5 has no fx tracer of its own, so this is ours. The layer's direct children (attention, MLP/MoE,
norms) are leaves: their insides never reach the graph, so whatever they do (flash kernels, data-dependent expert
loops) cannot break the trace. Decorators around `forward` (deprecated-argument shims, Hugging Face's
checkpointing wrapper) are unwrapped, `**kwargs` are expanded into one placeholder per name actually passed, and
children that return tuples are unpacked by fx's proxies (`out, _ = self.mlp(x)`). Arguments that are Python
constants in the call (None, flags, numbers, strings) are baked into the graph, so the layer's own code may
branch on them (`if encoder_hidden_states is not None`); the call signature (`call_signature`) records them, and a
call with other constants gets a trace of its own.

Example:
    >>> trace = trace_layer(model.model.layers[0], call)   # call: a recorded LayerCall
    >>> print(trace.graph)
"""

from __future__ import annotations

import functools
import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import RevcompileError
from ..passes.grad_mode import detach_where_grad_is_off


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def call_signature(context: dict[str, Any]) -> tuple:
    """A hashable key of a call's context: its names, with the values of its constant arguments."""
    return tuple((name, value if isinstance(value, _CONSTANT_TYPES) else ...) for name, value in context.items())


def dynamic_names(signature: tuple) -> tuple[str, ...]:
    """The context names of a signature that are graph inputs (not constants baked into the graph)."""
    return tuple(name for name, value in signature if value is ...)


@dataclass
class LayerTrace:
    """A layer's fx graph: inputs are the hidden state, then the dynamic context (`context_names`).

    NOTE: `training` is the layer's mode when it was traced. Its own code reads `self.training` as a Python bool
    (OPT's and BART's layers call `F.dropout(h, p, training=self.training)` themselves), so the graph holds that
    mode as a constant: a graph is valid for calls in that mode only, and a call in the other is traced again
    (`LayerRuntime.coupling`). Children are leaves and read their own flag when they run.
    """

    graph: fx.Graph
    hidden_name: str
    signature: tuple
    training: bool = False
    # the children's None outputs baked into the graph (`trace_layer`), for traces of the layer's other calls
    child_nones: dict[str, tuple[int, frozenset[int]]] | None = None

    @property
    def context_names(self) -> tuple[str, ...]:
        return dynamic_names(self.signature)


@functools.cache
def _binding(forward: Callable, n_args: int, keys: tuple[str, ...]) -> tuple[str, int | str, tuple]:
    """How calls of `forward(layer, *args, **kwargs)` with `n_args` positional arguments and keyword arguments `keys`
    bind: (hidden-state name, where it is, ((context name, where it is), ...)); where: a position in args or a key.

    NOTE: cached because every call of a converted layer binds its arguments, and how a call binds depends on the
    number of positional arguments and the keyword names alone: `inspect.Signature.bind` runs once per such shape,
    on markers standing for the values. Raises TypeError for a call that does not bind.
    """
    signature = inspect.signature(forward)
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        raise TypeError("its forward takes *args; revcompile needs named arguments")
    bound = signature.bind(None, *range(n_args), **{key: key for key in keys})
    names = list(bound.arguments)
    sources: list[tuple[str, int | str]] = []
    for name in names[2:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            sources += list(bound.arguments[name].items())
        else:
            sources.append((name, bound.arguments[name]))
    return names[1], bound.arguments[names[1]], tuple(sources)


def bind_call(forward: Callable, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[str, Any, dict[str, Any]]:
    """Split a layer call into (hidden-state name, hidden state, context by name).

    Keyword arguments collected by `**kwargs` become context entries of their own.
    """
    try:
        hidden_name, hidden, sources = _binding(forward, len(args), tuple(kwargs))
    except TypeError as err:
        raise RevcompileError(f"cannot bind a call of {type(layer).__name__}: {err}") from err

    def value(source: int | str) -> Any:
        return args[source] if isinstance(source, int) else kwargs[source]

    return hidden_name, value(hidden), {name: value(source) for name, source in sources}


def unwrapped_forward(layer: nn.Module) -> Callable:
    """The layer class's own forward, below any decorators."""
    return inspect.unwrap(type(layer).forward)


def nones_as_traced(output: Any, length: int, nones: tuple[int, ...], child: str) -> Any:
    """`output` of the layer's child `child`, checked to hold None where the traced call's did (a graph node that the
    values read from the child's output depend on, so every branch that reads them runs the check)."""
    if type(output) is not tuple or len(output) != length or any(output[i] is not None for i in nones):
        raise RevcompileError(
            f"the layer's child {child!r} returned {type(output).__name__} where the call the layer was traced with "
            f"returned a tuple of {length} with None at {list(nones)}: the converted layer's code holds the "
            "branches its own `is None` tests took then; convert the model with example_inputs shaped like this call "
            "(revcompile.make_reversible(model, example_inputs=...)), or leave this layer out")
    return output


class _LayerTracer(fx.Tracer):
    """Traces `forward(layer, hidden, **context)` with the layer's children as leaves; the children named in
    `child_nones` return a tuple with None where they did in the probe's call (`trace_layer`)."""

    def __init__(self, forward: Callable, hidden_name: str, context: dict[str, Any],
                 child_nones: dict[str, tuple[int, frozenset[int]]]):
        super().__init__()
        self._forward = forward
        self._constants = {k: v for k, v in context.items() if isinstance(v, _CONSTANT_TYPES)}
        self._names = (hidden_name, *(k for k in context if k not in self._constants))
        self._child_nones = child_nones

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True  # only the root layer is traced through; its children are opaque calls

    def call_module(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        output = super().call_module(module, forward, args, kwargs)
        name = self.path_of_module(module)
        if name not in self._child_nones:
            return output
        length, nones = self._child_nones[name]
        checked = self.create_proxy("call_function", nones_as_traced, (output, length, tuple(sorted(nones)), name), {})
        return tuple(None if i in nones else checked[i] for i in range(length))

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in self._names]
        forward, root, names, constants = self._forward, self.root, self._names, self._constants

        def traced(*_):
            return forward(root, proxies[0], **dict(zip(names[1:], proxies[1:])), **constants)

        return traced, []


def trace_layer(layer: nn.Module, args: tuple, kwargs: dict,
                child_nones: dict[str, tuple[int, frozenset[int]] | None] | None = None) -> LayerTrace:
    """Trace one layer for a call shaped like `layer(*args, **kwargs)` (the values are not used, only names).

    NOTE: children's None outputs. A child's output is a proxy while tracing, so the layer's own test of a part of
    it (`if attn_bias is not None`: GPT-NeoX-Japanese's attention returns None there without a bias; XLNet's
    returns its query stream None without target mappings) always takes the "not None" way, and the graph then
    calls something on None. With `child_nones` (a probe call's record, `LayerCall.child_nones`), those children
    return real tuples with None where they did; a graph node checks each call's output against that, so a call
    where a child returns a value there raises instead of computing the probe's layer silently.

    Raises RevcompileError with the reason when the layer's own code cannot be traced (for example, Python control
    flow on a tensor value).
    """
    forward = unwrapped_forward(layer)
    hidden_name, _, context = bind_call(forward, layer, args, kwargs)
    child_nones = {name: nones for name, nones in (child_nones or {}).items() if nones is not None} or None
    tracer = _LayerTracer(forward, hidden_name, context, child_nones or {})
    try:
        with _recording_grad_mode(tracer):
            graph = tracer.trace(layer)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... all mean "not traceable"
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise RevcompileError(f"{type(layer).__name__}.forward cannot be traced with torch.fx "
                              f"({type(err).__name__}: {first_line})") from err
    detach_where_grad_is_off(graph)
    return LayerTrace(graph, hidden_name, call_signature(context), layer.training, child_nones)


@contextmanager
def _recording_grad_mode(tracer: fx.Tracer):
    """While tracing, grad-mode switches in the layer's own code (`with torch.no_grad():`) become graph nodes, as in
    Dynamo's graphs; the trace starts with grad on, as a training call does (see passes/grad_mode.py)."""
    switch, tracing_thread = torch._C._set_grad_enabled, threading.get_ident()

    def record(mode: bool) -> None:
        if threading.get_ident() == tracing_thread:  # (another thread's switch is not the layer's code)
            tracer.graph.call_function(switch, (bool(mode),))
        switch(mode)

    with torch.enable_grad():
        torch._C._set_grad_enabled = record
        try:
            yield
        finally:
            torch._C._set_grad_enabled = switch
