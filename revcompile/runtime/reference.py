"""The coupled reference under ordinary autograd, built so that its gradients are summed exactly as the reversible
backward sums them (function.py): the same terms, added in the same order.

NOTE: floating-point addition is commutative but not associative. Autograd adds the gradients a tensor receives
from its uses in the order their producers run; the reversible backward adds them in a fixed order of its own. For
two terms the order cannot matter; for three it does, at the last bit, and under bf16 (weights or autocast) the
next bf16 rounding turns a last-bit difference into a 2^-8 one, which later layers amplify (measured: gradient
errors of 3-4e-3 at 16 layers under autocast from that alone). So every place where the reference would let
autograd add three or more terms is routed through a node that adds them as the reversible path does:
- `open_streams`: a run's input h feeds every stream; its gradient is `Scheme.open_grad` (one Function).
- `linear_step`: the linear part of a step (stream update, mix terms) is one Function whose backward is
  `Step.transpose`, so a stream receives at most two terms: the step's and its branch's.
- `branch_input`: a branch reads a stream through its own node, so the uses inside the branch (an RMSNorm reads
  its input twice) are summed before the stream's other term is added, as the recompute's vjp sums them.
- `branch_autocast`: under autocast a branch runs without autocast's weight cache, so each slice of a sliced branch
  casts the weights itself and their gradients are summed in fp32 (as the recompute, one slice at a time, does),
  not in bf16 on the shared cast.

Example:
    >>> carriers = open_streams(scheme, hidden)
    >>> out = branch(branch_input(carriers["p"]))
    >>> carriers = linear_step(step, carriers, out)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..coupling import Scheme, Step
from .replay import AutocastState


class _OpenStreams(torch.autograd.Function):
    """h -> every stream's opening value; backward is Scheme.open_grad."""

    @staticmethod
    def forward(ctx, scheme: Scheme, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.scheme = scheme
        opened = scheme.open_streams(h)
        return tuple(opened[s].view_as(opened[s]) for s in scheme.streams)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, ctx.scheme.open_grad(dict(zip(ctx.scheme.streams, grads)))


class _LinearStep(torch.autograd.Function):
    """(branch output, every stream) -> every stream after the step; backward is Step.transpose."""

    @staticmethod
    def forward(ctx, step: Step, names: tuple[str, ...], out: torch.Tensor, *streams: torch.Tensor):
        ctx.step, ctx.names, ctx.out_dtype = step, names, out.dtype
        state = dict(zip(names, streams))
        new = step.apply(state, out)
        return tuple(new if s == step.target else state[s].view_as(state[s]) for s in names)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        step, grads = ctx.step, dict(zip(ctx.names, grads))
        g_out = grads[step.target] if step.branch_scale == 1 else step.branch_scale * grads[step.target]
        before = step.transpose(grads)
        return (None, None, g_out.to(ctx.out_dtype), *(before[s] for s in ctx.names))


def _records(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def open_streams(scheme: Scheme, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scheme.open_streams(h), its gradient summed as the reversible backward sums it."""
    if not _records(h):
        return scheme.open_streams(h)
    return dict(zip(scheme.streams, _OpenStreams.apply(scheme, h)))


def linear_step(step: Step, streams: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The streams after `step` given its branch output, gradients summed as the reversible backward sums them."""
    if not _records(out, *streams.values()):
        return {**streams, step.target: step.apply(streams, out)}
    names = tuple(streams)
    return dict(zip(names, _LinearStep.apply(step, names, out, *streams.values())))


def branch_input(stream: torch.Tensor) -> torch.Tensor:
    """The stream as a branch reads it: a node of its own while autograd records (see the module's NOTE)."""
    return stream.view_as(stream) if _records(stream) else stream


def branch_autocast(device: torch.device):
    """The autocast a reference branch runs under: the caller's, without the weight cache (module's NOTE)."""
    state = AutocastState.capture(device)
    return state.restored() if state.enabled else nullcontext()


def straight_through(value: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """`value`'s bits, with the gradient of `expression` alone (its float counterpart)."""
    value = value.detach()
    if not _records(expression):
        return value
    # NOTE: e - e.detach() is exactly zero for finite e, so the result's value is `value` to the bit
    return value + (expression - expression.detach()).to(value.dtype)
