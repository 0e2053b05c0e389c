"""Midpoint and leapfrog couplings (Gal et al. 2025, "Reversing LLMs", eq. 2.4 and 2.6).

The layer is one step of an ODE integrator whose right-hand side is the whole layer's residual update
f(x) = A(x) + M(x + A(x)), on two streams (prev, cur):

    midpoint:  next = prev + 2h f(cur)              undo: prev = next - 2h f(cur)
    leapfrog:  next = 2 cur - prev + h^2 f(cur)     undo: prev = 2 cur - next + h^2 f(cur)

then (prev, cur) <- (cur, next). A run opens with prev = cur = h and merges to cur.

Defaults (our choice; the paper trains h): the midpoint's h = 0.5 and the leapfrog's h = 1 make the first layer
of a run exactly the original one (h + f(h)). Later layers differ from the original (every other update for the
midpoint, a growing "velocity" for the leapfrog): these schemes need `revcompile.distill` after conversion.
The branch is a whole layer, so its recompute is not split by token: backward's working set is one layer. Any
layer that maps the hidden state to one of its shape has this f (the "whole layer" form: post-norm, one residual
branch, a residual inside a child module), so these schemes convert layers no pair scheme can.
"""

from dataclasses import dataclass

from ..coupling import Scheme, Step
from .config import SchemeConfig


def _integrator(name: str, step: Step, description: str) -> Scheme:
    """A two-stream integrator step over the whole layer's update, then (prev, cur) <- (cur, next)."""
    return Scheme(name=name, streams=("prev", "cur"), open={"prev": 1.0, "cur": 1.0}, steps=(step,),
                  merge={"cur": 1.0}, output_order=("cur", "prev"),
                  branch_roles={"layer": ("layer",)},
                  description=description)


@dataclass(frozen=True)
class MidpointConfig(SchemeConfig):
    """h: the integrator's step (next = prev + 2h f(cur))."""

    name = "midpoint"
    h: float = 0.5

    def __post_init__(self):
        self.require(self.h > 0, "h must be positive")

    def scheme(self) -> Scheme:
        return _integrator(self.name, Step(target="prev", reads="cur", branch="layer", branch_scale=2 * self.h),
                           f"next = prev + {2 * self.h:g} f(cur); (prev, cur) <- (cur, next)")


@dataclass(frozen=True)
class LeapfrogConfig(SchemeConfig):
    """h: the integrator's step (next = 2 cur - prev + h^2 f(cur))."""

    name = "leapfrog"
    h: float = 1.0

    def __post_init__(self):
        self.require(self.h > 0, "h must be positive")

    def scheme(self) -> Scheme:
        return _integrator(self.name, Step(target="prev", reads="cur", branch="layer", scale=-1.0,
                                           mix=(("cur", 2.0),), branch_scale=self.h ** 2),
                           f"next = 2 cur - prev + {self.h ** 2:g} f(cur); (prev, cur) <- (cur, next)")
