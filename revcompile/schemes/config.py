"""Scheme options: one small frozen dataclass per scheme, with the papers' defaults and validation.

Example:
    >>> MEFTConfig(variant=1, lam=0.05).scheme().steps[0].scale
    0.05
    >>> MEFTConfig(variant=1, lam=0)
    RevcompileError: meft1: lam must be non-zero: the inverse divides by it
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..coupling import Scheme
from ..errors import RevcompileError


@dataclass(frozen=True)
class SchemeConfig:
    """Base of the per-scheme option dataclasses: `scheme()` builds the Scheme the options describe."""

    name: ClassVar[str] = ""

    def scheme(self) -> Scheme:
        raise NotImplementedError

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise RevcompileError(f"{self.name}: {message}")

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]


def check_solver(config: SchemeConfig) -> None:
    """Validate the fixed-point options (tol, max_iters, anderson) of a scheme with implicit steps."""
    config.require(config.tol is None or config.tol > 0,
                   "tol must be positive (or None for the dtype's default, coupling.DEFAULT_TOLERANCE)")
    config.require(isinstance(config.max_iters, int) and config.max_iters >= 1, "max_iters must be a positive integer")
    config.require(isinstance(config.anderson, int) and 0 <= config.anderson <= 20,
                   "anderson must be an integer from 0 (plain fixed-point iteration) to 20 (iterates mixed)")
