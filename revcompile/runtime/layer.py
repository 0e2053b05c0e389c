"""Reversible layers: the converted layer keeps its class, its children and its state_dict keys.

A converted layer's class is swapped for a subclass whose forward runs the coupling (as FSDP2's fully_shard does),
so `isinstance` checks, hooks and parameter names stay as they were and `undo` swaps the class back. A run of
consecutive converted layers passes its streams from layer to layer packed in one tensor of shape
(n_streams, *hidden.shape); the first layer of a run opens them from the hidden state, the last merges them back,
so the model's own loop (`for decoder_layer in self.layers`) runs unmodified.

Which path a call takes:
- training, grad enabled, inversion on: the reversible Function (activations rebuilt in backward);
- otherwise (eval, torch.no_grad(), `disable_inversion()`, `invert=False`): the same steps and branch slices
  under ordinary autograd, the reference every gradient test compares against.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..capture.tracer import bind_call, call_signature, dynamic_names
from ..coupling import Scheme
from ..distributed import refuse_sharded_inside
from ..errors import RevcompileError
from ..passes.residuals import FORM_ROLES, SEQUENTIAL, WHOLE
from ..passes.rewrite import coupling_module
from ..schemes.branches import scheme_branches
from .compiled import BranchCompiler
from .function import TENSOR_LEAF, CouplingCall, ReversibleCoupling, Slot, step_pieces
from .hf_outputs import (GRADIENT_OUTPUTS, HIDDEN_STATES, ROUTER_LOGITS, OtherOutputs, active_collector, is_cache,
                         mark_whole, other_outputs_into, private_collector, runs_whole)
from .reference import branch_autocast, branch_input, linear_step, open_streams, straight_through
from .replay import AutocastState, SelectionScopes
from .slicing import SEQUENCE, TOKEN, BatchContext, Split
from .streams import ExactStreams, FixedPoint, FloatStreams, exact_by_default

_state = threading.local()
PAIR_ROLES = ("attn", "mlp")  # the pair's own branches, in layer order
NEW_MODULES = "revcompile_modules"  # the layer attribute holding modules a scheme adds (adapters, projections)


@contextmanager
def _thread_setting(name: str, value: Any):
    previous = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def disable_inversion():
    """Inside this block converted models run the same coupled computation with ordinary autograd.

    Example:
        >>> with revcompile.disable_inversion():
        ...     model(ids, labels=ids).loss.backward()   # stores activations: the gradient reference
    """
    return _thread_setting("disabled", True)


def inversion_disabled() -> bool:
    return bool(getattr(_state, "disabled", False))


def observe_reconstruction(observer: Callable[[nn.Module, float], None]):
    """Inside this block every reversible layer reports (layer, relative error of the input backward rebuilt against
    its true input; exactly 0.0 for exact streams rebuilt bit for bit).

    Used by `revcompile.check`; it keeps a copy of every layer's input, so it is for diagnosis, not training.
    """
    return _thread_setting("observer", observer)


def reconstruction_observer(layer: nn.Module, hidden: torch.Tensor) -> Callable | None:
    """Inside `observe_reconstruction`: the `observe` callback of one reversible call of `layer` on `hidden` (a
    copy of the true input, compared with what backward rebuilds); else None."""
    observer = getattr(_state, "observer", None)
    if observer is None:
        return None
    true_input = hidden.detach().clone()

    def observe(arithmetic: FloatStreams, rebuilt: torch.Tensor) -> None:
        observer(layer, arithmetic.input_error(true_input, rebuilt))
    return observe


def _tag_of(hidden: torch.Tensor, name: str) -> Any:
    """Attribute `name` that a converted layer set on its output `hidden` (its Slot, or the exact reference's
    state), or None.

    NOTE: an engine may hand the layer an identity view of that output rather than the tensor itself: FSDP2's
    pre-forward hook passes a layer's inputs through an autograd Function that returns them, which autograd turns
    into views. Without looking at the view's base the previous layer's output would stay in its slot until
    backward, and memory would grow with depth again.
    """
    tag, viewed = getattr(hidden, name, None), _viewed(hidden)
    if tag is None and viewed is not hidden:
        tag = getattr(viewed, name, None)
    return tag


def _viewed(hidden: torch.Tensor) -> torch.Tensor:
    """The tensor `hidden` is an identity view of (the whole base, not a slice of it), or `hidden` itself."""
    base = hidden._base
    if base is None or (hidden.shape, hidden.stride(), hidden.storage_offset()) != \
            (base.shape, base.stride(), base.storage_offset()):
        return hidden
    return base


# attributes of a converted layer's packed output: its Slot, the exact reference's integer state, and the hidden
# state the streams merge into (made while Hugging Face collects hidden states: `LayerRuntime._run`)
SLOT, EXACT_REFERENCE, HIDDEN_STATE = "_revcompile_slot", "_revcompile_exact", "_revcompile_hidden_state"


def splits_by_branch(scheme: Scheme, form: str, by_token: list[bool], by_sequence: list[bool],
                     chunks: int | None) -> dict[str, Split]:
    """branch -> how it runs in pieces (`chunks` of them, None: by device): slices of the sequence for a branch made
    only of token-wise roles, slices of the batch for one made of roles that each treat a sequence alone (a pair's
    "layer" role is both of its branches)."""
    roles = FORM_ROLES[form]
    token_wise = {role for role, splits in zip(roles, by_token) if splits}
    sequence_wise = {role for role, splits in zip(roles, by_sequence) if splits}
    if form != WHOLE and sequence_wise == set(roles):
        sequence_wise.add("layer")
    splits = {}
    for name, used in scheme.branch_roles.items():
        if used and set(used) <= token_wise:
            splits[name] = Split(TOKEN, chunks)
        elif used and set(used) <= sequence_wise:
            splits[name] = Split(SEQUENCE, chunks)
    return splits


@dataclass
class InversionStats:
    """How a layer's implicit steps fared in forward: solved by fixed-point iteration, or input kept (hybrid)."""

    solved: int = 0
    stored: int = 0
    max_iterations: int = 0
    iterations: int = 0  # over all inversions: each one branch call

    def record(self, iterations: int, converged: bool) -> None:
        self.solved += converged
        self.stored += not converged
        self.max_iterations = max(self.max_iterations, iterations)
        self.iterations += iterations

    @property
    def mean_iterations(self) -> float:
        total = self.solved + self.stored
        return self.iterations / total if total else float("nan")

    @property
    def converged_fraction(self) -> float:
        total = self.solved + self.stored
        return self.solved / total if total else float("nan")


