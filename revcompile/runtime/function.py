"""The reversible autograd Function: forward keeps no activations, backward rebuilds them from the output.

One Function call per converted layer, inside the model's own, unmodified layer loop. What stays alive per layer
until backward is small: the RNG state and expert choices of each branch call (`replay.py`) and a `Slot`.

NOTE: why slots. Autograd keeps alive whatever a Function saves, so a layer that saved its output would make
memory O(depth) again. Instead a layer's output is held by a Slot that the *next* converted layer empties when it
consumes the output in forward; in backward that next layer rebuilds its input (this layer's output) with the
inverse and puts it back into the slot, where this layer's backward takes it out again. A layer whose output was
never consumed by a converted layer (the last of a run) keeps its output in the slot, so its backward still
finds it. At any moment at most a couple of slots hold a tensor: memory is flat in depth, and it is measured
(bench/memory.py), not assumed.

NOTE: why step by step. Backward walks the scheme's steps in reverse; for each step it recomputes the step's
branch with grad on the (already exact) stream it reads, uses that output both to undo the step and to
backpropagate, then drops the branch's graph before the next step. So the working set is one branch, not one
layer, and each branch runs forward once more in backward (one extra forward in all, like checkpointing).

NOTE: implicit steps (a branch that reads its own target, as in the fixed_point and revffn schemes). Backward
finds the old value by fixed-point iteration (`coupling.fixed_point`) with the forward's routing replayed, then
recomputes the branch there. Forward already runs that iteration once and compares with the true input: where
it does not converge, the step keeps a copy of its input for backward (the hybrid fallback), so a residual that
cannot be inverted costs memory, never correctness.

NOTE: slices. A branch that acts on each token (FFN, MoE) or on each sequence (attention) alone may run a slice of
the sequence or of the batch at a time (`slicing.py`): its working set is divided by the number of slices. Each
slice records its own routing and RNG state in forward and is recomputed alone. Not done while Hugging Face collects
router logits or attention weights (one tensor per layer).

NOTE: values a layer hands on to the next beside its output (DSA's top-k indices, Zaya's router states; see
plan._hands_on). The branch that makes one puts it into the layer call's sink (`hf_outputs.OtherOutputs`) in
forward; an integer one goes to the next layer as it is, a floating-point one also leaves this Function as an
output, so the next layer's backward (which runs first) hands its gradient back here, where the recompute of
that branch takes it in. Such a branch runs in one piece.

NOTE: streams. `call.streams` holds the run's arithmetic (`streams.py`): float steps, or exact integer streams
whose packed buffer is an integer tensor seen as a float of the same width. Forward and backward only go through
it, so both kinds share this code.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten

from ..coupling import fixed_point, tolerance_bound
from ..errors import RevcompileError
from .compiled import LayerBranch
from .hf_outputs import (GRADIENT_OUTPUTS, ROUTER_LOGITS, other_outputs_into, other_outputs_sink, private_collector,
                         runs_whole)
from .replay import AutocastState, Replay, RoutingReplayer, run_recorded, run_recorded_again, run_replayed
from .slicing import Piece, branch_pieces
from .streams import FloatStreams

if TYPE_CHECKING:
    from .layer import StreamRuntime


TENSOR_LEAF = object()  # marks where a context tensor goes in CouplingCall.context_leaves


class Slot:
    """Holds one inter-layer tensor between the layer that made it and the backward that needs it, and the run's
    stream arithmetic (`streams`), which the next layer of the run continues with."""

    __slots__ = ("tensor", "owned", "streams")

    def __init__(self, tensor: torch.Tensor | None = None):
        self.tensor = tensor
        self.owned = False  # True once it holds a reconstruction that only revcompile can see
        self.streams: FloatStreams | None = None

    def refill(self, tensor: torch.Tensor) -> None:
        self.tensor, self.owned = tensor, True

    def take(self) -> torch.Tensor:
        tensor, self.tensor = self.tensor, None
        if tensor is None:
            raise RevcompileError("a reversible layer's output is gone: backward ran twice through the same graph "
                                  "(retain_graph=True is not supported by reversible layers) or out of order")
        return tensor


@dataclass
class CouplingCall:
    """Everything one layer call hands from its forward to its backward, besides tensors autograd tracks."""

    runtime: "StreamRuntime"
    branches: dict[str, torch.nn.Module]
    context_leaves: list[Any]  # pytree leaves of the context; tensors are TENSOR_LEAF (they are Function inputs)
    context_spec: TreeSpec
    params: list[torch.nn.Parameter]
    in_slot: Slot | None
    out_slot: Slot | None
    training: bool
    autocast: AutocastState
    streams: FloatStreams  # the run's arithmetic: float steps or exact integer streams
    observe: Callable[[FloatStreams, torch.Tensor], None] | None = None  # check(): sees the rebuilt input
    # Hugging Face's lists collecting outputs with gradient from inside the branches in this model call (router
    # logits, attention weights: hf_outputs.GRADIENT_OUTPUTS), by key; and how many each step's branch added to them
    collected: dict[str, list] | None = None
    collected_counts: list[int] | None = None
    # (position in the layer's output, step) of each floating-point value the layer hands on to the next layer
    carried: list[tuple[int, int]] | None = None
    hands_hidden_state: bool = False  # also return the hidden state the output streams merge into (hf_outputs.py)
    replays: list[list[tuple[Piece | None, Replay]]] | None = None  # per step: (piece, replay) per slice
    stored: list[torch.Tensor | None] | None = None  # per step: its input, kept where fixed-point inversion failed

    def context(self, tensors: tuple[torch.Tensor, ...]) -> list[Any]:
        it = iter(tensors)
        leaves = [next(it) if leaf is TENSOR_LEAF else leaf for leaf in self.context_leaves]
        return tree_unflatten(leaves, self.context_spec)


class _GradSum:
    """Lists of optional gradients summed elementwise (None is zero) into `grads`.

    NOTE: a gradient autograd returns may alias another tensor (a parameter added as is gets the incoming gradient
    itself), so a term is never written to; a sum made here is, and later terms are added to it in place: one large
    allocation per parameter, not one per recompute slice (a MoE's expert weights are the layer's largest tensors).
    """

    def __init__(self, n: int):
        self.grads: list[torch.Tensor | None] = [None] * n
        self._owned = [False] * n

    def add(self, more: list) -> None:
        for i, term in enumerate(more):
            if term is None:
                continue
            total = self.grads[i]
            if total is None:
                self.grads[i] = term
            elif self._owned[i]:
                total.add_(term)
            else:
                self.grads[i], self._owned[i] = total + term, True


def _branch_vjp(call: CouplingCall, step, replay: Replay, reads: list[torch.Tensor], context: list, wrt: list,
                g_out: torch.Tensor, collected_grads: tuple = (), piece: Piece | None = None,
                carried_grads: list[tuple[int, torch.Tensor]] = ()):
    """Recompute one branch (on `piece` of its reads and context, if given) with grad on the streams it reads and
    backpropagate `g_out` (and those of the outputs Hugging Face collected from it, and of the values it hands on:
    (position, gradient)).

    Returns (branch output, gradients of reads, gradients of `wrt`); the branch's graph is gone on return. A compiled
    branch on float streams does it in one compiled call where it can (`_one_call`), else: a recompute with grad,
    then `autograd.grad`.
    """
    branch = call.branches[step.branch]
    if _one_call(call, branch, wrt, piece, collected_grads, carried_grads):
        with call.autocast.restored(), private_collector(*GRADIENT_OUTPUTS), other_outputs_into({}), \
                (replay.rng.restored() if replay.rng else nullcontext()):
            fused = branch.vjp([read.detach() for read in reads], context, g_out,
                               RoutingReplayer(replay.routing) if replay.routing else None)
        if fused is not None:
            out, g_reads, by_param = fused
            return out, g_reads, [by_param.get(p) for p in wrt]
    reads = [read.detach().requires_grad_(True) for read in reads]
    with torch.enable_grad(), call.autocast.restored(), private_collector(*GRADIENT_OUTPUTS) as recorded, \
            other_outputs_into({}) as remade:
        if piece is not None:  # sliced here, with grad: a context tensor that requires grad gets its gradient
            context = piece.context(context)
        if _one_graph(call):
            out, differs = run_recorded_again(call.branches[step.branch], (*reads, *context), replay)
            call.streams.flag_choices(differs)
        else:
            out = run_replayed(call.branches[step.branch], (*reads, *context), replay)
    # NOTE: in the output's dtype, as autograd hands it to the branch in the reference: under autocast a bf16 branch
    # output added to an fp32 stream gets its gradient rounded to bf16, and a finer one here would differ from it
    outputs, grad_outputs = [out], [g_out.to(out.dtype)]
    if collected_grads:
        again = [value for key in call.collected for value in recorded[key]]  # (in the forward's order)
        if len(again) != len(collected_grads):
            raise RevcompileError("the recompute recorded other router logits or attention weights than the forward")
        outputs += again
        grad_outputs += collected_grads
    outputs += [remade[position] for position, _ in carried_grads]
    grad_outputs += [grad for _, grad in carried_grads]
    grads = torch.autograd.grad(outputs, [*reads, *wrt], grad_outputs, allow_unused=True)
    return out.detach(), list(grads[:len(reads)]), list(grads[len(reads):])


def _one_call(call: CouplingCall, branch, wrt: list, piece: Piece | None, collected_grads: tuple,
              carried_grads: list) -> bool:
    """May a branch's recompute and backward run as one compiled call (`LayerBranch.vjp`)?

    NOTE: on float streams only: exact streams need the recompute to return the forward's very bits (`_one_graph`),
    and a graph that also computes the backward is another graph than the forward's. Not for slices, gradients that
    come from outside the branch's output (collected router logits, values handed on) or context tensors that need
    gradients: those take `autograd.grad` as before.
    """
    return (call.runtime.one_call_recompute and isinstance(branch, LayerBranch) and not call.streams.exact
            and piece is None and not collected_grads and not carried_grads and len(wrt) == len(call.params))


def _solve(call: CouplingCall, step, after: dict[str, torch.Tensor], context: list, replay: Replay):
    """Invert an implicit step by fixed-point iteration, the branch replaying the forward's routing and RNG."""
    branch = call.branches[step.branch]
    scheme = call.runtime.scheme
    # the iterations' router logits and attention weights go to a private collector: Hugging Face's outputs must not
    # see them (nor the layer's output its other outputs)
    with torch.no_grad(), call.autocast.restored(), private_collector(ROUTER_LOGITS), other_outputs_into(None):
        return fixed_point(step, after, lambda state: run_replayed(branch, (*(state[s] for s in step.reads),
                                                                            *context), replay),
                           scheme.tol, scheme.max_iters, scheme.anderson)


