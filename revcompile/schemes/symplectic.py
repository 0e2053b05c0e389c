"""Symplectic (Hamiltonian / RevNet additive) coupling, Gal et al. 2025 eq. 2.8-2.9, RevFFN's coupling.

    q <- q + A(p)
    p <- p + M(q)

Opening and merge. A run of converted layers opens with q = p = h0 = h and merges with h = q + p - h0, carrying the
run's input h0 as a third, never-updated stream. For one layer this is exactly the original function:
q = h + A(h) is the original mid-layer residual and q + p - h0 = h + A(h) + M(h + A(h)). Over several layers
every branch still adds its output once to the merged state; what changes is what each branch reads: A reads
h0 + the MLP updates so far, M reads h0 + the attention updates so far (the original reads their sum).
The README quotes the measured KL between the original and the converted model.
"""

from dataclasses import dataclass

from ..coupling import Scheme, Step
from .config import SchemeConfig


@dataclass(frozen=True)
class SymplecticConfig(SchemeConfig):
    """No options: two explicit additive steps, exact inverse."""

    name = "symplectic"

    def scheme(self) -> Scheme:
        return Scheme(
            name=self.name,
            streams=("q", "p", "h0"),
            open={"q": 1.0, "p": 1.0, "h0": 1.0},
            steps=(Step(target="q", reads="p", branch="attn"), Step(target="p", reads="q", branch="mlp")),
            merge={"q": 1.0, "p": 1.0, "h0": -1.0},
            description="q <- q + A(p); p <- p + M(q): two explicit additive steps, exact inverse",
        )
