"""`make_reversible(model, compile=True)`: each distinct branch graph compiled once with Inductor, shared by layers.

A branch cut out of a layer (`passes/extract.py`) is a GraphModule rooted at that layer: it calls the layer's own
children. Compiling it per layer would compile the same code once per layer, since torch.fx gives every
GraphModule a class and code object of its own and Dynamo caches per code object. So the branch graph is rewritten
into a *layer function* `f(layer, x, *context)` whose module calls become `layer.<child>(...)`: every layer of a
structure yields the same code, compiled once (`torch.compile`, Inductor) and called with each layer as an argument.
Dynamo lifts the layer's parameters to graph inputs and guards on what it reads from the layer, not on its identity,
so layer 7 runs the graph compiled for layer 0, and a layer that differs where it matters is compiled on its own.

Where compiled branches run: everywhere a branch runs. The reversible Function's forward (no grad: an inference
graph), its backward's recompute (with grad: Inductor's forward and backward graphs, through aot_autograd, then
`autograd.grad`; on float streams the recompute and its backward as one graph and one call instead, `BranchVjp`),
the recompute in slices of the sequence (one more shape), and the coupled forward of eval mode, `invert=False` and
`disable_inversion()`. The Function itself and the inverse's arithmetic (one subtraction per step, done in place
on the stream buffer) stay outside the compiled graphs: aot_autograd's partitioner would otherwise decide again
what to save between forward and backward (pytorch issue 141881), which is the one thing a reversible layer decides.

Routing replay: the recorder and replayer of `replay.py` are TorchFunctionModes entered around the branch call;
Dynamo traces through an active TorchFunctionMode, so the recorded top-k indices become graph outputs and the
replayed ones graph inputs (tests/test_compile.py checks a replay that differs from what the input would select).
RNG: Inductor is asked for eager-identical random numbers (`fallback_random`), so dropout drawn in the no-grad
forward graph is drawn again, identically, by the recompute graph after the RNG state is restored.

Example:
    >>> revcompile.make_reversible(model, compile=True)    # compiled on the first training step, once per structure
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..errors import describe
from .hf_outputs import is_cache

log = logging.getLogger(__name__)

COMPILE_OPTIONS = {"fallback_random": True}


def _call(module: Callable, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def _attr(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def layer_function(branch: fx.GraphModule) -> fx.GraphModule:
    """`branch` (rooted at a layer) as a GraphModule `(layer, *inputs) -> output` that holds no module of its own.

    Example:
        >>> fn = layer_function(attn_branch)
        >>> fn(model.model.layers[3], x, *context)      # layer 3's attention branch
    """
    graph = fx.Graph()
    layer = graph.placeholder("layer")
    env: dict[fx.Node, fx.Node] = {}
    for node in branch.graph.nodes:
        if node.op == "call_module":
            module = graph.call_function(_attr, (layer, node.target))
            env[node] = graph.call_function(_call, (module, *fx.map_arg(node.args, env.__getitem__)),
                                            fx.map_arg(node.kwargs, env.__getitem__))
        elif node.op == "get_attr":
            env[node] = graph.call_function(_attr, (layer, node.target))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.lint()
    return fx.GraphModule(nn.Module(), graph, class_name="LayerFunction")


def branch_vjp(apply: nn.Module, params: dict[str, torch.Tensor], reads: list[torch.Tensor], context: list,
               g_out: torch.Tensor, replayer: TorchFunctionMode | None
               ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """(output, gradients of `reads`, gradients of `params`) of one call `apply(*reads, *context)` by torch.func.vjp,
    the forward's expert choices replayed by `replayer` (None: nothing to replay).

    NOTE: the replayer is entered inside the function that vjp transforms: entered around the compiled call, as for
    the other compiled branch calls, Dynamo does not trace it into the transform, and the recompute chose its own
    experts (gradients 0.5 off the reference on a near-tied router, tests/test_compile.py).
    """

    def branch(p: dict, r: list) -> torch.Tensor:
        with replayer if replayer is not None else nullcontext():
            return torch.func.functional_call(apply, p, (*r, *context))

    out, pull = torch.func.vjp(branch, params, reads)
    g_params, g_reads = pull(g_out.to(out.dtype))
    return out, g_reads, g_params


class BranchVjp:
    """`branch_vjp` compiled for one branch structure, shared by its layers: the recompute and its backward in one
    graph, one call. `unsupported` says why Dynamo could not trace it (a custom autograd.Function that torch.func
    cannot transform, a graph break): from then on that branch recomputes as the others do."""

    def __init__(self, backend: str, options: dict | None):
        graph = fx.Graph()  # a GraphModule calling branch_vjp: code of its own, so a cache of its own in Dynamo
        graph.output(graph.call_function(branch_vjp, tuple(graph.placeholder(f"arg{i}") for i in range(6))))
        self.compiled = torch.compile(fx.GraphModule(nn.Module(), graph, class_name="BranchVjp"), backend=backend,
                                      options=options, fullgraph=True)
        self.unsupported: str | None = None


class _Apply(nn.Module):
    """`fn(layer, *args)` as a module owning `layer`, so that torch.func.functional_call can hand it parameters."""

    def __init__(self, fn: fx.GraphModule, layer: nn.Module):
        super().__init__()
        self.fn, self.layer = fn, layer

    def forward(self, *args: Any) -> Any:
        return self.fn(self.layer, *args)


class LayerBranch(nn.Module):
    """One layer's branch: the shared compiled layer function, called with this layer; and `vjp`, its recompute and
    backward in one shared compiled graph.

    The layer is held outside `_modules`, so the branch never owns (or re-registers) the layer's parameters.
    """

    def __init__(self, compiled: Callable, vjp: BranchVjp, fn: fx.GraphModule, layer: nn.Module, name: str):
        super().__init__()
        self.compiled, self.name = compiled, name
        self.__dict__["layer"] = layer
        self.__dict__["_vjp"] = vjp
        self.__dict__["_apply"] = _Apply(fn, layer)
        # what the branch reads of the layer (children, parameters), by path
        self._paths = [n.args[1] for n in fn.graph.nodes if n.op == "call_function" and n.target is _attr]

    def forward(self, *args: Any) -> Any:
        # NOTE: a call with a KV cache (generate()) runs the layer function eagerly: the cache grows by a token each
        # call and each layer reads its own entry of it, so every call would compile again (until Dynamo's
        # recompile limit, with a warning); decoding one token is launch-bound work that compiling does not pay for
        if any(is_cache(arg) for arg in args):
            return self._apply(*args)
        return self.compiled(self.layer, *args)

    def vjp(self, reads: list[torch.Tensor], context: list, g_out: torch.Tensor,
            replayer: TorchFunctionMode | None) -> tuple[torch.Tensor, list, dict] | None:
        """(output, gradients of `reads`, {parameter: gradient}) of the branch at `reads`, for the layer's trainable
        parameters it uses, in one compiled call; None where that graph cannot be traced (`BranchVjp`)."""
        if self._vjp.unsupported is not None:
            return None
        params: dict[str, torch.Tensor] = {}
        for path in self._paths:
            value = _attr(self.layer, path)
            found = value.named_parameters(prefix=path) if isinstance(value, nn.Module) else \
                [(path, value)] if isinstance(value, nn.Parameter) else ()
            params.update((f"layer.{name}", p) for name, p in found if p.requires_grad)
        try:
            out, g_reads, g_params = self._vjp.compiled(self._apply, params, reads, context, g_out, replayer)
        except torch._dynamo.exc.TorchDynamoException as err:  # raised while tracing: nothing ran yet
            self._vjp.unsupported = describe(err, 200)
            log.info("revcompile: the %s branch's recompute and backward stay two calls: %s", self.name,
                     self._vjp.unsupported)
            return None
        grads: dict[torch.Tensor, torch.Tensor] = {}
        for name, grad in g_params.items():  # (a parameter under two names, tied, gets the sum)
            param = params[name]
            grads[param] = grad if param not in grads else grads[param] + grad
        return out, list(g_reads), grads

    def extra_repr(self) -> str:
        return f"{self.name}, compiled"


class BranchCompiler:
    """Compiles each distinct branch graph once (keyed by its layer function's code) for one converted model."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self._compiled: dict[str, tuple[Callable, BranchVjp, fx.GraphModule]] = {}

    def __call__(self, layer: nn.Module, branch: fx.GraphModule, name: str) -> LayerBranch:
        fn = layer_function(branch)
        if fn.code not in self._compiled:
            options = COMPILE_OPTIONS if self.backend == "inductor" else None
            # (the layer function is shared as well: `vjp` calls it inside its graph, where each layer's own copy,
            # with code of its own, would be traced again)
            self._compiled[fn.code] = (torch.compile(fn, backend=self.backend, options=options),
                                       BranchVjp(self.backend, options), fn)
        return LayerBranch(*self._compiled[fn.code], layer, name)

    def __len__(self) -> int:
        """How many distinct branch graphs were handed to torch.compile."""
        return len(self._compiled)