def _check_inversion(call: CouplingCall, step, before: dict[str, torch.Tensor], new: torch.Tensor, context: list,
                     replay: Replay) -> torch.Tensor | None:
    """Forward's test of an implicit step: None when fixed-point iteration rebuilds its input from `new` (backward
    will do the same), else a copy of the input for backward to use instead (the hybrid fallback)."""
    result = _solve(call, step, {**before, step.target: new}, context, replay)
    error = float((result.value - before[step.target]).abs().max())
    # NOTE: the iteration stops when a step moves it by at most the bound; the distance to the true fixed point
    # is that step divided by (1 - Lipschitz constant), so the error is judged ten times more loosely.
    ok = result.converged and error <= 10 * tolerance_bound(new, call.runtime.scheme.tol)
    call.runtime.inversions.record(result.iterations, ok)
    return None if ok else before[step.target].detach().clone()


def step_pieces(runtime: "StreamRuntime", step, branch: torch.nn.Module, read: torch.Tensor, context: list,
                collecting_outputs: bool) -> list[Piece] | None:
    """The pieces a step's branch runs in (forward, recompute and the coupled reference alike), or None for one
    piece: not for implicit steps, nor for a branch making other outputs of the layer, nor while Hugging Face collects
    outputs from inside the branches (`collecting_outputs`: router logits, attention weights)."""
    if step.implicit or collecting_outputs or runs_whole(branch):
        return None
    return branch_pieces(runtime.splits.get(step.branch), read, context, runtime.layouts)


