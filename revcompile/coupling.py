"""The coupling step algebra (DESIGN.md, "Coupling algebra"): schemes are data, graphs are generated.

A step updates one stream of the state from the others::

    x[t] <- a * x[t] + sum_s c_s * x[s] + b * Branch(x[u], ...)      a != 0, s != t
    undo:  x[t] <- (x[t] - sum_s c_s * x[s] - b * Branch(x[u], ...)) / a

When the branch reads only other streams (u != t) the step is *explicit* and `undo` is exact. When it reads its own
target the step is *implicit*: `undo` needs the branch output at the old value, which is what we are looking for,
so the old value is the fixed point of `x <- undo(x, Branch(x))` (`fixed_point`), found to a tolerance.

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
from typing import Any, Callable, Iterable, Mapping

import torch

from .errors import RevcompileError


@dataclass(frozen=True)
class Step:
    """`x[target] <- scale * x[target] + sum(c * x[s] for s, c in mix) + branch_scale * branch(*x[reads])`.

    reads: the stream (or streams, passed to the branch in order) the branch reads; reading `target` makes the
    step implicit.
    """

    target: str
    reads: str | tuple[str, ...]
    branch: str
    scale: float = 1.0
    mix: tuple[tuple[str, float], ...] = ()
    branch_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.reads, str):
            object.__setattr__(self, "reads", (self.reads,))
        if self.scale == 0:
            raise RevcompileError(f"step on {self.target!r}: scale must be non-zero, or the step cannot be undone")
        if self.target in {s for s, _ in self.mix}:
            raise RevcompileError(f"step on {self.target!r}: mix must name other streams (scale is the target's "
                                  "own coefficient)")

    @property
    def implicit(self) -> bool:
        """The branch reads the step's own target: undo is a fixed-point problem, not a formula."""
        return self.target in self.reads

    def apply(self, x: Mapping[str, Any], branch_out: Any) -> Any:
        """The new value of x[target], given the branch output on x[reads]."""
        new = x[self.target] if self.scale == 1 else self.scale * x[self.target]
        for source, coeff in self.mix:
            new = new + coeff * x[source]
        return new + (branch_out if self.branch_scale == 1 else self.branch_scale * branch_out)

    def undo(self, x: Mapping[str, Any], branch_out: Any) -> Any:
        """The old value of x[target], given the updated state and the branch output on the *old* reads."""
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
class FixedPointResult:
    value: torch.Tensor
    iterations: int
    converged: bool


# NOTE: float64's default is far above its rounding: Mixtral's, DeepSeek-V3's and GLM-4's routers compute in float32
# even in a float64 model, so the iteration map itself is only float32-exact and stalls around 1e-9.
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


STALL_ITERATIONS = 5


def tolerance_bound(output: torch.Tensor, tol: float | None) -> float:
    """The absolute step size at which a fixed-point inversion of `output` stops: tol times (1 + its largest
    magnitude); tol None takes DEFAULT_TOLERANCE for its dtype."""
    tol = tol if tol is not None else DEFAULT_TOLERANCE.get(output.dtype, 1e-5)
    return tol * (1 + float(output.abs().max()))


