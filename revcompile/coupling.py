"""The coupling step algebra (DESIGN.md, "Coupling algebra"): schemes are data, graphs are generated.

A step updates one stream of the state from the others::

    x[t] <- a * x[t] + sum_s c_s * x[s] + b * Branch(x[u])      a != 0, s, u != t
    undo:  x[t] <- (x[t] - sum_s c_s * x[s] - b * Branch(x[u])) / a

`Step.apply` and `Step.undo` are plain arithmetic, so the same code runs on tensors (the runtime) and on
torch.fx proxies (the generated forward and inverse graphs in `passes/rewrite.py`): there is one source of
truth for every scheme and no hand-written inverse.

Example:
    >>> step = Step(target="q", reads="p", branch="attn")
    >>> x = {"q": 1.0, "p": 2.0}
    >>> step.undo({"q": step.apply(x, 10.0), "p": 2.0}, 10.0)
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import RevcompileError


@dataclass(frozen=True)
class Step:
    """`x[target] <- scale * x[target] + sum(c * x[s] for s, c in mix) + branch_scale * branch(x[reads])`."""

    target: str
    reads: str
    branch: str
    scale: float = 1.0
    mix: tuple[tuple[str, float], ...] = ()
    branch_scale: float = 1.0

    def __post_init__(self):
        if self.scale == 0:
            raise RevcompileError(f"step on {self.target!r}: scale must be non-zero, or the step cannot be undone")
        sources = {self.reads, *(s for s, _ in self.mix)}
        if self.target in sources:
            raise RevcompileError(f"step on {self.target!r} reads its own target; an explicit step must read other "
                                  "streams only")

    def apply(self, x: Mapping[str, Any], branch_out: Any) -> Any:
        """The new value of x[target], given the branch output on x[reads]."""
        new = x[self.target] if self.scale == 1 else self.scale * x[self.target]
        for source, coeff in self.mix:
            new = new + coeff * x[source]
        return new + (branch_out if self.branch_scale == 1 else self.branch_scale * branch_out)

    def undo(self, x: Mapping[str, Any], branch_out: Any) -> Any:
        """The old value of x[target], given the updated state and the same branch output."""
        old = x[self.target] - (branch_out if self.branch_scale == 1 else self.branch_scale * branch_out)
        for source, coeff in self.mix:
            old = old - coeff * x[source]
        return old if self.scale == 1 else old / self.scale

    def transpose(self, grads: dict[str, Any]) -> dict[str, Any]:
        """Vector-Jacobian product of the step's linear part: grads after the step -> grads before it.

        The branch's own contribution (to x[reads] and to parameters) is added by the caller.
        """
        g_target = grads[self.target]
        before = dict(grads)
        before[self.target] = g_target if self.scale == 1 else self.scale * g_target
        for source, coeff in self.mix:
            before[source] = before[source] + coeff * g_target
        return before


@dataclass(frozen=True)
class Scheme:
    """A reversible coupling of a layer's residual branches, as data.

    streams: names of the state's streams (all of the hidden width).
    open:    how the first converted layer of a run makes the streams from the hidden state h: stream -> coefficient.
    steps:   the coupling steps, in forward order; branch names are the pair's roles, "attn" and "mlp".
    merge:   how the last converted layer of a run folds the streams back into h: stream -> coefficient.
    """

    name: str
    streams: tuple[str, ...]
    open: Mapping[str, float]
    steps: tuple[Step, ...]
    merge: Mapping[str, float]
    description: str = ""
    branches: tuple[str, ...] = field(default=("attn", "mlp"))

    def __post_init__(self):
        names = set(self.streams)
        if set(self.open) != names:
            raise RevcompileError(f"scheme {self.name!r}: open must give every stream a coefficient")
        if not any(self.open.values()):
            raise RevcompileError(f"scheme {self.name!r}: open must keep h in at least one stream")
        for step in self.steps:
            used = {step.target, step.reads, *(s for s, _ in step.mix)}
            if not used <= names or step.branch not in self.branches:
                raise RevcompileError(f"scheme {self.name!r}: step {step} names an unknown stream or branch")

    def open_streams(self, h: Any) -> dict[str, Any]:
        return {s: h if c == 1 else c * h for s, c in self.open.items()}

    def open_grad(self, grads: Mapping[str, Any]) -> Any:
        """Gradient of h given the gradients of the streams `open_streams` made."""
        total = None
        for s, c in self.open.items():
            if c:
                term = grads[s] if c == 1 else c * grads[s]
                total = term if total is None else total + term
        return total

    def unopen(self, x: Mapping[str, Any]) -> Any:
        """h back from freshly opened streams (the inverse of `open_streams`)."""
        stream, coeff = next((s, c) for s, c in self.open.items() if c)
        return x[stream] if coeff == 1 else x[stream] / coeff

    def merge_streams(self, x: Mapping[str, Any]) -> Any:
        total = None
        for s, c in self.merge.items():
            term = x[s] if c == 1 else c * x[s]
            total = term if total is None else total + term
        return total

    def merge_grad(self, g: Any) -> dict[str, Any]:
        return {s: (g if self.merge.get(s, 0) == 1 else self.merge.get(s, 0) * g) for s in self.streams}
