"""Fixed point (ours): the original architecture exactly, each residual inverted by fixed-point iteration.

    h <- h + A(h)        undo: iterate x <- h' - A(x)
    h <- h + M(h)        undo: iterate x <- h' - M(x)

No change to the function at all: the converted model's logits are the original's. The iteration converges when a
branch's Lipschitz constant is below 1, which nothing guarantees, so forward checks every implicit step: it runs
the inversion right away (with the routing it just recorded) and compares with the true input. A step that does
not come back within max_iters keeps its input for backward instead (a hybrid: that residual costs one stored
hidden state, like checkpointing). `revcompile.inversion_report(model)` and check() say how many did.

Cost: each residual runs its branch about (iterations + 1) times in forward and again in backward; bench/schemes.py
measures it.
"""

from dataclasses import dataclass

from ..coupling import Scheme, Step
from .config import SchemeConfig, check_solver


@dataclass(frozen=True)
class FixedPointConfig(SchemeConfig):
    """tol: relative step size at which the iteration stops (None: coupling.DEFAULT_TOLERANCE by dtype);
    max_iters: the most iterations per inversion (it also stops when it stalls); anderson: the iterates Anderson
    mixing combines (0: the plain iteration, `coupling.AndersonMixing`)."""

    name = "fixed_point"
    tol: float | None = None
    max_iters: int = 50
    anderson: int = 0

    def __post_init__(self):
        check_solver(self)

    def scheme(self) -> Scheme:
        return Scheme(
            name=self.name, streams=("h",), open={"h": 1.0}, merge={"h": 1.0},
            steps=(Step("h", "h", "attn"), Step("h", "h", "mlp")), tol=self.tol, max_iters=self.max_iters,
            anderson=self.anderson,
            description="h <- h + A(h); h <- h + M(h): the original layer, inverted by fixed-point iteration")
