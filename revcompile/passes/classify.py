"""Analysis pass: call each residual branch attention, dense FFN or MoE by what it does on real values.

- attention: it mixes tokens. Perturbing the first position of its input changes its output at later positions.
- MoE:       it routes. A top-k selection runs inside it (a router feeding expert weights).
- FFN:       neither.
Class names are never read, so a plain PyTorch model with its own names is classified the same way.

`splits_by_token` checks, on the same values, that an FFN/MoE branch computed two halves of the sequence at a
time gives its output: only then may the runtime run it (forward and recompute) in slices.

Example:
    >>> classify_branches(layer, trace, chain, branches, call)
    (['attention', 'moe'], [False, True])
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..capture.probe import LayerCall, eval_mode
from ..capture.tracer import LayerTrace, bind_call, unwrapped_forward
from ..runtime.replay import run_recorded, sliced, token_slices
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


def splits_by_token(branch: fx.GraphModule, x: torch.Tensor, context: list) -> bool:
    """Does the branch give the same output when run on slices of the sequence (each slice routing its tokens)?"""
    out = branch(x, *context)
    slices = token_slices(x, 2)
    if slices is None:
        return False
    try:
        pieces = [branch(sliced(x, positions), *context) for positions in slices]
    except Exception:  # a branch that cannot run on a slice (it reads position-shaped context) is not split
        return False
    joined = torch.cat(pieces, dim=-2)
    return joined.shape == out.shape and bool((joined - out).norm() <= 1e-5 * out.norm())


def classify_branches(layer: nn.Module, trace: LayerTrace, chain: list[Residual],
                      branches: list[fx.GraphModule], call: LayerCall) -> tuple[list[str], list[bool]]:
    """(kind of each branch in `chain`, whether it splits by token), from the layer's recorded call (probe values,
    eval mode, no grad)."""
    _, hidden, context = bind_call(unwrapped_forward(layer), layer, call.args, call.kwargs)
    interpreter = fx.Interpreter(fx.GraphModule(layer, trace.graph), garbage_collect_values=False)
    with torch.no_grad(), eval_mode(layer):
        context_values = [context[name] for name in trace.context_names]
        interpreter.run(hidden, *context_values)
        values = {node.name: value for node, value in interpreter.env.items()}
        inputs = [values[r.stream.name] for r in chain]
        return classify_values(branches, inputs, context_values)


def classify_values(branches: list, inputs: list[torch.Tensor], context: list) -> tuple[list[str], list[bool]]:
    """(kind of each branch, whether it splits by token), each branch run on its input and the shared context."""
    kinds = [_branch_kind(branch, x, context) for branch, x in zip(branches, inputs)]
    splits = [kind != ATTENTION and splits_by_token(branch, x, context)
              for kind, branch, x in zip(kinds, branches, inputs)]
    return kinds, splits
