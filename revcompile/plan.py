"""The residual plan: which layers form attention -> FFN/MoE pairs, and why the others were left alone.

`analyze` runs the capture and analysis passes once per distinct layer structure and returns a Plan; printing
it shows a table.

Example:
    >>> plan = revcompile.analyze(model)
    >>> plan.pairs[0].kinds
    ('attention', 'moe')
    >>> print(plan)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .capture import LayerCall, LayerTrace, example_call, find_stacks, trace_layer
from .capture.probe import eval_mode, stored_with_gradient
from .capture.tracer import bind_call, call_signature, unwrapped_forward
from .distributed import ORDER, refuse_wrapped
from .errors import RevcompileError, describe
from .passes.classify import ATTENTION, FFN, MOE, classify_branches, classify_whole
from .passes.extract import branch_graph_of, computes, other_outputs, whole_layer_graph_of
from .runtime.slicing import BatchContext
from .passes.residuals import (FORM_ROLES, PARALLEL, SEQUENTIAL, WHOLE, NotReversible, Residual,
                               find_parallel_residual, find_residual_chain)


@dataclass
class LayerStructure:
    """What the passes found in one distinct layer structure (shared by every layer that has it).

    form: SEQUENTIAL (x + A(x), then + M(.)), PARALLEL (x + A(x) + M(x)) or WHOLE (f(x) = layer(x) - x, for any
    layer that maps the hidden state to one of the same shape); `why_whole` says why a whole layer is not a pair.
    """

    trace: LayerTrace
    chain: list[Residual]
    branch_graphs: list[fx.Graph]
    kinds: list[str] = field(default_factory=list)
    splits_by_token: list[bool] = field(default_factory=list)  # may it run a slice of the sequence at a time?
    splits_by_sequence: list[bool] = field(default_factory=list)  # ... a slice of the batch at a time?
    batch_context: BatchContext | None = None  # the context's layout at the probe, its batch-carrying leaves
    form: str = SEQUENTIAL
    why_whole: str = ""

    def branch_modules(self, i: int) -> tuple[str, ...]:
        return tuple(n.target for n in self.branch_graphs[i].nodes if n.op == "call_module")


@dataclass
class Pair:
    """A layer to convert: an attention branch and an FFN or MoE branch (in sequence or in parallel), or the whole
    layer as one branch (then kinds, modules and scales have one entry)."""

    layer: str
    stack: str
    index: int
    kinds: tuple[str, ...]
    modules: tuple[tuple[str, ...], ...]
    scales: tuple[float | None, ...]
    module: nn.Module = field(repr=False)
    call: LayerCall = field(repr=False)
    structure: LayerStructure = field(repr=False)
    scheme: str | None = None  # the scheme make_reversible converted it with
    # what else reads this layer's output (probe.Stack.read_elsewhere): its run ends here, handing on a hidden state
    read_elsewhere: str = ""
    # its other outputs that the next layer reads (DSA's top-k indices, Zaya's router states): position -> the role
    # that makes it
    hands_on: dict[int, str] = field(default_factory=dict)

    @property
    def form(self) -> str:
        return self.structure.form


def _slices_by(pair: Pair) -> str:
    """Per branch, what it may run by slices of (runtime/slicing.py): tokens, sequences (of the batch) or neither
    (a branch making an output the next layer reads runs in one piece)."""
    structure = pair.structure
    return " | ".join("-" if role in pair.hands_on.values() else "tokens" if token else "sequences" if sequence
                      else "-" for role, token, sequence in zip(FORM_ROLES[structure.form], structure.splits_by_token,
                                                                 structure.splits_by_sequence))


@dataclass
class Skipped:
    layer: str
    reason: str


@dataclass
class Plan:
    """Result of `revcompile.analyze`: the pairs found, what was skipped and why, and the layer stacks."""

    stacks: list[str]
    pairs: list[Pair]
    skipped: list[Skipped]
    structures: int
    applied: bool = False  # the plan a converted model follows (make_reversible sets it)
    head: str | None = None  # set by make_reversible: how the LM head and loss run (see runtime/head.py)

    def table(self) -> str:
        rows = [[p.layer, p.form, " | ".join("+".join(m) for m in p.modules), " | ".join(p.kinds),
                 ", ".join("1" if s is None else f"{s:g}" for s in p.scales), _slices_by(p)]
                for p in self.pairs]
        headers = ["layer", "form", "branches", "kind", "residual scale", "may run by slices of"]
        if any(p.scheme for p in self.pairs):
            headers.append("scheme")
            rows = [row + [p.scheme] for row, p in zip(rows, self.pairs)]
        if any(p.structure.why_whole for p in self.pairs):
            headers.append("why whole layer")
            rows = [row + [p.structure.why_whole] for row, p in zip(rows, self.pairs)]
        if any(p.hands_on for p in self.pairs):
            headers.append("hands on to the next layer")
            rows = [row + [", ".join(f"output {i} (from {role})" for i, role in p.hands_on.items())]
                    for row, p in zip(rows, self.pairs)]
        if any(p.read_elsewhere for p in self.pairs):
            headers.append("output also read by (a run ends here)")
            rows = [row + [p.read_elsewhere] for row, p in zip(rows, self.pairs)]
        runtimes = [getattr(p.module, "_revcompile", None) for p in self.pairs]
        if any(rt is not None and rt.scheme.implicit for rt in runtimes):  # converted with fixed-point inversion
            headers.append("fixed point (forwards so far)")
            rows = [row + [_inversions(rt.inversions)] for row, rt in zip(rows, runtimes)]
        text = tabulate(rows, headers=headers)
        if self.skipped:
            text += "\n\n" + tabulate([[s.layer, s.reason] for s in self.skipped], headers=["skipped", "reason"])
        return text

    def reasons(self) -> str:
        """The skip reasons, each once, with the layers it applies to."""
        layers: dict[str, list[str]] = {}
        for s in self.skipped:
            layers.setdefault(s.reason, []).append(s.layer)
        return "; ".join(f"{', '.join(names) if len(names) <= 2 else f'{len(names)} layers'}: {reason}"
                         for reason, names in layers.items())

    def __str__(self) -> str:
        head = (f"revcompile plan{' (applied)' if self.applied else ''}: {len(self.pairs)} pairs, "
                f"{len(self.skipped)} skipped, in {', '.join(self.stacks)} "
                f"({self.structures} distinct layer structure{'s' if self.structures != 1 else ''} traced)")
        return head + "\n" + self.table() + (f"\n\nLM head and loss: {self.head}" if self.head else "")


def _inversions(stats) -> str:
    if not stats.solved + stats.stored:
        return "not run yet"
    return (f"{stats.solved} inverted, {stats.stored} kept input, <= {stats.max_iterations} iterations"
            if stats.stored else f"{stats.solved} inverted, <= {stats.max_iterations} iterations")


def _describe_chain(chain: list[Residual]) -> str:
    if not chain:
        return "it has no residual add of its own (the residual, if any, is inside a child module)"
    return (f"it has {len(chain)} residual branch{'es' if len(chain) > 1 else ''}, not an attention branch followed "
            "by an FFN/MoE branch")


def _kinds_reason(form: str, kinds: list[str]) -> str:
    return (f"its {'parallel' if form == PARALLEL else 'two'} residual branches are {kinds[0]} and {kinds[1]}, not "
            "attention and FFN/MoE")


def _cut(trace: LayerTrace) -> tuple[str, list[Residual], str]:
    """(form, residuals, why not a pair) of a traced layer: the residual chain, a parallel sum, or the whole layer."""
    try:
        chain, why = find_residual_chain(trace.graph, trace.hidden_name), ""
    except NotReversible as reason:
        chain, why = None, str(reason)
    if chain is not None and len(chain) == 2:
        return SEQUENTIAL, chain, ""
    parallel = find_parallel_residual(trace.graph, trace.hidden_name)
    if parallel:
        return PARALLEL, parallel, ""
    return WHOLE, [], why or _describe_chain(chain)


def layer_branches(layer: nn.Module, args: tuple, kwargs: dict, form: str | None = None,
                   like: list[fx.Graph] | None = None, child_nones: dict | None = None
                   ) -> tuple[LayerTrace, str, list[Residual], list[fx.Graph], str]:
    """Trace one layer for a call and cut it into branches: (trace, form, residuals, branch graphs, why the layer
    is not a pair). `form`, `like`: the form and branch graphs found for another call of the layer, to cut this
    one alike (two parallel branches are ordered by the modules they call); `child_nones`: its children's None
    outputs to trace with (`trace_layer`)."""
    trace = trace_layer(layer, args, kwargs, child_nones)
    found, chain, why = _cut(trace)
    if form is not None and form != WHOLE and found != form:
        raise NotReversible(f"this call of the layer is {found}, another was {form}")
    form = form or found
    if form == WHOLE:
        return trace, form, chain, [whole_layer_graph_of(trace)], why
    graphs = [branch_graph_of(trace, r) for r in chain]
    if like is not None and form == PARALLEL and _modules(graphs[0]) != _modules(like[0]):
        chain, graphs = chain[::-1], graphs[::-1]
    return trace, form, chain, graphs, why


def with_other_outputs(trace: LayerTrace, form: str, chain: list[Residual], graphs: list[fx.Graph],
                       positions: tuple[int, ...] | None = None) -> tuple[list[fx.Graph], dict[int, int]]:
    """The branch graphs of a cut layer, those that compute some of the layer's other outputs (top-k indices,
    recurrent state, attention weights) returning them too: (graphs, {output position: index of the branch}).

    positions: the outputs wanted (None: every one that a branch computes alone); raises NotReversible for a
    wanted one that no branch computes alone. An output that is a constant in this trace (None) is not wanted.
    """
    outputs = other_outputs(trace.graph)
    wanted = outputs if positions is None else {p: outputs[p] for p in positions if p in outputs}
    source: dict[int, int] = {}
    for position, node in wanted.items():
        role = 0 if form == WHOLE else next((i for i, r in enumerate(chain) if computes(trace, r, node)), None)
        if role is not None:
            source[position] = role
        elif positions is not None:
            raise NotReversible(f"the next layer reads its output {position} ({node.name}: state carried from layer "
                                "to layer beside the hidden state), which neither of its branches computes alone, so "
                                "no reversible branch can hand it on")
    cut = []
    for i, graph in enumerate(graphs):
        handed = tuple(wanted[p] for p in sorted(source) if source[p] == i)
        if handed:
            graph = whole_layer_graph_of(trace, handed) if form == WHOLE else branch_graph_of(trace, chain[i], handed)
        cut.append(graph)
    return cut, source


def _modules(graph: fx.Graph) -> set:
    return {n.target for n in graph.nodes if n.op == "call_module"}


def _whole(layer: nn.Module, call: LayerCall, trace: LayerTrace, why: str, graph: fx.Graph | None = None
           ) -> LayerStructure:
    """The layer as one branch (`graph`, the whole layer's update, cut out here unless already), classified."""
    graph = graph or whole_layer_graph_of(trace)
    found = classify_whole(layer, trace, fx.GraphModule(layer, graph), call)
    return LayerStructure(trace, [], [graph], found.kinds, found.by_token, found.by_sequence, found.batch_context,
                          WHOLE, why)


def _analyze_layer(layer: nn.Module, call: LayerCall) -> LayerStructure:
    """The layer's structure, traced with its children's outputs as proxies, or else (where that graph fails on the
    call's values) with their None outputs baked in (`trace_layer`'s NOTE)."""
    try:
        return _analyze_trace(layer, call, None)
    except RevcompileError:
        raise
    except Exception:
        if not any(call.child_nones.values()):
            raise
        return _analyze_trace(layer, call, call.child_nones)


def _analyze_trace(layer: nn.Module, call: LayerCall, child_nones: dict | None) -> LayerStructure:
    trace, form, chain, graphs, why = layer_branches(layer, call.args, call.kwargs, child_nones=child_nones)
    if form == WHOLE:
        return _whole(layer, call, trace, why, graphs[0])
    found = classify_branches(layer, trace, chain, [fx.GraphModule(layer, g) for g in graphs], call)
    kinds, by_token, by_sequence = found.kinds, found.by_token, found.by_sequence
    if form == PARALLEL and kinds[1] == ATTENTION and kinds[0] != ATTENTION:  # attention is the first role
        chain, graphs, kinds, by_token, by_sequence = (chain[::-1], graphs[::-1], kinds[::-1], by_token[::-1],
                                                       by_sequence[::-1])
    if kinds[0] != ATTENTION or kinds[1] not in (FFN, MOE):
        return _whole(layer, call, trace, _kinds_reason(form, kinds))
    return LayerStructure(trace, chain, graphs, kinds, by_token, by_sequence, found.batch_context, form)


def _handed_on(call: LayerCall, following: LayerCall) -> dict[int, list[torch.Tensor]]:
    """The outputs of a layer's call, beside its hidden state, that the next layer's call reads: {position: their
    tensors}."""
    if not isinstance(call.output, (tuple, list)):
        return {}
    read = {id(t) for t in tree_flatten((following.args[1:], following.kwargs))[0] if isinstance(t, torch.Tensor)}
    handed = {i: [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
              for i, value in enumerate(call.output) if i}
    return {i: tensors for i, tensors in handed.items() if any(id(t) in read for t in tensors)}


def _hands_on(found: LayerStructure, call: LayerCall, following: LayerCall | None) -> dict[int, str]:
    """The outputs a layer hands on to the next one: {position: the role (branch) that makes it}; NotReversible
    when one of them is not made by a branch alone.

    NOTE: what the next layer reads beside the hidden state (DeepSeek sparse attention's top-k indices in
    GLM-MoE-DSA and HY-V4, Zaya's router states) is made by one of this layer's branches; that branch returns it
    from the reversible forward and the next layer keeps it as context for its recompute, as any mask. Integer
    state is handed on as it is. A floating-point one is an output of this layer's reversible Function: the next
    layer's backward, which runs first, gives it its gradient, and this layer's backward takes that gradient into
    the recompute of the branch that made it (as Hugging Face's router logits are).
    """
    handed = _handed_on(call, following) if following is not None else {}
    if not handed:
        return {}
    _, sources = with_other_outputs(found.trace, found.form, found.chain, found.branch_graphs, tuple(sorted(handed)))
    return {position: FORM_ROLES[found.form][sources[position]] for position in sorted(sources)}


def _forward_replaced(layer: nn.Module) -> str | None:
    """Why a layer whose `forward` is set on the instance cannot convert, or None when it is not.

    NOTE: conversion swaps the layer's class, and an instance attribute `forward` (accelerate's hooks when a
    device_map spreads the model over devices or offloads it; a user's monkeypatch) takes precedence over the class's:
    the layer would keep running its original forward while the plan called it converted.
    """
    if "forward" not in vars(layer):
        return None
    if hasattr(layer, "_hf_hook"):
        return ("its forward is wrapped by accelerate's hooks (a device_map over several devices, or offloading), "
                "which would run the original forward instead of the reversible one: load the model on one device "
                "(device_map=None, or {'': 0}), or remove the hooks with "
                "accelerate.hooks.remove_hook_from_module(model, recurse=True) once it is on one device")
    return ("its forward is replaced on the module itself (an instance attribute `forward`), which would run instead "
            "of the reversible class's: delete the attribute (del layer.forward) to convert it")


def structure_key(layer: nn.Module, call: LayerCall) -> tuple:
    """Layers with equal keys trace to the same graph: class, children's classes, call signature, scalar attributes."""
    scalars = tuple(sorted((k, v) for k, v in vars(layer).items()
                           if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))))
    children = tuple((name, type(child)) for name, child in layer.named_children())
    _, _, context = bind_call(unwrapped_forward(layer), layer, call.args, call.kwargs)
    return type(layer), children, call_signature(context), scalars


