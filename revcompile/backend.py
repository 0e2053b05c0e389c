"""The torch.compile backend "revcompile": `torch.compile(model, backend="revcompile")` converts Dynamo's graph.

Example:
    >>> import revcompile                                   # or just have it installed: the entry point registers it
    >>> model = torch.compile(model, backend="revcompile")  # options={"scheme": ..., "recompute_chunks": ...}
    >>> model(ids, labels=ids).loss.backward()              # activations rebuilt in backward, compiled branches

Design. A Dynamo backend receives one flat fx graph per captured region, not the user's module: every module is
inlined, parameters are lifted to graph inputs, and each node is tagged with the stack of modules it ran in
(`node.meta["nn_module_stack"]`). The backend converts that graph itself, with the passes make_reversible uses:
1. layers: the nodes of one layer are those whose outermost indexed module is the same (`model.layers.3`); each
   layer is cut out as a graph of its own, `(hidden, *inputs) -> hidden`, its inputs being the context (masks,
   rotary tables) and its parameters. Layers whose graphs read the same give the same code: one structure.
2. analysis, once per structure: the residual chain (networkx dominators, `passes/residuals.py`), the branches cut
   out (`passes/extract.py`), and their kinds found on real values (`passes/classify.py`: the example inputs are
   run through the graph up to that layer, on a forked RNG). A layer that is not an attention -> FFN/MoE pair is
   left as it is, and says why in the log.
3. rewrite: each converted layer's nodes become one call of a `GraphLayer` module, which runs the scheme's coupling
   through the reversible autograd Function of make_reversible (`runtime/function.py`); consecutive converted
   layers form a run that passes packed streams, opened by its first layer and merged by its last, as there.
4. compile: each distinct branch graph is compiled with Inductor once (it takes the parameters as inputs, so one
   graph serves every layer of its structure), and the rest of the graph (embedding, masks, final norm, head, loss)
   is split at the layer calls (`torch.fx.passes.split_module`), each piece compiled with Inductor. The reversible
   Function itself stays outside aot_autograd: its partitioner would otherwise decide again what to save between
   forward and backward (pytorch issue 141881), and saving nothing is the point. Routing replay and RNG work as
   with `make_reversible(model, compile=True)` (see `runtime/compiled.py`).
A graph the passes cannot convert (no layer stack in it, no convertible layer, inputs it mutates)
goes to Inductor unchanged, with one log line saying why.

NOTE: why not call make_reversible on the module from here. The backend never sees the module, only a graph, and
Dynamo may hand it any part of the model (a graph break splits one forward into several graphs). Converting the
graph it is given keeps the backend honest about what it converted: exactly the layers whole in that graph.
Values a layer hands to the rest of the graph besides its output (Hugging Face's router logits, collected for the
load-balancing loss) convert when its FFN/MoE branch computes them: that branch is cut out returning them too
(`HandsOut`), and the reversible Function returns them as it returns make_reversible's collected router logits.
Limits: a layer split by a graph break (Hugging Face's "eager" experts loop breaks the graph at `nonzero`: use
`experts_implementation="grouped_mm"`) is not converted, nor one that hands out a KV cache; schemes that add modules
(MEFT adapters, RevFFN projections) need make_reversible, which owns the model.

Dynamic shapes: after a second sequence length Dynamo compiles again with symbolic sizes; that graph converts
the same way (the analysis runs on this call's sizes, `_hint`), and serves every later length.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch._dynamo import register_backend
from torch._dynamo.backends.registry import _BACKENDS
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.split_module import split_module

from .capture.tracer import LayerTrace
from .coupling import Scheme
from .errors import RevcompileError, describe
from .passes.classify import ATTENTION, FFN, MOE, Classified, classify_values
from .passes.extract import branch_graph_of, written_tensor
from .passes.grad_mode import detach_where_grad_is_off, switches_grad_mode
from .passes.residuals import SEQUENTIAL, NotReversible, Residual, find_residual_chain
from .runtime.compiled import COMPILE_OPTIONS
from .runtime.hf_outputs import ROUTER_LOGITS, active_collector, private_collector
from .runtime.layer import PAIR_ROLES, StreamRuntime, inversion_disabled, reconstruction_observer, splits_by_branch
from .runtime.streams import resolve_exact
from .schemes import get_scheme
from .schemes.branches import scheme_branches

__all__ = ["CompileOnFirstCall", "GraphLayer", "revcompile_backend"]

log = logging.getLogger(__name__)

# how Dynamo names the compiled module in nn_module_stack: "L['self']." or, for a model reached through a wrapper's
# arguments (as Llama's is here), "L['args'][0]."
_ROOT = re.compile(r"^L\['\w+'\](?:\[\d+\])*\.")
_INDEXED = re.compile(r"^(?P<stack>.+?)(?:\.(?P<dot>\d+)|\[(?P<bracket>\d+)\])$")  # "L['self'].model.layers.3"


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


class NotConvertible(RevcompileError):
    """A graph the backend leaves to Inductor unchanged; the message is the reason it logs."""


@dataclass
class _Layer:
    """One layer's nodes in the flat graph and what the passes found in them."""

    name: str
    nodes: list[fx.Node]
    output: fx.Node
    hidden: fx.Node | None = None
    inputs: list[fx.Node] | None = None  # in the order of the layer graph's placeholders after "hidden"
    structure: _Structure | NotReversible | None = None
    hands_out: list[fx.Node] = field(default_factory=list)  # other values the rest of the graph reads (router logits)


