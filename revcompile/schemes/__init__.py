"""Registry of coupling schemes: one file a scheme, each declaring its steps (no hand-written inverse).

Example:
    >>> from revcompile.schemes import get_scheme
    >>> get_scheme("symplectic").streams
    ('q', 'p', 'h0')
"""

from __future__ import annotations

from ..coupling import Scheme
from ..errors import RevcompileError
from .symplectic import SYMPLECTIC

SCHEMES: dict[str, Scheme] = {SYMPLECTIC.name: SYMPLECTIC}


def get_scheme(scheme: str | Scheme) -> Scheme:
    """The scheme called `scheme` (or `scheme` itself when it is already a Scheme)."""
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise RevcompileError(f"unknown scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES))}")
    return SCHEMES[scheme]