def _one_graph(call: CouplingCall) -> bool:
    """Do forward and recompute run a branch through one and the same compiled graph?

    NOTE: Inductor compiles a branch's no-grad graph apart from its with-grad graph, and the routing replayer makes
    Dynamo trace yet another: graphs that may round differently (bf16: gpt_oss's no-grad and with-grad graphs,
    qwen2_moe's recording and replaying ones), while exact streams need the recompute to return the forward's bits.
    With exact streams the recompute gets the forward's very input, so it can record (and check) instead of
    replaying, and the forward can run the with-grad graph: one graph for both.
    """
    return call.runtime.compiled_branches and call.streams.exact


def _run_forward_branch(call: CouplingCall, branch, reads: list[torch.Tensor], context: list):
    """One forward call of a branch, recording its routing and RNG: (output, replay). With `_one_graph`, through
    the with-grad graph the recompute runs (reads requiring grad as there; what it saves is freed with its output,
    inside this call)."""
    if not _one_graph(call):
        scopes = None if call.runtime.compiled_branches else call.runtime.selection_scopes
        return run_recorded(branch, (*reads, *context), rng=call.training, scopes=scopes, training=call.training)
    reads = [read.detach().requires_grad_(True) for read in reads]
    with torch.enable_grad():
        out, replay = run_recorded(branch, (*reads, *context), rng=call.training)
    return out.detach(), replay