@dataclass
class _Structure:
    """What the passes found in one distinct layer graph, and its compiled branches."""

    graph: fx.Graph
    chain: list[Residual]
    branch_graphs: list[fx.Graph]
    kinds: list[str] | None = None
    classified: Classified | None = None
    roles: dict[str, nn.Module] | None = None
    handing_graph: fx.Graph | None = None  # the FFN/MoE branch returning (output, *values the layer hands out)


class CompileOnFirstCall(nn.Module):
    """A graph (rooted at `root`, which holds what its get_attr nodes read) compiled with Inductor at its first call.

    NOTE: not at once. While a backend runs, Dynamo marks the code of every GraphModule made as code it must never
    trace (so that it does not trace its own output), and a GraphModule made in the backend could never be compiled
    again; one made at the first call can.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, name: str, options: dict | None = None):
        super().__init__()
        self.graph, self.name, self.options, self.compiled = graph, name, options, None
        self.__dict__["root"] = root  # not a submodule: the root (Dynamo's graph module) holds this module itself

    def forward(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = torch.compile(fx.GraphModule(self.root, self.graph, class_name=self.name),
                                          backend="inductor", options=self.options)
        return self.compiled(*args)

    def extra_repr(self) -> str:
        return f"{self.name}, {'compiled' if self.compiled is not None else 'compiled at its first call'}"


class GraphLayer(nn.Module):
    """A converted layer of a Dynamo graph: `(hidden or packed streams, *inputs) -> output`, run reversibly in
    training (grad enabled, an input requiring grad) and as the plain coupled computation otherwise."""

    def __init__(self, runtime: StreamRuntime, branches: dict[str, nn.Module], name: str, hands_out: int = 0):
        super().__init__()
        self.runtime, self.name, self.hands_out = runtime, name, hands_out
        self.branches = nn.ModuleDict(branches)

    def forward(self, hidden: torch.Tensor, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The layer's output; with `hands_out`, (output, *the values its FFN/MoE branch handed out)."""
        values = list(inputs)
        grad = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad
                                               for v in (hidden, *values))
        # what a HandsOut branch hands out in this call
        with private_collector(ROUTER_LOGITS) if self.hands_out else nullcontext() as collected:
            if grad and not inversion_disabled():
                # NOTE: the parameters are graph inputs here, so they travel as context tensors: the Function
                # returns their gradients as it does for any context input that requires grad
                hidden = self.runtime.reversible_input(hidden)
                out = self.runtime.run_reversible(dict(self.branches), hidden, values, [], training=True,
                                                  collector=collected, observe=reconstruction_observer(self, hidden))
            else:
                out = self.runtime.run_coupled(dict(self.branches), hidden, values, collected is not None)
        return (out, *collected[ROUTER_LOGITS]) if self.hands_out else out

    def extra_repr(self) -> str:
        rt = self.runtime
        return f"{self.name}, {rt.scheme.name}, first={rt.is_first}, last={rt.is_last}"


class HandsOut(nn.Module):
    """A branch that also returns values the layer hands to the rest of the graph (router logits): returns the
    branch's output and puts those values into the active collector, as Hugging Face's output hooks do, so that the
    reversible Function returns them from forward and takes their gradients in backward (`runtime/hf_outputs.py`).
    """

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, *args: Any) -> torch.Tensor:
        out, *handed = self.branch(*args)
        active_collector()[ROUTER_LOGITS].extend(handed)
        return out


