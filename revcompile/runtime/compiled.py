"""`make_reversible(model, compile=True)`: each distinct branch graph compiled once with Inductor, shared by layers.

A branch cut out of a layer (`passes/extract.py`) is a GraphModule rooted at that layer: it calls the layer's own
children. Compiling it per layer would compile the same code once per layer, since torch.fx gives every
GraphModule a class and code object of its own and Dynamo caches per code object. So the branch graph is rewritten
into a *layer function* `f(layer, x, *context)` whose module calls become `layer.<child>(...)`: every layer of a
structure yields the same code, compiled once (`torch.compile`, Inductor) and called with each layer as an argument.
Dynamo lifts the layer's parameters to graph inputs and guards on what it reads from the layer, not on its identity,
so layer 7 runs the graph compiled for layer 0, and a layer that differs where it matters is compiled on its own.

Where compiled branches run: everywhere a branch runs. The reversible Function's forward (no grad: an inference
graph), its backward's recompute (with grad: Inductor's forward and backward graphs, through aot_autograd), the
recompute in slices of the sequence (one more shape), and the coupled forward of eval mode, `invert=False` and
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

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

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


class LayerBranch(nn.Module):
    """One layer's branch: the shared compiled layer function, called with this layer.

    The layer is held outside `_modules`, so the branch never owns (or re-registers) the layer's parameters.
    """

    def __init__(self, compiled: Callable, layer: nn.Module, name: str):
        super().__init__()
        self.compiled, self.name = compiled, name
        self.__dict__["layer"] = layer

    def forward(self, *args: Any) -> Any:
        return self.compiled(self.layer, *args)

    def extra_repr(self) -> str:
        return f"{self.name}, compiled"


class BranchCompiler:
    """Compiles each distinct branch graph once (keyed by its layer function's code) for one converted model."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self._compiled: dict[str, Callable] = {}

    def __call__(self, layer: nn.Module, branch: fx.GraphModule, name: str) -> LayerBranch:
        fn = layer_function(branch)
        if fn.code not in self._compiled:
            options = COMPILE_OPTIONS if self.backend == "inductor" else None
            self._compiled[fn.code] = torch.compile(fn, backend=self.backend, options=options)
        return LayerBranch(self._compiled[fn.code], layer, name)

    def __len__(self) -> int:
        """How many distinct branch graphs were handed to torch.compile."""
        return len(self._compiled)
