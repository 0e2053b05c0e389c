"""The Python API: make_reversible, analyze, undo, disable_inversion.

Example:
    >>> model = AutoModelForCausalLM.from_config(cfg)     # an unmodified Hugging Face MoE
    >>> revcompile.make_reversible(model)                 # in place; returns the model
    >>> model(ids, labels=ids).loss.backward()            # activations rebuilt in backward, not stored
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from torch import nn

from .coupling import Scheme
from .errors import RevcompileError
from .plan import analyze
from .runtime.layer import LayerRuntime, disable_inversion, reversible_class
from .schemes import get_scheme

__all__ = ["make_reversible", "analyze", "undo", "disable_inversion", "converted_layers"]


def make_reversible(model: nn.Module, scheme: str | Scheme = "symplectic", *, invert: bool = True,
                    example_inputs: Any = None, recompute_chunks: int = 4) -> nn.Module:
    """Convert `model` in place so that backward rebuilds each converted layer's input from its output.

    scheme:          a coupling scheme name (see `revcompile.schemes.SCHEMES`) or a Scheme.
    invert:          False keeps the coupled computation but trains it with ordinary autograd (stores activations).
    example_inputs:  one forward call's input (a tensor, a tuple of arguments or a dict of keywords), used to
                     find the layers; by default a few random tokens for the model's embedding.
    recompute_chunks: backward recomputes an FFN/MoE branch that acts token by token this many slices of the
                     sequence at a time, dividing its working set (1: in one piece).

    Returns the model; `model._revcompile_plan` is the Plan it followed. Layers that cannot be converted are left
    as they are and listed in `plan.skipped`. Raises RevcompileError (the model unchanged) for a non-Module, a
    second conversion, an unknown scheme, or a model with no residual pair.
    """
    scheme = get_scheme(scheme)
    if not isinstance(recompute_chunks, int) or recompute_chunks < 1:
        raise RevcompileError(f"recompute_chunks must be a positive integer, got {recompute_chunks!r}")
    plan = analyze(model, example_inputs)
    if not plan.pairs:
        reasons = "; ".join(sorted({s.reason for s in plan.skipped})) or "no layers found"
        raise RevcompileError(f"{type(model).__name__} has no residual attention -> FFN/MoE pair to convert "
                              f"({reasons})")
    # a run is a maximal sequence of consecutive converted layers of one stack: it opens and merges the streams
    for _, run in groupby(enumerate(plan.pairs), key=lambda ip: (ip[1].stack, ip[1].index - ip[0])):
        run = [pair for _, pair in run]
        for i, pair in enumerate(run):
            layer = pair.module
            layer._revcompile = LayerRuntime(layer, scheme, pair.structure.branch_graphs,
                                             pair.structure.trace.signature, is_first=i == 0,
                                             is_last=i == len(run) - 1, invert=invert, original_class=type(layer),
                                             chunks={name: recompute_chunks for name, splits in
                                                     zip(scheme.branches, pair.structure.splits_by_token) if splits})
    for pair in plan.pairs:
        pair.module.__class__ = reversible_class(type(pair.module))
    model._revcompile_plan = plan
    return model


def converted_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that make_reversible converted, in model order."""
    return [m for m in model.modules() if isinstance(getattr(m, "_revcompile", None), LayerRuntime)]


def undo(model: nn.Module) -> nn.Module:
    """Restore the original layers of a converted model (in place; returns it). The parameters are untouched."""
    layers = converted_layers(model)
    if not layers:
        raise RevcompileError("this model was not converted by revcompile.make_reversible; nothing to undo")
    for layer in layers:
        layer.__class__ = layer._revcompile.original_class
        del layer._revcompile
    del model._revcompile_plan
    return model
