"""Analysis pass: call each residual branch attention, dense FFN or MoE by what it does on real values.

- attention: it mixes tokens. Perturbing the first position of its input changes its output at later positions.
- MoE:       it routes. A top-k selection runs inside it (a router feeding expert weights).
- FFN:       neither.
Class names are never read, so a plain PyTorch model with its own names is classified the same way.

`splits_by_token` checks, on the same values, that an FFN/MoE branch computed two halves of the sequence at a
time gives its output, and `splits_by_sequence` that a branch computed on two halves of a batch (each with its rows
of the batch-carrying context) gives its output: only then may the runtime run it (forward and recompute) in slices
of the sequence or of the batch (runtime/slicing.py).

Example:
    >>> classify_branches(layer, trace, chain, branches, call)
    Classified(kinds=['attention', 'moe'], by_token=[False, True], by_sequence=[True, True], batch_context=...)
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture.probe import LayerCall, eval_mode
from ..capture.tracer import LayerTrace, bind_call, unwrapped_forward
from ..runtime.replay import run_recorded
from ..runtime.slicing import TOKEN, BatchContext, Piece, Split, branch_pieces
from .residuals import Residual

ATTENTION, FFN, MOE = "attention", "ffn", "moe"


def _branch_kind(branch: fx.GraphModule, x: torch.Tensor, context: list) -> str:
    out, replay = run_recorded(branch, (x, *context), rng=False)
    if x.dim() >= 2 and x.shape[-2] > 1:
        perturbed = x.clone()
        perturbed[..., 0, :] += 1.0 + perturbed[..., 0, :].abs()
        out_perturbed = branch(perturbed, *context)
        # NOTE: a tolerance, not equality: expert kernels may sum a token's outputs in another order when the
        # perturbed token changes which tokens an expert sees; token mixing moves the output far more.
        later, later_perturbed = out[..., 1:, :], out_perturbed[..., 1:, :]
        if (later - later_perturbed).norm() > 1e-3 * later.norm():
            return ATTENTION
    return MOE if replay.routing else FFN


def _same(pieces: list[torch.Tensor], whole: torch.Tensor, dim: int) -> bool:
    joined = torch.cat(pieces, dim=dim)
    return joined.shape == whole.shape and bool((joined - whole).norm() <= 1e-5 * whole.norm())


@contextlib.contextmanager
def _unprinted_failures():
    """Around a branch call that may fail as an answer (a branch that cannot run on a slice): what it writes to
    stderr is kept back, and dropped if it fails.

    NOTE: a GraphModule's __call__ prints the generated code's traceback to stderr before re-raising; an expected
    failure here is not an error to show the user (it printed screens of fx code under torch.compile)."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())  # the call succeeded: its warnings, if any, are the user's


def splits_by_token(branch: fx.GraphModule, x: torch.Tensor, context: list) -> bool:
    """Does the branch give the same output when run on slices of the sequence (each slice routing its tokens)?"""
    out = branch(x, *context)
    pieces = branch_pieces(Split(TOKEN, 2), x, context, None)
    if pieces is None:
        return False
    try:
        with _unprinted_failures():
            parts = [branch(piece.take(x), *context) for piece in pieces]
    except Exception:  # a branch that cannot run on a slice (it reads position-shaped context) is not split
        return False
    return _same(parts, out, -2)


def splits_by_sequence(branch: fx.GraphModule, x: torch.Tensor, context: list, batch: BatchContext) -> bool:
    """Does the branch give the same output when run on two halves of a batch, each with its rows of the context's
    batch-carrying leaves? A batch of one is doubled first (a second, different sequence; the batch-carrying leaves
    repeated), so the check also covers context that carries the batch."""
    if x.dim() < 3:
        return False
    if x.shape[0] == 1:
        x = torch.cat([x, x.roll(1, dims=-2)])
        leaves, spec = tree_flatten(context)
        context = tree_unflatten([torch.cat([leaf, leaf]) if batched else leaf
                                  for leaf, batched in zip(leaves, batch.batched)], spec)
    halves = [Piece(0, slice(0, 1), batch.batched), Piece(0, slice(1, x.shape[0]), batch.batched)]
    try:
        with _unprinted_failures():
            out = branch(x, *context)
            parts = [branch(piece.take(x), *piece.context(context)) for piece in halves]
    except Exception:  # a branch that cannot run on part of a batch is not split
        return False
    return _same(parts, out, 0)


@dataclass
class Classified:
    """What classification found per branch: its kind, whether it splits by token and by sequence; and the layout
    of the context with its batch-carrying leaves."""

    kinds: list[str]
    by_token: list[bool]
    by_sequence: list[bool]
    batch_context: BatchContext


def classify_branches(layer: nn.Module, trace: LayerTrace, chain: list[Residual],
                      branches: list[fx.GraphModule], call: LayerCall) -> Classified:
    """Classify each branch in `chain` from the layer's recorded call (probe values, eval mode, no grad)."""
    _, hidden, context = bind_call(unwrapped_forward(layer), layer, call.args, call.kwargs)
    interpreter = fx.Interpreter(fx.GraphModule(layer, trace.graph), garbage_collect_values=False)
    with torch.no_grad(), eval_mode(layer):
        context_values = [context[name] for name in trace.context_names]
        interpreter.run(hidden, *context_values)
        values = {node.name: value for node, value in interpreter.env.items()}
        inputs = [values[r.stream.name] for r in chain]
        return classify_values(branches, inputs, context_values)


def classify_whole(layer: nn.Module, trace: LayerTrace, branch: fx.GraphModule, call: LayerCall) -> Classified:
    """A layer converted whole: one branch, "layer", that may split by sequence (never by token: it mixes them)."""
    _, hidden, context = bind_call(unwrapped_forward(layer), layer, call.args, call.kwargs)
    with torch.no_grad(), eval_mode(layer):
        context_values = [context[name] for name in trace.context_names]
        branch(hidden, *context_values)  # a graph that fails on the call's values raises here, not in training
        batch = BatchContext.of(context_values, hidden.shape[0] if hidden.dim() else 0)
        return Classified(["layer"], [False], [splits_by_sequence(branch, hidden, context_values, batch)], batch)


def classify_values(branches: list, inputs: list[torch.Tensor], context: list) -> Classified:
    """Classify each branch, run on its input and the shared context."""
    batch = BatchContext.of(context, inputs[0].shape[0] if inputs and inputs[0].dim() else 0)
    kinds = [_branch_kind(branch, x, context) for branch, x in zip(branches, inputs)]
    by_token = [kind != ATTENTION and splits_by_token(branch, x, context)
                for kind, branch, x in zip(kinds, branches, inputs)]
    by_sequence = [splits_by_sequence(branch, x, context, batch) for branch, x in zip(branches, inputs)]
    return Classified(kinds, by_token, by_sequence, batch)
