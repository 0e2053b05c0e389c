"""Branches that schemes build from a layer's own (attention and FFN/MoE, or the whole layer), plus the small
modules they add.

Every branch is called as `branch(*streams_it_reads, *context)` and returns the update it adds. Every layer form
offers the role "layer", the whole layer's update f(x) = layer(x) - x: composed from the pair for a sequential or
parallel layer, cut out of the layer graph for a whole layer (`passes/extract.py`).

Example:
    >>> branches = scheme_branches(get_scheme("midpoint"), "sequential", {"attn": attn, "mlp": mlp}, {})
    >>> branches["layer"](x, *context) + x          # == the original layer(x)
"""

from __future__ import annotations

import torch
from torch import nn

from ..coupling import Scheme
from ..passes.residuals import FORM_ROLES, PARALLEL, WHOLE


class LayerUpdate(nn.Module):
    """The whole pre-norm layer's residual update f(x) = a + M(x + a), a = A(x), as one branch."""

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x, *context):
        a = self.attn(x, *context)
        return a + self.mlp(x + a, *context)


class ParallelUpdate(nn.Module):
    """A parallel layer's residual update f(x) = A(x) + M(x), as one branch."""

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x, *context):
        return self.attn(x, *context) + self.mlp(x, *context)


def scheme_branches(scheme: Scheme, form: str, roles: dict[str, nn.Module], extra: dict) -> dict[str, nn.Module]:
    """The branches `scheme`'s steps call, built from a layer's roles (FORM_ROLES[form]) and the modules the scheme
    added to it (`extra`)."""
    if form != WHOLE:
        roles = {**roles, "layer": (ParallelUpdate if form == PARALLEL else LayerUpdate)(roles["attn"], roles["mlp"])}
    return scheme.compose(roles, extra) if scheme.compose else {name: roles[name] for name in scheme.branches}


def scheme_fits(scheme: Scheme, form: str) -> bool:
    """Can `scheme` convert a layer of this form (are the roles its branches are made of there)?"""
    roles = set(FORM_ROLES[form]) | ({"layer"} if form != WHOLE else set())
    return {role for used in scheme.branch_roles.values() for role in used} <= roles


class Adapter(nn.Module):
    """Linear(d, r) -> activation -> Linear(r, d), the up projection zero-initialised: it adds 0 until trained."""

    def __init__(self, hidden: int, rank: int, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[activation]
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


class WithAdapter(nn.Module):
    """inner(x, *context) + adapter(x): a pretrained branch with a parallel adapter (MEFT)."""

    def __init__(self, inner: nn.Module, adapter: nn.Module):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x, *context):
        return self.inner(x, *context) + self.adapter(x)


class AdapterBranch(nn.Module):
    """An adapter alone as a branch (it ignores the layer's context)."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, x, *context):
        return self.adapter(x)


class HalfWidthAttention(nn.Module):
    """RevFFN's cross-branch attention on half-width streams: P_out(A([x1, x2])), A the pretrained attention."""

    def __init__(self, attn: nn.Module, p_out: nn.Module):
        super().__init__()
        self.attn, self.p_out = attn, p_out

    def forward(self, x1, x2, *context):
        return self.p_out(self.attn(torch.cat([x1, x2], dim=-1), *context))


class HalfWidthExperts(nn.Module):
    """RevFFN's experts on a half-width stream: P_out(M(P_in(y1))), M the pretrained FFN/MoE."""

    def __init__(self, mlp: nn.Module, p_in: nn.Module, p_out: nn.Module):
        super().__init__()
        self.mlp, self.p_in, self.p_out = mlp, p_in, p_out

    def forward(self, y1, *context):
        return self.p_out(self.mlp(self.p_in(y1), *context))