class _GradientTo(torch.autograd.Function):
    """apply(source, value) -> value, its gradient handed to `source` (in its dtype): the same streams in another
    form, the run's packed integers and their float carriers, either way round (straight through, as in the coupled
    reference). `value` is returned untouched: packed integers are bits, which arithmetic would not keep."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.dtype = source.dtype
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def _before_cast(hidden: torch.Tensor) -> torch.Tensor:
    """The run's packed streams where an engine handed this layer a copy of them cast to another dtype.

    NOTE: FSDP2's MixedPrecisionPolicy (with cast_forward_inputs, its default) casts every floating-point input of a
    sharded layer to param_dtype. Exact streams travel between layers as int32 bits in a float32 tensor: cast to
    bf16 they became numbers, and the loss nan. The cast's autograd node leads back to the reversible Function
    that made them, whose slot still holds their bits (the next layer empties it): those go on, and their gradient
    back through the cast and FSDP's hooks (`_GradientTo`; the streams' gradients are values of the model's dtype,
    so the cast does not round them).
    """
    cast = _viewed(hidden).grad_fn
    if cast is None or type(cast).__name__ != "ToCopyBackward0" or _tag_of(hidden, SLOT) is not None:
        return hidden
    slot = getattr(getattr(cast.next_functions[0][0], "call", None), "out_slot", None)
    bits = slot.tensor if isinstance(slot, Slot) else None
    if bits is None or (bits.shape, bits.device) != (hidden.shape, hidden.device):
        return hidden  # (a copy to another device is no cast: a run does not span devices)
    packed = _GradientTo.apply(hidden, bits)
    setattr(packed, SLOT, slot)
    return packed


class StreamRuntime:
    """A converted layer as the reversible Function sees it: its scheme, its place in its run, its recompute slices.

    It runs one call of the layer either reversibly (`run_reversible`) or as the plain coupled computation
    (`run_coupled`). A module's layer (LayerRuntime) and a layer cut out of a Dynamo graph by the torch.compile
    backend (`backend.GraphLayer`) are both one.
    """

    def __init__(self, scheme: Scheme, is_first: bool, is_last: bool, splits: dict[str, Split],
                 batch_context: BatchContext | None = None, exact: bool | None = False,
                 exact_headroom: int | None = None, compiled_branches: bool = False):
        self.scheme = scheme
        self.splits = splits  # branch -> the pieces it runs in, forward and recompute (slicing.py)
        # the context layouts checked for slicing by batch (the probe's first), and every layout already looked at
        self.layouts = [batch_context] if batch_context is not None else []
        self._seen_layouts = [batch_context.spec] if batch_context is not None else []
        self.is_first = is_first
        self.is_last = is_last
        self.exact = exact  # streams as fixed-point integers (streams.py); None: where the run computes in 16 bits
        self.exact_headroom = exact_headroom
        self.inversions = InversionStats()
        self._float = FloatStreams(scheme)
        self.compiled_branches = compiled_branches  # compiled graphs (compile=True, the backend): see function.py
        # where each eager branch makes its selections (replay.py); None: recorded over every op of a call
        self.selection_scopes: SelectionScopes | None = SelectionScopes()
        # a compiled branch's recompute and backward in one call where it can (function._one_call); False: two
        self.one_call_recompute = True

    def streams(self, hidden: torch.Tensor, previous: FloatStreams | None) -> FloatStreams:
        """This call's stream arithmetic. The run's first layer chooses it: exact streams when asked for, or (exact
        None) when the run computes in 16 bits (bf16/fp16 hidden states, or autocast); later layers continue with
        what the previous layer of the run handed on (`previous`)."""
        if self.is_first:
            exact = self.exact if self.exact is not None else exact_by_default(hidden)
            if not exact:
                return self._float
            return ExactStreams(self.scheme, FixedPoint.choose(hidden, self.exact_headroom), self.compiled_branches)
        if previous is not None:
            return previous
        if self.exact:
            raise RevcompileError("a converted layer in exact mode did not receive its run's streams: converted "
                                  "layers must be called in order, from the first of their run to the last, all in "
                                  "training or all not")
        return self._float

    def run_coupled(self, branches: dict[str, nn.Module], hidden: torch.Tensor, values: list,
                    collecting_outputs: bool = False, collecting_hidden_states: bool = False) -> torch.Tensor:
        """The coupled computation under ordinary autograd: the scheme's steps, each branch run in the slices the
        reversible Function runs it in (the same random numbers and kernels), on float streams, or on integer streams
        with straight-through gradients; gradients summed as the reversible backward sums them (reference.py).
        `collecting_hidden_states`: a packed output carries the hidden state it merges into (`HIDDEN_STATE`)."""
        hidden = self.coupled_input(hidden)
        tag = None if self.is_first else _tag_of(hidden, EXACT_REFERENCE)
        arithmetic = self.streams(hidden, tag[0] if tag else None)
        if arithmetic.exact:
            return self._run_exact_coupled(arithmetic, tag[1] if tag else None, branches, hidden, values,
                                           collecting_outputs, collecting_hidden_states)
        streams = open_streams(self.scheme, hidden) if self.is_first else arithmetic.unpack(hidden)
        for step in self.scheme.steps:
            out = self._run_branch(branches, step, [streams[s] for s in step.reads], values, collecting_outputs)
            streams = linear_step(step, streams, out)
        streams = self.scheme.permute(streams)
        if self.is_last:
            return arithmetic.merge(streams)
        packed = arithmetic.pack(streams)
        if collecting_hidden_states:
            setattr(packed, HIDDEN_STATE, arithmetic.merge(streams))
        return packed

    def _run_branch(self, branches: dict[str, nn.Module], step, reads: list[torch.Tensor], values: list,
                    collecting_outputs: bool) -> torch.Tensor:
        branch = branches[step.branch]
        reads = [branch_input(read) for read in reads]
        pieces = step_pieces(self, step, branch, reads[0], values, collecting_outputs)
        with branch_autocast(reads[0].device):
            if pieces is None:
                return branch(*reads, *values)
            return pieces[0].join([branch(*(piece.take(r) for r in reads), *piece.context(values))
                                   for piece in pieces])

    def _run_exact_coupled(self, arithmetic: ExactStreams, state: dict | None, branches: dict[str, nn.Module],
                           hidden: torch.Tensor, values: list, collecting_outputs: bool,
                           collecting_hidden_states: bool) -> torch.Tensor:
        """Exact streams under ordinary autograd: the reversible Function's integer arithmetic, step for step and
        slice for slice, while a float copy of each stream (`carriers`, equal in value to the integers seen in the
        model's dtype) carries the gradient of the float steps through every rounding (straight through).

        Between layers the carriers travel packed; the integer `state` rides on the packed tensor."""
        scheme = self.scheme
        if self.is_first:
            state = arithmetic.open(hidden)
            opened = open_streams(scheme, hidden)
            carriers = {s: straight_through(arithmetic.view(state, s), opened[s]) for s in scheme.streams}
        else:
            carriers, state = dict(zip(scheme.streams, hidden.unbind(0))), dict(state)
        recording = torch.is_grad_enabled()  # else (eval) the carriers are the integers' values and nothing more
        for step in scheme.steps:
            out = self._run_branch(branches, step, [carriers[s] for s in step.reads], values, collecting_outputs)
            state[step.target] = arithmetic.apply(step, state, out)
            if recording:
                carriers = linear_step(step, carriers, out)
            carriers[step.target] = straight_through(arithmetic.view(state, step.target), carriers[step.target])
        state, carriers = scheme.permute(state), scheme.permute(carriers)
        if self.is_last:
            arithmetic.fmt.raise_if_overflowed()
        if self.is_last or collecting_hidden_states:
            merged = arithmetic.merge(state)
            merged = straight_through(merged, scheme.merge_streams(carriers)) if recording else merged
            if self.is_last:
                return merged
        packed = torch.stack([carriers[s] for s in scheme.streams])
        setattr(packed, EXACT_REFERENCE, (arithmetic, state))
        if collecting_hidden_states:
            setattr(packed, HIDDEN_STATE, merged)
        return packed

    def reversible_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the reversible Function takes for `hidden`: itself, or the run's packed integer streams where the
        layers before this one ran coupled (`run_coupled` on exact streams).

        NOTE: the layers below a reversible one run coupled when they need no gradient (frozen, above a frozen
        embedding). On exact streams their output is float carriers with the run's integers beside them; those
        integers must go on, in a slot of their own (nothing refills it for a backward), or this layer would continue
        the run on float streams, whose bf16 steps do not invert exactly (gradients were 1 % off the reference's
        with two of four bf16 layers frozen). A layer left in eval mode in training runs coupled with grad: its
        carriers take the gradient of the integers (`_GradientTo`)."""
        exact = None if self.is_first or _tag_of(hidden, SLOT) is not None else _tag_of(hidden, EXACT_REFERENCE)
        if exact is None:
            return hidden
        arithmetic, state = exact
        packed, slot = arithmetic.pack(state), Slot()
        if hidden.requires_grad:
            packed = _GradientTo.apply(hidden, packed)
        slot.streams = arithmetic
        setattr(packed, SLOT, slot)
        return packed

    def coupled_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the coupled computation takes for `hidden`: itself, or float carriers of the run's integer streams
        (tagged with them, as a coupled layer's output is) where the layer before ran reversibly on exact streams
        (a layer left in eval mode in training above a reversible one: it read the packed integers as floats)."""
        slot = None if self.is_first else _tag_of(hidden, SLOT)
        if slot is None or not slot.streams.exact:
            return hidden
        arithmetic = slot.streams
        state = arithmetic.unpack(hidden)
        carriers = torch.stack([arithmetic.view(state, s) for s in self.scheme.streams])
        if hidden.requires_grad:
            carriers = _GradientTo.apply(hidden, carriers)
        setattr(carriers, EXACT_REFERENCE, (arithmetic, state))
        return carriers

    def run_reversible(self, branches: dict[str, nn.Module], hidden: torch.Tensor, values: list, params: list,
                       training: bool, collector: dict | None = None,
                       observe: Callable[[FloatStreams, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The reversible Function on one call: `values` the context (pytrees of tensors and constants), `params`
        the layer's trainable parameters, `collector` Hugging Face's output collector of this model call."""
        leaves, spec = tree_flatten(values)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        in_slot = None if self.is_first else _tag_of(hidden, SLOT)
        template = [TENSOR_LEAF if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        arithmetic = self.streams(hidden, in_slot.streams if in_slot is not None else None)
        collecting = collector if collector is not None else {}
        call = CouplingCall(self, branches, template, spec, params, in_slot, None if self.is_last else Slot(),
                            training, AutocastState.capture(hidden.device), arithmetic,
                            collected={key: collecting[key] for key in GRADIENT_OUTPUTS if key in collecting} or None,
                            observe=observe,
                            hands_hidden_state=not self.is_last and HIDDEN_STATES in collecting)
        out = ReversibleCoupling.apply(call, hidden, *tensors, *params)
        if isinstance(out, tuple):  # (output, router logits given a gradient path, ...): see hf_outputs.py
            if call.hands_hidden_state:
                setattr(out[0], HIDDEN_STATE, out[-1])
            out = out[0]
        if in_slot is not None:
            in_slot.tensor = None  # the previous layer's output is ours now; backward rebuilds it (see function.py)
        if call.out_slot is not None:
            setattr(out, SLOT, call.out_slot)
        return out


class _FirstReads:
    """A branch that reads `n` streams, called with one tensor for all of them (a layout check's probe input)."""

    def __init__(self, branch: nn.Module, n: int):
        self.branch, self.n = branch, n

    def __call__(self, x: torch.Tensor, *context) -> torch.Tensor:
        return self.branch(*[x] * self.n, *context)


class LayerRuntime(StreamRuntime):
    """Per converted layer: its scheme, its generated coupling (one per call signature) and its place in the run."""

    def __init__(self, layer: nn.Module, scheme: Scheme, branch_graphs: list[fx.Graph], signature: tuple,
                 is_first: bool, is_last: bool, invert: bool, original_class: type, splits: dict[str, Split],
                 batch_context: BatchContext | None = None, compiler: BranchCompiler | None = None,
                 exact: bool | None = False, exact_headroom: int | None = None, form: str = SEQUENTIAL,
                 outputs: int | None = None, traced_training: bool = False,
                 other_outputs: dict[int, int] | None = None, hands_on: tuple[int, ...] = (),
                 child_nones: dict | None = None):
        super().__init__(scheme, is_first, is_last, splits, batch_context, exact, exact_headroom,
                         compiled_branches=compiler is not None)
        self.form = form  # the layer form (passes/residuals.py): which roles branch_graphs are
        self.outputs = outputs  # how many values the original layer returns (None: one tensor, not a tuple)
        # NOTE: the other outputs a converted layer returns. In training only those the next layer reads
        # (`hands_on`, plan._hands_on): a floating-point one that nothing reads, made in the reversible forward,
        # would carry no gradient, so it stays None there. In eval every one a branch computes alone
        # (plan.with_other_outputs: RWKV's recurrent state for generate(), attention weights), as the original
        # layer returns them.
        self.hands_on = hands_on
        self.child_nones = child_nones  # the children's None outputs its trace holds (tracer.trace_layer's NOTE)
        self.compiler = compiler  # compile=True: the pair's branches run as shared compiled graphs (compiled.py)
        self.invert = invert
        self.original_class = original_class
        self.forward_fn = inspect.unwrap(original_class.forward)
        # (call signature, the layer's mode when traced: LayerTrace's NOTE) -> branches, coupled forward, inverse
        self._built: dict[tuple[tuple, bool], tuple[dict[str, nn.Module], fx.GraphModule, fx.GraphModule]] = {}
        self._roles: dict[str, fx.GraphModule] = {}
        self._build(layer, branch_graphs, signature, traced_training, other_outputs or {})

    def _build(self, layer: nn.Module, branch_graphs: list[fx.Graph], signature: tuple, training: bool,
               other_outputs: dict[int, int]):
        """Build the coupling for calls with this signature in this mode from the branch graphs (`other_outputs`:
        output position -> index of the branch graph that also returns it)."""
        roles = {name: fx.GraphModule(layer, graph, class_name=f"{name.title()}Branch")
                 for name, graph in zip(FORM_ROLES[self.form], branch_graphs)}
        self._roles = self._roles or roles
        if self.compiler is not None:
            roles = {name: self.compiler(layer, branch, name) for name, branch in roles.items()}
        positions = {name: tuple(sorted(p for p, source in other_outputs.items() if source == i))
                     for i, name in enumerate(FORM_ROLES[self.form])}
        roles = {name: OtherOutputs(role, positions[name]) if positions[name] else role for name, role in roles.items()}
        branches = scheme_branches(self.scheme, self.form, roles, getattr(layer, NEW_MODULES, {}))
        mark_whole(branches)
        names = dynamic_names(signature)
        self._built[signature, training] = (branches, coupling_module(self.scheme, branches, names),
                                            coupling_module(self.scheme, branches, names, inverse=True))

    def bind(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any], tuple]:
        """(hidden state, context by name, call signature) of a call of the layer."""
        _, hidden, context = bind_call(self.forward_fn, layer, args, kwargs)
        return hidden, context, call_signature(context)

    def coupling(self, layer: nn.Module, args: tuple, kwargs: dict, signature: tuple):
        """(branches, coupled forward, generated inverse) for calls with these context names, in the layer's mode.

        A call signature the probe did not see (say, generate() passing a cache), or the first call in the other
        mode (train / eval), is traced again.
        """
        key = (signature, layer.training)
        if key not in self._built:
            # the passes, run again for a call signature the probe did not see
            from ..plan import layer_branches, with_other_outputs

            original = layer.__class__
            layer.__class__ = self.original_class
            try:
                trace, _, chain, graphs, _ = layer_branches(layer, args, kwargs, self.form,
                                                            like=[r.graph for r in self._roles.values()],
                                                            child_nones=self.child_nones)
                graphs, other_outputs = with_other_outputs(trace, self.form, chain, graphs,
                                                           self.hands_on if layer.training else None)
            finally:
                layer.__class__ = original
            self._build(layer, graphs, signature, layer.training, other_outputs)
        return self._built[key]

    def _check_layout(self, layer: nn.Module, branches: dict[str, nn.Module], hidden: torch.Tensor,
                      values: list) -> None:
        """A context layout the probe did not see (a padding mask that was None there): find its batch-carrying
        leaves and check, once, on this call's values, that each branch sliced by batch gives its output whole (as
        the analysis did on the probe's, `classify.splits_by_sequence`). A layout that fails runs in one piece."""
        sequence_wise = [name for name, split in self.splits.items()
                         if split.kind == SEQUENCE and not runs_whole(branches[name])]
        shape = hidden.shape if self.is_first else hidden.shape[1:]  # later layers get (n_streams, *hidden.shape)
        if not sequence_wise or len(shape) < 3 or shape[0] < 2:
            return
        spec = tree_flatten(values)[1]
        if any(spec == seen for seen in self._seen_layouts):
            return
        self._seen_layouts.append(spec)
        from ..capture.probe import eval_mode
        from ..passes.classify import splits_by_sequence

        layout = BatchContext.of(values, shape[0])
        reads = {step.branch: len(step.reads) for step in self.scheme.steps}
        dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)
        cuda = hidden.device.type == "cuda"
        with torch.no_grad(), eval_mode(layer), private_collector(ROUTER_LOGITS), \
                torch.random.fork_rng(devices=[hidden.device] if cuda else [], device_type="cuda" if cuda else "cpu"):
            # NOTE: the layer's input itself where it is a hidden state; later layers of a run get packed streams
            # (integers, for exact streams), so they are checked on random values of the stream's shape
            x = hidden.detach() if self.is_first else torch.randn(shape, dtype=dtype, device=hidden.device)
            fits = all(splits_by_sequence(_FirstReads(branches[name], reads[name]), x, values, layout)
                       for name in sequence_wise)
        if fits:
            self.layouts.append(layout)

    def role_branches(self) -> dict[str, fx.GraphModule]:
        """The pair's own branches ("attn", "mlp") cut out for the call signature seen when converting."""
        return self._roles

    def generated(self) -> tuple[dict[str, nn.Module], fx.GraphModule, fx.GraphModule]:
        """(branches, coupled forward, inverse) generated for the call signature seen when converting."""
        return next(iter(self._built.values()))

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | tuple:
        """The converted layer's call; a layer that returned a tuple returns (output, *its other outputs), each
        made by the branch that computes it, or None (see `hands_on`)."""
        with other_outputs_into({}) as made:
            out = self._run(layer, args, kwargs)
        if self.outputs is None:
            return out
        count = max([self.outputs, *(position + 1 for position in made)])
        return (out, *(made.get(position) for position in range(1, count)))

    def _run(self, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, context, signature = self.bind(layer, args, kwargs)
        if not self.is_first:
            hidden = _before_cast(hidden)
        branches, _, _ = self.coupling(layer, args, kwargs, signature)
        values = [context[name] for name in dynamic_names(signature)]
        params = [p for p in layer.parameters() if p.requires_grad]
        collector = active_collector()
        collecting_hidden_states = collector is not None and HIDDEN_STATES in collector
        if collecting_hidden_states and not self.is_first:
            _record_hidden_state(collector[HIDDEN_STATES], hidden)
        if layer.training and torch.is_grad_enabled() and any(is_cache(v) for v in values):
            # as under Hugging Face activation checkpointing, a cache is not used in training (the backward
            # recompute would update it a second time); the one created for use_cache=True is empty: no notice
            if any(is_cache(v) and v.get_seq_length() for v in values) and not getattr(_state, "cache_notice", 0):
                warnings.warn("a filled KV cache (past_key_values) was passed to a reversible layer in training; it "
                              "is not used (as under activation checkpointing): pass no past_key_values in "
                              "training", stacklevel=3)
                _state.cache_notice = 1
            values = [None if is_cache(v) else v for v in values]
        if not any(is_cache(v) for v in values):  # a cache would be updated by the check
            self._check_layout(layer, branches, hidden, values)
        wants_grad = self.invert and not inversion_disabled() and torch.is_grad_enabled() and bool(params)
        if wants_grad and not layer.training and not getattr(_state, "eval_notice", 0):
            # NOTE: a custom loop that evaluates with model.eval() and forgets model.train() trains on in eval mode,
            # where the layers run coupled with ordinary autograd, as Hugging Face checkpointing switches off in eval
            warnings.warn("a converted layer ran in eval mode with gradients enabled: in eval mode converted layers "
                          "run without inversion and keep their activations like plain training; call model.train() "
                          "before training steps (or torch.no_grad() for evaluation)", stacklevel=3)
            _state.eval_notice = 1
        reversible = (self.invert and not inversion_disabled() and layer.training and torch.is_grad_enabled()
                      and (hidden.requires_grad or bool(params)))
        if not reversible:
            return self.run_coupled(branches, hidden, values,
                                    collector is not None and any(key in collector for key in GRADIENT_OUTPUTS),
                                    collecting_hidden_states)

        refuse_sharded_inside(layer)
        hidden = self.reversible_input(hidden)
        return self.run_reversible(branches, hidden, values, params, layer.training, collector,
                                   reconstruction_observer(layer, hidden))


def _record_hidden_state(collected: list, packed: torch.Tensor) -> None:
    """Hugging Face's output hook recorded the previous converted layer's output, packed streams, as its hidden
    state (`output_hidden_states=True`): put in its place the hidden state those streams merge into, which that
    layer made for it (the layer's output a run ending there would return; in training, an output of its
    reversible Function, so a loss on it reaches backward). An entry the call did not select (None) stays.
    (FSDP2 hands a layer a view of that output, or a cast of it taken back by `_before_cast`: the same slot.)"""
    previous = collected[-1] if collected else None
    if previous is None:
        return
    slot = _tag_of(previous, SLOT)
    if previous is packed or previous is packed._base or (slot is not None and slot is _tag_of(packed, SLOT)):
        collected[-1] = _tag_of(previous, HIDDEN_STATE)


class ReversibleLayer:
    """Mixin placed before a converted layer's own class: its forward runs the layer's LayerRuntime.

    Hugging Face activation checkpointing reads the layer's `gradient_checkpointing` flag: on a converted layer it
    reads False (the layer already rebuilds its activations; checkpointing it too would run it once more per step).
    What is set is kept for the original layer, which `revcompile.undo` restores; setting True warns.
    """

    def forward(self, *args, **kwargs):
        return self._revcompile(self, args, kwargs)

    @property
    def gradient_checkpointing(self) -> bool:
        return False

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        if value:  # a warning per call site (Python's default filter): one per gradient_checkpointing_enable()
            from ..api import CHECKPOINTING_OFF

            warnings.warn(CHECKPOINTING_OFF, stacklevel=2)
        self.__dict__["gradient_checkpointing"] = value


_CLASSES: dict[type, type] = {}


def reversible_class(cls: type) -> type:
    """The (cached) subclass `Reversible<cls>` of a layer class.

    NOTE: its forward is hidden from torch.compile (`torch.compiler.disable`): a converted model wrapped in
    torch.compile (the Trainer's `torch_compile=True`) had its layers' forward branches compiled by Inductor while
    backward recomputed them eagerly, and the two round differently: in bf16 the rebuilt inputs were 1e-3 off and
    the gradients 1 % off, silently. The layers run eagerly there, the rest of the model compiled; the branches of
    `make_reversible(model, compile=True)` are compiled by revcompile itself (one graph for forward and recompute),
    which a disabled frame does not stop.
    """
    if cls not in _CLASSES:
        forward = torch.compiler.disable(ReversibleLayer.forward)
        _CLASSES[cls] = type(f"Reversible{cls.__name__}", (ReversibleLayer, cls),
                             {"__module__": cls.__module__, "forward": forward})
    return _CLASSES[cls]