def _layer_of(node: fx.Node) -> tuple[str, int] | None:
    """(stack, index) of the outermost indexed module a node ran in, e.g. ("L['self'].model.layers", 3)."""
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        found = _INDEXED.match(entry[0])
        if found:
            return found["stack"], int(found["dot"] or found["bracket"])
    return None


def _example(node: fx.Node) -> Any:
    return node.meta.get("example_value")


def _same_kind(a: Any, b: Any) -> bool:
    """Two floating-point tensors of one shape (symbolic sizes: the same expression, with no guard added)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and \
        b.is_floating_point() and a.dim() == b.dim() and \
        all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _layer_graph(layer: _Layer, hidden: fx.Node, inputs: list[fx.Node]) -> fx.Graph:
    """The layer's nodes as a graph `(hidden, input_0, ...) -> output`, with names that depend on structure only."""
    graph = fx.Graph()
    env = {hidden: graph.placeholder("hidden")}
    for k, node in enumerate(inputs):
        env[node] = graph.placeholder(f"input_{k}")
    for k, node in enumerate(layer.nodes):
        env[node] = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                      fx.map_arg(node.kwargs, env.__getitem__), name=f"v{k}")
        env[node].meta = dict(node.meta)
    graph.output(env[layer.output])
    detach_where_grad_is_off(graph)  # a no_grad block in the layer's code (PhiMoE's router): see grad_mode.py
    return graph


def _handed_out(layer: _Layer, trace: LayerTrace, chain: list[Residual]) -> fx.Graph | None:
    """The layer's FFN/MoE branch as a graph that also returns the values the layer hands to the rest of the graph
    (Hugging Face's router logits, collected for the load-balancing loss); None when it hands out nothing;
    NotReversible when its FFN/MoE branch does not compute them all."""
    if not layer.hands_out:
        return None
    by_name = {node.name: node for node in trace.graph.nodes}
    handed = tuple(by_name[f"v{layer.nodes.index(node)}"] for node in layer.hands_out)  # (_layer_graph's names)
    try:
        return branch_graph_of(trace, chain[1], handed)
    except NotReversible:
        extra = ", ".join(node.name for node in layer.hands_out)
        raise NotReversible(
            f"it hands {len(handed)} more values than its output to the rest of the graph ({extra}), not all "
            "computed from its FFN/MoE branch's input (router logits are): a KV cache (train with use_cache=False, "
            "as Hugging Face checkpointing does), or state passed between layers") from None


def _cut(layer: _Layer, position: dict[fx.Node, int], previous: fx.Node | None) -> tuple[fx.Graph, list[Residual]]:
    """Fill in the layer's hidden input and inputs; (its graph, its residual chain), or NotReversible with the
    reason."""
    places = [position[n] for n in layer.nodes]
    if max(places) - min(places) + 1 != len(places):
        raise NotReversible("its operations interleave with other code in the graph")
    inside = set(layer.nodes)
    inputs = list(dict.fromkeys(i for n in layer.nodes for i in n.all_input_nodes if i not in inside))
    candidates = [previous] if previous in inputs else \
        [i for i in inputs if _same_kind(_example(i), _example(layer.output))]
    reason = "no input of the layer has the shape of its output (the hidden state)"
    for hidden in candidates:
        others = [i for i in inputs if i is not hidden]
        graph = _layer_graph(layer, hidden, others)
        try:
            chain = find_residual_chain(graph, "hidden")
        except NotReversible as err:
            reason = str(err)
            continue
        if len(chain) != 2:
            reason = f"found {len(chain)} residual branches; a pair is an attention branch followed by an FFN/MoE one"
            continue
        layer.hidden, layer.inputs = hidden, others
        return graph, chain
    raise NotReversible(reason)


class _Stop(Exception):
    pass


