"""Registry of coupling schemes: one file a scheme, each declaring its steps (no hand-written inverse) and its
options as a config dataclass with the papers' defaults.

Example:
    >>> from revcompile.schemes import get_scheme
    >>> get_scheme("symplectic").streams
    ('q', 'p', 'h0')
    >>> get_scheme("meft1", lam=0.05).steps[0].scale
    0.05
"""

from __future__ import annotations

from ..coupling import Scheme
from ..errors import RevcompileError
from .config import SchemeConfig
from .fixed_point import FixedPointConfig
from .meft import MEFT1Config, MEFT2Config, MEFT3Config
from .multistep import LeapfrogConfig, MidpointConfig
from .revffn import RevFFNConfig
from .symplectic import SymplecticConfig

SCHEMES: dict[str, type[SchemeConfig]] = {config.name: config for config in (
    SymplecticConfig, MidpointConfig, LeapfrogConfig, MEFT1Config, MEFT2Config, MEFT3Config, RevFFNConfig,
    FixedPointConfig)}


def get_scheme(scheme: str | SchemeConfig | Scheme, **options) -> Scheme:
    """The Scheme for a name (with options), a config, or a Scheme itself.

    Raises RevcompileError for an unknown scheme, an unknown option or an invalid value.
    """
    if isinstance(scheme, Scheme) or isinstance(scheme, SchemeConfig):
        if options:
            raise RevcompileError(f"options {sorted(options)} given with a ready-made scheme; set them on its config")
        return scheme if isinstance(scheme, Scheme) else scheme.scheme()
    if scheme not in SCHEMES:
        raise RevcompileError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    config = SCHEMES[scheme]
    unknown = sorted(set(options) - set(config.options()))
    if unknown:
        known = ", ".join(config.options()) or "none"
        raise RevcompileError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for scheme "
                              f"{scheme!r}; its options are: {known} ({config.__name__})")
    try:
        return config(**options).scheme()
    except TypeError as err:  # a value of the wrong type that the dataclass itself rejected
        raise RevcompileError(f"scheme {scheme!r}: {err}") from err


__all__ = ["SCHEMES", "SchemeConfig", "get_scheme", "SymplecticConfig", "MidpointConfig", "LeapfrogConfig",
           "MEFT1Config", "MEFT2Config", "MEFT3Config", "RevFFNConfig", "FixedPointConfig"]