def _forward_branch(call: CouplingCall, step, reads: list[torch.Tensor], context: list):
    """Run a step's branch in forward, recording each piece's routing and RNG: (output, [(piece, replay)])."""
    branch = call.branches[step.branch]
    pieces = step_pieces(call.runtime, step, branch, reads[0], context, call.collected is not None)
    if pieces is None:
        out, replay = _run_forward_branch(call, branch, reads, context)
        return out, [(None, replay)]
    outs, parts = [], []
    for piece in pieces:
        out, replay = _run_forward_branch(call, branch, [piece.take(read) for read in reads], piece.context(context))
        outs.append(out)
        parts.append((piece, replay))
    return pieces[0].join(outs), parts


class ReversibleCoupling(torch.autograd.Function):
    """apply(call, x, *context_tensors, *params) -> the layer's output (packed streams, or h after a merge)."""

    @staticmethod
    def forward(ctx, call: CouplingCall, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        rt, arithmetic = call.runtime, call.streams
        n_context = len(tensors) - len(call.params)
        context = call.context(tensors[:n_context])
        streams = arithmetic.open(x) if rt.is_first else arithmetic.unpack(x)
        call.replays, call.collected_counts, call.stored, collected = [], [], [], []
        sink, carried_by = other_outputs_sink(), {}
        for k, step in enumerate(rt.scheme.steps):
            before = {key: len(values) for key, values in (call.collected or {}).items()}
            reads = [arithmetic.view(streams, s) for s in step.reads]
            with other_outputs_into({}) as made:
                out, parts = _forward_branch(call, step, reads, context)
            if sink is not None:  # (detached: `_one_graph` runs the forward with grad)
                sink.update((p, v.detach() if isinstance(v, torch.Tensor) else v) for p, v in made.items())
                carried_by.update((p, k) for p, value in made.items()
                                  if isinstance(value, torch.Tensor) and value.is_floating_point())
            new = arithmetic.apply(step, streams, out)
            call.stored.append(_check_inversion(call, step, streams, new, context, parts[0][1]) if step.implicit
                               else None)
            streams[step.target] = new
            call.replays.append(parts)
            if call.collected is not None:
                added = [value for key, values in call.collected.items() for value in values[before[key]:]]
                collected.extend(added)
                call.collected_counts.append(len(added))
        streams = rt.scheme.permute(streams)
        ctx.call = call
        packed = arithmetic.pack(streams)
        if rt.is_last:
            ctx.save_for_backward(packed, *tensors[:n_context])
            output = arithmetic.merge(streams)
            if arithmetic.exact:
                arithmetic.fmt.raise_if_overflowed()
        else:
            ctx.save_for_backward(*tensors[:n_context])
            call.out_slot.tensor, call.out_slot.streams = packed.detach(), arithmetic
            output = packed
        # returning the recorded router logits (attention weights) makes these very tensors (held by Hugging Face's
        # lists) outputs of this Function: the load-balancing loss's gradient reaches backward through them; so for
        # floating-point values handed on to the next layer (whose backward, run first, gives them their gradient)
        call.carried = sorted(carried_by.items())
        more = [*collected, *(sink[p] for p, _ in call.carried)]
        if call.hands_hidden_state:
            more.append(arithmetic.merge(streams))
        return (output, *more) if more else output

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *grad_more: torch.Tensor):
        call: CouplingCall = ctx.call
        if call.replays is None:
            raise RevcompileError("backward ran twice through a reversible layer; retain_graph=True is not supported")
        rt, scheme, arithmetic = call.runtime, call.runtime.scheme, call.streams
        n_collected = sum(call.collected_counts or ())
        grad_collected = grad_more[:n_collected]
        grad_carried = grad_more[n_collected:n_collected + len(call.carried)]
        saved = ctx.saved_tensors
        # NOTE: the streams live in one packed buffer, undone in place and handed on to the previous layer, so
        # the peak (a branch recompute) sees one packed buffer of streams and the incoming gradient, nothing more.
        # The buffer is only written in place when nobody else can see it: our own saved tensor, or a
        # reconstruction the next layer's backward made.
        if rt.is_last:
            packed, context_tensors = saved[0], saved[1:]
            grads = scheme.merge_grad(grad_out)
        else:
            packed, context_tensors = call.out_slot.take(), saved
            if not call.out_slot.owned:
                packed = packed.clone()  # the forward's own output: others (hooks, hidden states) may hold it
            grads = arithmetic.unpack_grad(grad_out)
            if call.hands_hidden_state:  # the gradient of the hidden state the streams merge into, last of grad_more
                merged = scheme.merge_grad(grad_more[-1])
                grads = {stream: g + merged[stream] for stream, g in grads.items()}
        streams, grads = scheme.unpermute(arithmetic.unpack(packed)), scheme.unpermute(grads)
        context_inputs = [t.detach().requires_grad_(t.requires_grad) for t in context_tensors]
        context = call.context(tuple(context_inputs))
        wrt = [t for t in context_inputs if t.requires_grad] + call.params
        accumulated = _GradSum(len(wrt))

        collected_ends = list(itertools.accumulate(call.collected_counts or [0] * len(scheme.steps)))
        for k in reversed(range(len(scheme.steps))):
            step, parts = scheme.steps[k], call.replays[k]
            if step.implicit:  # the old value first (stored in forward if it did not converge there), then the vjp
                old = call.stored[k] if call.stored[k] is not None else _solve(call, step, streams, context,
                                                                               parts[0][1]).value
                streams[step.target].copy_(old)
                del old
            g_out = grads[step.target] if step.branch_scale == 1 else step.branch_scale * grads[step.target]
            collected_grads = grad_collected[collected_ends[k] - call.collected_counts[k]:collected_ends[k]] \
                if grad_collected and call.collected_counts[k] else ()
            reads = [arithmetic.view(streams, s) for s in step.reads]
            grads = step.transpose(grads)  # (g_out is taken: the branch's own terms are added below)
            if len(parts) == 1:
                carried_grads = [(p, g) for (p, made_in), g in zip(call.carried, grad_carried) if made_in == k]
                out, g_reads, g_wrt = _branch_vjp(call, step, parts[0][1], reads, context, wrt, g_out, collected_grads,
                                                  carried_grads=carried_grads)
                if not step.implicit:
                    # only now (all grads taken): the reads are views of the same buffer, and autograd checks versions
                    streams[step.target].copy_(arithmetic.undo(step, streams, out))
                for stream, g_read in zip(step.reads, g_reads):
                    if g_read is not None:
                        grads[stream] = grads[stream] + g_read
                del out, g_reads
            else:  # a branch recomputed in the forward's slices: its working set shrinks
                # NOTE: slice by slice, with no stream-sized buffer for the branch's output or its input gradients:
                # each slice's input gradients are added into one copy of each read stream's gradient, and its
                # step is undone on its rows once its graph is gone (no saved tensor sees the buffer any more).
                # Every element still gets one addition, so the sums are the whole-branch ones, bit for bit.
                sums, chunk_sum = {stream: grads[stream].clone() for stream in step.reads}, _GradSum(len(wrt))
                undo_reads = (step.target, *(source for source, _ in step.mix))  # what undoing the step reads
                # NOTE: last slice first, the order in which autograd runs the slices' backward in the reference:
                # a parameter's gradient is the sum of the slices' terms, and fp32 sums of 3+ terms depend on it
                for piece, replay in reversed(parts):
                    o, g, w = _branch_vjp(call, step, replay, [piece.take(read) for read in reads], context,
                                          wrt, piece.take(g_out), piece=piece)
                    for stream, part in zip(step.reads, g):
                        if part is not None:
                            piece.add(sums[stream], part)
                    if not step.implicit:
                        piece.put(streams[step.target],
                                  arithmetic.undo(step, {name: piece.take(streams[name]) for name in undo_reads}, o))
                    chunk_sum.add(w)
                    del o, g, w
                grads.update(sums)
                g_wrt = chunk_sum.grads
            accumulated.add(g_wrt)
            del reads, g_wrt
        call.replays = call.stored = None
        # a permuting scheme leaves the rebuilt streams out of order in the buffer: the previous layer gets a copy
        rebuilt = packed if scheme.output_order is None else arithmetic.pack(streams)
        if call.observe is not None:
            call.observe(arithmetic, arithmetic.unopen(streams) if rt.is_first else rebuilt)

        if rt.is_first:
            if arithmetic.exact:
                arithmetic.raise_if_choices_differed()  # (once per run: one host synchronisation)
            grad_x = scheme.open_grad(grads)
        else:
            grad_x = arithmetic.pack_grad(grads)
            if call.in_slot is not None:
                call.in_slot.refill(rebuilt)
        by_input = iter(accumulated.grads)
        context_grads = [next(by_input) if t.requires_grad else None for t in context_inputs]
        return (None, grad_x, *context_grads, *by_input)