def weighted_sum(terms: Iterable[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """sum of c * t over `terms` [(t, c), ...], in one new buffer (a single term with c = 1 is returned as is).

    NOTE: the terms are added into that buffer in place, and taken one at a time (a generator of terms made on the
    fly holds one of them at once): a temporary per term made the merge at a run's last layer the forward's memory
    peak. `add(t, alpha=c)` rounds as `+ c * t` did, because the merges' coefficients (1, -1, 0.5) scale exactly.

    Example:
        >>> weighted_sum([(q, 1.0), (p, 1.0), (h0, -1.0)])  # q + p - h0
    """
    terms = iter(terms)
    first, c0 = next(terms)
    total, owned = (first, False) if c0 == 1 else (first * c0, True)
    del first
    for t, c in terms:
        if owned:
            total.add_(t, alpha=c)
        else:
            total, owned = torch.add(total, t, alpha=c), True
        del t  # before the generator makes the next one
    return total


class AndersonMixing:
    """Anderson acceleration of a fixed-point iteration `x <- g(x)`: the next iterate combines the last `memory`
    map values so that the combination of their residuals `g(x) - x` is smallest (least squares); memory 0 is the
    plain iteration.

    NOTE: on a linear map, with all iterates kept, this is GMRES on `x + F(x) = y`, which converges wherever that
    system has a unique solution, contraction or not; with a short memory it still does when only a few directions
    grow (tests/test_schemes.py). The residuals of the
    pretrained tiny MoE that the plain iteration cannot invert grow in many, and it inverts none more of them
    (bench/results/solver), hence not the default. The differences of the last map values and residuals sit in two
    `memory` x n buffers, so that the least squares is one product with their transpose (the `memory` x `memory`
    Gram matrix, solved in float64 by a pseudo-inverse that drops directions the history does not determine) and
    the update one more.

    Example:
        >>> mixing = AndersonMixing(memory=5)
        >>> x = mixing.next(g_of_x, g_of_x - x)     # the next iterate, given g(x) and the residual g(x) - x
    """

    def __init__(self, memory: int):
        self.memory = memory
        self.count = 0  # differences recorded so far (row count % memory is the next to overwrite)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.map_steps: torch.Tensor | None = None  # rows: g(x_k) - g(x_{k-1}), flattened
        self.residual_steps: torch.Tensor | None = None  # rows: f_k - f_{k-1}

    def next(self, mapped: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.memory == 0:
            return mapped
        if self.last is None:
            self.last = (mapped, residual)
            return mapped
        if self.map_steps is None:
            self.map_steps = mapped.new_empty((self.memory, mapped.numel()))
            self.residual_steps = mapped.new_empty((self.memory, mapped.numel()))
        row = self.count % self.memory
        torch.sub(mapped.reshape(-1), self.last[0].reshape(-1), out=self.map_steps[row])
        torch.sub(residual.reshape(-1), self.last[1].reshape(-1), out=self.residual_steps[row])
        self.count += 1
        self.last = (mapped, residual)
        used = min(self.count, self.memory)
        differences = self.residual_steps[:used]
        gram = (differences @ differences.T).double()
        gamma = torch.linalg.pinv(gram, rtol=1e-10, hermitian=True) @ (differences @ residual.reshape(-1)).double()
        arithmetic = torch.promote_types(mapped.dtype, torch.float32)  # (a bf16 combination would round gamma)
        correction = gamma.to(arithmetic) @ self.map_steps[:used].to(arithmetic)
        return (mapped.reshape(-1) - correction).to(mapped.dtype).view(mapped.shape)


def fixed_point(step: Step, after: Mapping[str, torch.Tensor], branch: Callable[[Mapping[str, torch.Tensor]], Any],
                tol: float | None, max_iters: int, anderson: int = 0) -> FixedPointResult:
    """x[target] before an implicit step, given the state `after` it: iterate `x <- undo(after, branch(x))`,
    accelerated by Anderson mixing over the last `anderson` iterates (0: plain iteration).

    branch(state) evaluates the step's branch on a state. Converged when an iteration moves the value by at most
    `tolerance_bound(output, tol)`. The plain iteration is a contraction, and so converges, when the branch's
    Lipschitz constant in its own target is below |scale / branch_scale|; Anderson mixing also converges on many
    maps that are not (`AndersonMixing`).

    Example:
        >>> step = Step("x", "x", "f")
        >>> fixed_point(step, {"x": torch.tensor(1.5)}, lambda s: 0.5 * s["x"], 1e-12, 100).value   # x + x/2 = 1.5
        tensor(1.)
    """
    bound = tolerance_bound(after[step.target], tol)
    guess, best, best_at = after[step.target], float("inf"), 0
    mixing = AndersonMixing(anderson)
    for iteration in range(1, max_iters + 1):
        mapped = step.undo(after, branch({**after, step.target: guess}))
        residual = mapped - guess
        moved = float(residual.abs().max())
        if moved <= bound:
            return FixedPointResult(mapped, iteration, True)
        # NOTE: a contraction moves less at every iteration. Where the map is not one here the steps stall or
        # oscillate; five iterations without a new smallest step end the attempt early, instead of spending
        # max_iters branch calls on a fixed point it will not reach.
        if moved < best:
            best, best_at = moved, iteration
        elif iteration - best_at >= STALL_ITERATIONS:
            return FixedPointResult(mapped, iteration, False)
        guess = mixing.next(mapped, residual)
    return FixedPointResult(mapped, max_iters, False)


@dataclass(frozen=True)
class Scheme:
    """A reversible coupling of a layer's residual branches, as data.

    streams:      names of the state's streams, in the order they are packed between layers.
    open:         how the first converted layer of a run makes the streams from the hidden state h:
                  stream -> coefficient (each stream a multiple of h), or None to split h's features into
                  equal slices, one per stream (and to concatenate them again at the merge).
    steps:        the coupling steps, in forward order.
    merge:        how the last converted layer of a run folds the streams back into h: stream -> coefficient
                  (None with a split open).
    output_order: a permutation applied after the steps: the next layer's stream streams[i] is this layer's
                  output_order[i] (MEFT's [y2, y1], the midpoint's (prev, cur) -> (cur, next)).
    branch_roles: the branches the steps use, and which of the layer's roles ("attn", "mlp", or "layer": the whole
                  layer's update f(x) = layer(x) - x) each runs;
                  branches other than the pair's own are built by `compose` from them (and from the modules
                  `new_modules` adds to the layer). A branch made only of token-wise ones is recomputed a slice of
                  the sequence at a time.
    tol, max_iters, anderson: the fixed-point inversion of implicit steps (tol None: DEFAULT_TOLERANCE by dtype;
                  anderson: the iterates Anderson mixing combines, 0 for the plain iteration).
    """

    name: str
    streams: tuple[str, ...]
    open: Mapping[str, float] | None
    steps: tuple[Step, ...]
    merge: Mapping[str, float] | None
    description: str = ""
    output_order: tuple[str, ...] | None = None
    branch_roles: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"attn": ("attn",), "mlp": ("mlp",)})
    compose: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]] | None = None
    new_modules: Callable[[int], dict[str, Any]] | None = None
    tol: float | None = None
    max_iters: int = 50
    anderson: int = 0

    def __post_init__(self):
        names = set(self.streams)
        if self.open is None:
            if self.merge is not None:
                raise RevcompileError(f"scheme {self.name!r}: a split open concatenates at the merge; merge must "
                                      "be None")
        else:
            if set(self.open) != names or not any(self.open.values()):
                raise RevcompileError(f"scheme {self.name!r}: open must give every stream a coefficient and keep h "
                                      "in at least one")
            if not set(self.merge or ()) <= names or not self.merge:
                raise RevcompileError(f"scheme {self.name!r}: merge must fold known streams into h")
        if self.output_order is not None and sorted(self.output_order) != sorted(self.streams):
            raise RevcompileError(f"scheme {self.name!r}: output_order must be a permutation of the streams")
        for step in self.steps:
            used = {step.target, *step.reads, *(s for s, _ in step.mix)}
            if not used <= names or step.branch not in self.branches:
                raise RevcompileError(f"scheme {self.name!r}: step {step} names an unknown stream or branch")

    @property
    def branches(self) -> tuple[str, ...]:
        """The branch names the steps may use."""
        return tuple(self.branch_roles)

    @property
    def implicit(self) -> bool:
        return any(step.implicit for step in self.steps)

    def open_streams(self, h: Any) -> dict[str, Any]:
        if self.open is None:
            return dict(zip(self.streams, h.chunk(len(self.streams), dim=-1)))
        return {s: h if c == 1 else c * h for s, c in self.open.items()}

    def open_grad(self, grads: Mapping[str, Any]) -> Any:
        """Gradient of h given the gradients of the streams `open_streams` made."""
        if self.open is None:
            return torch.cat([grads[s] for s in self.streams], dim=-1)
        total = None
        for s, c in self.open.items():
            if c:
                term = grads[s] if c == 1 else c * grads[s]
                total = term if total is None else total + term
        return total

    def unopen(self, x: Mapping[str, Any]) -> Any:
        """h back from freshly opened streams (the inverse of `open_streams`)."""
        if self.open is None:
            return torch.cat([x[s] for s in self.streams], dim=-1)
        stream, coeff = next((s, c) for s, c in self.open.items() if c)
        return x[stream] if coeff == 1 else x[stream] / coeff

    def merge_streams(self, x: Mapping[str, Any]) -> Any:
        if self.merge is None:
            return torch.cat([x[s] for s in self.streams], dim=-1)
        return weighted_sum([(x[s], c) for s, c in self.merge.items()])

    def merge_grad(self, g: Any) -> dict[str, Any]:
        if self.merge is None:
            return dict(zip(self.streams, g.chunk(len(self.streams), dim=-1)))
        return {s: (g if self.merge.get(s, 0) == 1 else self.merge.get(s, 0) * g) for s in self.streams}

    # NOTE: a permutation of stream names is orthogonal, so values and gradients are permuted the same way.
    def permute(self, x: Mapping[str, Any]) -> dict[str, Any]:
        """The state after the steps, named as the next layer sees it (applies output_order)."""
        if self.output_order is None:
            return dict(x)
        return {s: x[o] for s, o in zip(self.streams, self.output_order)}

    def unpermute(self, x: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of `permute`: a layer's output named as its steps left it."""
        if self.output_order is None:
            return dict(x)
        return {o: x[s] for s, o in zip(self.streams, self.output_order)}