class _Probe(fx.Interpreter):
    """Runs the flat graph on the example inputs until every wanted node has a value."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.wanted:
            self.values[node] = value
            self.wanted.discard(node)
            if not self.wanted:
                raise _Stop
        return value


def _seeded(branch: Callable) -> Callable:
    """`branch` drawing the same random numbers at every call (dropout must not look like token mixing)."""
    def run(*args):
        with torch.random.fork_rng(device_type=args[0].device.type,
                                   devices=[args[0].device] if args[0].device.type == "cuda" else []):
            torch.manual_seed(0)
            return branch(*args)
    return run


def _classify(gm: fx.GraphModule, layers: list[_Layer], example_inputs: list) -> None:
    """Kinds and token-wise splits of each structure's branches, on the values of its first layer's inputs."""
    first = {}
    for layer in layers:
        if isinstance(layer.structure, _Structure) and layer.structure.kinds is None:
            first.setdefault(id(layer.structure), layer)
    if not first:
        return
    wanted = {n for layer in first.values() for n in (layer.hidden, *layer.inputs)}
    probe = _Probe(gm, wanted)
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    with torch.no_grad(), torch.random.fork_rng(device_type=device.type,
                                                 devices=[device] if device.type == "cuda" else []):
        try:
            probe.run(*example_inputs)
        except _Stop:
            pass
        for layer in first.values():
            structure = layer.structure
            inputs = [probe.values[n] for n in layer.inputs]
            runner = fx.Interpreter(fx.GraphModule(gm, structure.graph), garbage_collect_values=False)
            runner.run(probe.values[layer.hidden], *inputs)
            streams = {node.name: value for node, value in runner.env.items()}
            branches = [_seeded(fx.GraphModule(gm, g)) for g in structure.branch_graphs]
            structure.classified = classify_values(branches, [streams[r.stream.name] for r in structure.chain],
                                                   inputs)
            structure.kinds = structure.classified.kinds


def _hint(value: Any) -> Any:
    """A symbolic size's value in this call (what the probe runs with), anything else as it is."""
    return value.node.hint if isinstance(value, _SYMBOLIC) else value


def _refusal(gm: fx.GraphModule, example_inputs: list) -> str | None:
    """Why the whole graph goes to Inductor unchanged, or None."""
    for node in gm.graph.nodes:
        written = written_tensor(node)
        if written is not None and written.op == "placeholder":
            return f"it writes to one of its inputs in place ({node.format_node()}: a KV cache update?)"
    return None


def _hoist_size_expressions(graph: fx.Graph) -> set[fx.Node]:
    """Move the symbolic size expressions computed from the graph's inputs alone to just after its placeholders;
    returns them.

    NOTE: with dynamic shapes Dynamo computes a size such as `2 * s0` (batch x sequence) where it is first needed,
    inside layer 0, and every later layer reuses that node: layer 0 would hand a value to the rest of the graph and
    could not be cut out. An expression of the inputs belongs to no layer; hoisted, it is one more (integer) input
    of each layer that reads it, the same in every layer, so the layers still share one structure.
    """
    hoisted: set[fx.Node] = set()
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        return hoisted
    anchor, inputs = placeholders[-1], set(placeholders)
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(_example(node), _SYMBOLIC) and \
                all(i in inputs or i in hoisted for i in node.all_input_nodes):
            anchor.append(node)
            anchor = node
            hoisted.add(node)
    if hoisted:
        graph.owning_module.recompile()
    return hoisted


def _find_layers(gm: fx.GraphModule) -> dict[str, list[_Layer]]:
    """Per layer stack, its layers in index order (symbolic size expressions of the inputs belong to none)."""
    stacks: dict[str, dict[int, list[fx.Node]]] = {}
    outside = _hoist_size_expressions(gm.graph)
    last, switches = None, []  # the layer of the last node, the grad-mode switches (which have none) met since
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node in outside:
            continue
        found = _layer_of(node)
        if found is None and switches_grad_mode(node):
            switches.append(node)
            continue
        if found:
            nodes = stacks.setdefault(found[0], {}).setdefault(found[1], [])
            if found == last:  # switched between two nodes of one layer: inside that layer's code
                nodes.extend(switches)
            nodes.append(node)
        last, switches = found, []
    in_layers = {node for by_index in stacks.values() for nodes in by_index.values() for node in nodes}
    result = {}
    for stack, by_index in stacks.items():
        layers = []
        for index in sorted(by_index):
            nodes = by_index[index]
            inside = set(nodes)
            outputs = [n for n in nodes if any(user not in inside for user in n.users)]
            name = f"{_ROOT.sub('', stack)}.{index}"
            layer = _Layer(name, nodes, outputs[-1] if outputs else nodes[-1], hands_out=outputs[:-1])
            state = [n.name for n in layer.hands_out if any(u in in_layers and u not in inside for u in n.users)]
            if state:
                layer.structure = NotReversible(f"it hands values to later layers beside its output ({', '.join(state)}"
                                                "): state carried from layer to layer, which this backend does not "
                                                "hand on (revcompile.make_reversible does)")
            layers.append(layer)
        result[stack] = layers
    return result