def analyze(model: nn.Module, example_inputs: Any = None) -> Plan:
    """Find the residual attention -> FFN/MoE pairs of `model` without changing it.

    example_inputs: one forward call's input (a tensor, a tuple of arguments or a dict of keywords); by default a
    few random tokens for the model's embedding. On a converted model it returns the plan in effect
    (`plan.applied` is True). Raises RevcompileError when the model is not an nn.Module or has no layer stack.
    """
    if not isinstance(model, nn.Module):
        raise RevcompileError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_revcompile_plan", None) is not None:
        return model._revcompile_plan
    if any(hasattr(m, "_revcompile") for m in model.modules()):
        raise RevcompileError("part of this model is already converted by revcompile (make_reversible was called on "
                              "a submodule): analyze that submodule, or call revcompile.undo on it first")
    refuse_wrapped(model, f"revcompile converts the model before a distributed engine wraps it: {ORDER}")
    misses: list[str] = []
    stacks = find_stacks(model, example_call(model, example_inputs), misses)
    if not stacks:
        raise RevcompileError(f"{type(model).__name__} has no layer stack (an nn.ModuleList whose layers are "
                              "called in order on each other's output); nothing to convert"
                              + "".join(f"; {miss}" for miss in misses))
    names = {m: n for n, m in model.named_modules()}
    structures: dict[tuple, LayerStructure | NotReversible] = {}
    pairs, skipped = [], []
    for stack in stacks:
        for index, (layer, call) in enumerate(zip(stack.layers, stack.calls)):
            replaced = _forward_replaced(layer)
            if replaced:
                skipped.append(Skipped(names[layer], replaced))
                continue
            key = structure_key(layer, call)
            if key not in structures:
                try:
                    # NOTE: in eval mode: a layer's own `F.dropout(training=self.training)` is traced as a constant
                    # (LayerTrace's NOTE), and random branches would fail the classifier's token and sequence checks
                    # (BioGPT's FFN came out as "attention" in training mode): a plan made in training mode differed
                    # from the same model's in eval mode, so a checkpoint reloaded by from_pretrained (eval mode)
                    # converted otherwise. The layers trace again on their first call in training.
                    with eval_mode(layer):
                        structures[key] = _analyze_layer(layer, call)
                    stored = stored_with_gradient(layer, call)
                    if stored:
                        structures[key] = NotReversible(
                            f"its forward stores a tensor that carries gradient outside its output "
                            f"({', '.join(stored)}): a reversible layer computes it without gradient, and what reads "
                            "it (an auxiliary loss?) would get none; return it from the layer, or train with "
                            "torch.compile(model, backend=\"revcompile\"), which makes such values of an FFN/MoE "
                            "branch outputs of the layer")
                except RevcompileError as reason:
                    structures[key] = reason if isinstance(reason, NotReversible) else NotReversible(str(reason))
                except Exception as err:  # a layer the passes do not understand is reported, never half-converted
                    structures[key] = NotReversible(
                        f"its traced graph fails on the probe's values ({describe(err)}): the "
                        "layer is traced once, so a forward that branches on tensor values does not convert")
            found, hands_on = structures[key], {}
            if not isinstance(found, NotReversible):
                try:
                    hands_on = _hands_on(found, call, stack.calls[index + 1] if index + 1 < len(stack.calls) else None)
                except NotReversible as reason:
                    found = reason
            if isinstance(found, NotReversible):
                skipped.append(Skipped(names[layer], str(found)))
                continue
            pairs.append(Pair(names[layer], stack.name, index, tuple(found.kinds),
                              tuple(found.branch_modules(i) for i in range(len(found.branch_graphs))),
                              tuple(r.scale for r in found.chain) or (None,), layer, call, found,
                              read_elsewhere=stack.read_elsewhere.get(index, ""), hands_on=hands_on))
    return Plan([s.name for s in stacks], pairs, skipped, len(structures))
