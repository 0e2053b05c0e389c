"""RevFFN (2025): reversible MoE layers on feature halves, with light projections around the pretrained blocks.

    [x1, x2] = h split along features
    y1 = x1 + P_out_a(A([x1, x2]))          implicit: A reads x1, so x1 is inverted by fixed-point iteration
    y2 = x2 + P_out_m(M(P_in_m(y1)))        explicit: exact inverse
    h' = [y1, y2]

Where the public description left us to choose (the reference code is not public), and what we chose:
- Cross-branch attention (queries from x1, keys/values from x2) would mean editing each family's attention
  module. The pretrained attention is an opaque leaf to us, so it reads both halves, concatenated: the full-width
  hidden state. It still reads x1, hence the fixed-point inversion of x1 that the paper describes.
- P_in / P_out are bias-free Linear layers: P_out_a (d -> d/2) starts as "take the first half", P_out_m as "take
  the second half", P_in_m (d/2 -> d) as "repeat the half twice". At initialisation y1 is therefore exactly the
  original first half after attention; y2 is not the original (the experts read [y1, y1], not h + A(h)), so this
  scheme needs `revcompile.distill` after conversion. They add 1.5 d^2 parameters per layer.
- A layer whose fixed point does not converge within max_iters keeps its x1 (see fixed_point.py).
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..coupling import Scheme, Step
from .branches import HalfWidthAttention, HalfWidthExperts
from .config import SchemeConfig, check_solver


def _projection(weight: torch.Tensor) -> nn.Linear:
    """A bias-free Linear starting at the 0/1 matrix `weight` (out x in)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@dataclass(frozen=True)
class RevFFNConfig(SchemeConfig):
    """tol, max_iters, anderson: the fixed-point inversion of x1 (tol None: a default by dtype,
    coupling.DEFAULT_TOLERANCE; anderson: the iterates Anderson mixing combines, 0 for the plain iteration)."""

    name = "revffn"
    tol: float | None = None
    max_iters: int = 50
    anderson: int = 0

    def __post_init__(self):
        check_solver(self)

    def new_modules(self, hidden: int) -> dict:
        self.require(hidden % 2 == 0, f"the hidden size must be even to split it in halves, got {hidden}")
        half, eye = hidden // 2, torch.eye(hidden)
        return {"p_out_attn": _projection(eye[:half]),  # take the first half
                "p_in_mlp": _projection(torch.eye(half).repeat(2, 1)),  # repeat the half twice
                "p_out_mlp": _projection(eye[half:])}  # take the second half

    def scheme(self) -> Scheme:
        return Scheme(
            name=self.name, streams=("x1", "x2"), open=None, merge=None,
            steps=(Step("x1", ("x1", "x2"), "attn"), Step("x2", "x1", "mlp")),
            branch_roles={"attn": ("attn",), "mlp": ("mlp",)},
            compose=lambda roles, extra: {
                "attn": HalfWidthAttention(roles["attn"], extra["p_out_attn"]),
                "mlp": HalfWidthExperts(roles["mlp"], extra["p_in_mlp"], extra["p_out_mlp"])},
            new_modules=self.new_modules, tol=self.tol, max_iters=self.max_iters, anderson=self.anderson,
            description="y1 = x1 + P(A([x1, x2])) (fixed point); y2 = x2 + P(M(P(y1)))")