class _Converter:
    """Converts one Dynamo graph: analysis, rewrite, compile (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, scheme: Scheme, recompute_chunks: int | None,
                 exact: bool, exact_headroom: int | None):
        self.gm, self.scheme, self.chunks = gm, scheme, recompute_chunks
        self.example_inputs = [_hint(x) for x in example_inputs]  # (the analysis runs on this call's sizes)
        self.exact, self.exact_headroom = exact, exact_headroom
        self.compiled: dict[str, nn.Module] = {}  # branch graph code -> its compiled module, shared by layers

    def analyze(self) -> list[list[_Layer]]:
        """The runs of convertible layers (raises NotConvertible when there is none)."""
        reason = _refusal(self.gm, self.example_inputs)
        if reason:
            raise NotConvertible(reason)
        stacks = _find_layers(self.gm)
        if not stacks:
            raise NotConvertible("no layer stack in it (no nodes from a module called as <list>.<index>)")
        position = {node: i for i, node in enumerate(self.gm.graph.nodes)}
        structures: dict[str, _Structure] = {}
        layers = [layer for stack in stacks.values() for layer in stack]
        for stack in stacks.values():
            previous = None
            for layer in stack:
                if layer.structure is None:
                    try:
                        graph, chain = _cut(layer, position, previous)
                        key = (fx.GraphModule(self.gm, graph).code, tuple(map(layer.nodes.index, layer.hands_out)))
                        if key not in structures:
                            trace = LayerTrace(graph, "hidden", tuple((f"input_{k}", ...)
                                                                      for k in range(len(layer.inputs))))
                            structures[key] = _Structure(graph, chain, [branch_graph_of(trace, r) for r in chain],
                                                         handing_graph=_handed_out(layer, trace, chain))
                        layer.structure = structures[key]
                    except NotReversible as err:
                        layer.structure = err
                previous = layer.output
        _classify(self.gm, layers, self.example_inputs)
        for structure in structures.values():
            if isinstance(structure, _Structure) and (structure.kinds[0] != ATTENTION or
                                                      structure.kinds[1] not in (FFN, MOE)):
                kinds = structure.kinds
                for layer in layers:
                    if layer.structure is structure:
                        layer.structure = NotReversible(f"branches are {kinds[0]} then {kinds[1]}; a pair is "
                                                        "attention then FFN/MoE")
        runs = []
        for stack in stacks.values():
            run: list[_Layer] = []
            for layer in stack:
                if not isinstance(layer.structure, _Structure):
                    run = []
                    continue
                if run and layer.hidden is not run[-1].output:
                    run = []
                if not run:
                    runs.append(run)
                run.append(layer)
        if not runs:
            reasons = sorted({f"{layer.name}: {layer.structure}" for layer in layers})
            raise NotConvertible("no layer converts (" + "; ".join(reasons[:3]) +
                                 (f"; {len(reasons) - 3} more" if len(reasons) > 3 else "") + ")")
        skipped = [layer for layer in layers if isinstance(layer.structure, NotReversible)]
        for layer in skipped:
            log.info("revcompile backend: %s left as it is: %s", layer.name, layer.structure)
        return runs

    def _roles(self, structure: _Structure) -> dict[str, nn.Module]:
        """The structure's branches compiled with Inductor, one compiled module per distinct branch graph."""
        if structure.roles is None:
            structure.roles = {}
            graphs = structure.branch_graphs[:1] + [structure.handing_graph or structure.branch_graphs[1]]
            for role, graph in zip(PAIR_ROLES, graphs):
                code = fx.GraphModule(self.gm, graph).code
                if code not in self.compiled:
                    self.compiled[code] = CompileOnFirstCall(self.gm, graph, f"{role.title()}Branch", COMPILE_OPTIONS)
                structure.roles[role] = self.compiled[code]
            if structure.handing_graph is not None:
                structure.roles[PAIR_ROLES[1]] = HandsOut(structure.roles[PAIR_ROLES[1]])
        return structure.roles

    def rewrite(self, runs: list[list[_Layer]]) -> fx.GraphModule:
        """The graph with each converted layer replaced by a GraphLayer call, split and compiled around them."""
        graph = self.gm.graph
        replaced: dict[fx.Node, fx.Node] = {}
        calls, sliced = set(), False
        for run in runs:
            for i, layer in enumerate(run):
                structure = layer.structure
                roles = self._roles(structure)
                found = structure.classified
                runtime = StreamRuntime(self.scheme, is_first=i == 0, is_last=i == len(run) - 1,
                                        splits=splits_by_branch(self.scheme, SEQUENTIAL, found.by_token,
                                                                found.by_sequence, self.chunks),
                                        batch_context=found.batch_context, exact=self.exact,
                                        exact_headroom=self.exact_headroom, compiled_branches=True)
                sliced = sliced or bool(runtime.splits)
                branches = scheme_branches(self.scheme, SEQUENTIAL, roles, {})
                target = f"revcompile_layer_{len(calls)}"
                self.gm.add_submodule(target, GraphLayer(runtime, branches, layer.name, len(layer.hands_out)))
                with graph.inserting_before(layer.nodes[0]):
                    call = graph.call_module(target, tuple(replaced.get(n, n) for n in (layer.hidden, *layer.inputs)))
                    results = [call] if not layer.hands_out else \
                        [graph.call_function(operator.getitem, (call, k)) for k in range(1 + len(layer.hands_out))]
                inside = set(layer.nodes)
                for node, result in zip((layer.output, *layer.hands_out), results):
                    node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
                replaced[layer.output] = results[0]
                for node in reversed(layer.nodes):
                    graph.erase_node(node)
                calls.update((call, *results))
        if self.chunks not in (None, 1) and not sliced:
            log.warning("revcompile backend: recompute_chunks=%s has no effect: Dynamo's graph writes the sizes into "
                        "the branches (constants, or size symbols of the whole batch), so no branch runs by slices; "
                        "make_reversible(model, compile=True) slices", self.chunks)
        graph.lint()
        self.gm.recompile()
        return self._split(calls)

    def _split(self, calls: set[fx.Node]) -> fx.GraphModule:
        """Split at the layer calls: the layers run as they are, every other piece is compiled with Inductor."""
        parts, part, in_layers = {}, 0, False
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if (node in calls) != in_layers:
                part, in_layers = part + 1, node in calls
            parts[node] = part
        layer_parts = {parts[c] for c in calls}
        split = split_module(self.gm, self.gm, lambda node: parts[node], keep_original_order=True)
        for name, module in list(split.named_children()):
            if int(name.removeprefix("submod_")) not in layer_parts:
                setattr(split, name, CompileOnFirstCall(module, module.graph, name))
        return split


def revcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """The Dynamo backend: convert the graph's residual pairs into reversible couplings, compile the rest.

    options (torch.compile's `options=`): "scheme" (a name or Scheme, default "symplectic"), "recompute_chunks"
    (default None: by device), "exact" and "exact_headroom" (default None), as for make_reversible.
    """
    options = dict(options or {})
    scheme = get_scheme(options.pop("scheme", "symplectic"))
    chunks = options.pop("recompute_chunks", None)
    headroom = options.pop("exact_headroom", None)
    exact = resolve_exact(scheme, options.pop("exact", None), headroom)
    if options:
        raise RevcompileError(f"unknown revcompile backend options {sorted(options)}; it takes scheme, "
                              "recompute_chunks, exact and exact_headroom")
    if scheme.new_modules is not None:
        raise RevcompileError(f"scheme {scheme.name!r} adds modules to each layer (adapters, projections); the "
                              "backend cannot add parameters to a model: use revcompile.make_reversible(model, "
                              f"{scheme.name!r}) (compile=True compiles its branches)")
    from torch._inductor.compile_fx import compile_fx

    converter = _Converter(gm, list(example_inputs), scheme, chunks, exact, headroom)
    # NOTE: Dynamo calls backends with lazily recompiled GraphModules switched on, and Dynamo will not trace a lazy
    # GraphModule's forward (a graph break in every compiled branch): the modules built here are made eagerly
    with _use_lazy_graph_module(False):
        try:
            runs = converter.analyze()
        except Exception as err:  # noqa: BLE001  (a graph the passes do not understand is left alone)
            reason = err if isinstance(err, NotConvertible) else \
                f"analysis failed ({describe(err)})"
            log.warning("revcompile backend: graph of %d nodes goes to Inductor unchanged: %s",
                        len(gm.graph.nodes), reason)
            return compile_fx(gm, example_inputs)
        log.info("revcompile backend: converted %s", ", ".join(f"{run[0].name}..{run[-1].name}" for run in runs))
        return converter.rewrite(runs)


# NOTE: registered here for `import revcompile`, and by the `torch_dynamo_backends` entry point (pyproject.toml)
# for an installed package that was never imported. When Dynamo loads us through the entry point it registers the
# backend itself after the import and fails on a name already taken, so we step aside once it knows the entry point.
if "revcompile" not in _BACKENDS:
    register_backend(revcompile_backend, name="revcompile")
