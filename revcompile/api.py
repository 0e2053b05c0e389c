"""The Python API: make_reversible, analyze, undo, disable_inversion.

Example:
    >>> model = AutoModelForCausalLM.from_config(cfg)     # an unmodified Hugging Face MoE
    >>> revcompile.make_reversible(model)                 # in place; returns the model
    >>> model(ids, labels=ids).loss.backward()            # activations rebuilt in backward, not stored
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from tabulate import tabulate
from torch import nn

from .capture.tracer import bind_call, unwrapped_forward
from .coupling import Scheme
from .distributed import refuse_wrapped
from .errors import RevcompileError
from .passes.residuals import PARALLEL, SEQUENTIAL, WHOLE
from .plan import Pair, Skipped, analyze
from .runtime.compiled import BranchCompiler
from .runtime.layer import NEW_MODULES, LayerRuntime, chunks_by_branch, disable_inversion, reversible_class
from .schemes import SchemeConfig, get_scheme
from .schemes.branches import scheme_fits

DEFAULT_SCHEMES = {SEQUENTIAL: "symplectic", PARALLEL: "symplectic", WHOLE: "midpoint"}

__all__ = ["make_reversible", "analyze", "undo", "disable_inversion", "converted_layers", "inversion_report"]


def make_reversible(model: nn.Module, scheme: str | SchemeConfig | Scheme | None = None, *, invert: bool = True,
                    example_inputs: Any = None, recompute_chunks: int | None = None, max_run: int | None = None,
                    compile: bool = False, **options) -> nn.Module:
    """Convert `model` in place so that backward rebuilds each converted layer's input from its output.

    scheme:          a coupling scheme name (see `revcompile.SCHEMES` and the README's guide), its config
                     (`revcompile.schemes.MEFT1Config(lam=0.05)`) or a Scheme; None (the default) chooses per layer
                     form, DEFAULT_SCHEMES: symplectic for attention/FFN pairs (sequential or parallel), midpoint
                     for a layer converted whole. A layer whose form the scheme cannot convert is skipped, saying so.
    **options:       the scheme's options by name, e.g. `make_reversible(model, "meft1", lam=0.05, rank=16)`.
    invert:          False keeps the coupled computation but trains it with ordinary autograd (stores activations).
    example_inputs:  one forward call's input (a tensor, a tuple of arguments or a dict of keywords), used to
                     find the layers; by default a few random tokens for the model's embedding.
    max_run:         at most this many consecutive layers per reversible run (None: as many as are consecutive).
                     Each run opens the streams from h and merges them back, and keeps its last output for
                     backward: shorter runs cost one stored state each but bound how far reconstruction error
                     compounds (MEFT, bf16), and make function-changing schemes closer to the original
                     (symplectic with max_run=1 is exactly the original model).
    recompute_chunks: backward recomputes an FFN/MoE branch that acts token by token this many slices of the
                     sequence at a time, dividing its working set (1: in one piece; None: 4 on CPU, 1 on CUDA,
                     where slicing costs more time than it saves memory: see replay.AUTO_CHUNKS).
    compile:         run the branches as graphs compiled with torch.compile (Inductor), each distinct branch graph
                     compiled once for all the layers that share it (see `revcompile/runtime/compiled.py`).

    Returns the model; `model._revcompile_plan` is the Plan it followed. Layers that cannot be converted are left
    as they are and listed in `plan.skipped`. Schemes with adapters or projections (meft*, revffn) add them to
    each converted layer as `layer.revcompile_modules`, on the layer's dtype and device. Raises RevcompileError
    (the model unchanged) for a non-Module, a second conversion, an unknown scheme or option, an invalid option
    value, or a model with no residual pair.
    """
    if scheme is None and options:
        raise RevcompileError(f"options {sorted(options)} need a scheme: make_reversible(model, 'midpoint', h=0.25)")
    chosen = None if scheme is None else get_scheme(scheme, **options)
    if recompute_chunks is not None and (not isinstance(recompute_chunks, int) or recompute_chunks < 1):
        raise RevcompileError(f"recompute_chunks must be a positive integer or None, got {recompute_chunks!r}")
    if max_run is not None and (not isinstance(max_run, int) or max_run < 1):
        raise RevcompileError(f"max_run must be a positive integer or None, got {max_run!r}")
    plan = analyze(model, example_inputs)
    schemes = {form: chosen or get_scheme(name) for form, name in DEFAULT_SCHEMES.items()}
    for pair in plan.pairs:
        pair.scheme = schemes[pair.form].name
    unfit = [p for p in plan.pairs if not scheme_fits(schemes[p.form], p.form)]
    plan.skipped += [Skipped(p.layer, f"scheme {p.scheme!r} needs an attention and an FFN/MoE branch, and this layer "
                                      f"converts only whole ({p.structure.why_whole}): midpoint or leapfrog convert "
                                      "it (scheme=None chooses per layer)") for p in unfit]
    plan.pairs = [p for p in plan.pairs if p not in unfit]
    if not plan.pairs:
        reasons = "; ".join(sorted({s.reason for s in plan.skipped})) or "no layers found"
        raise RevcompileError(f"{type(model).__name__} has no layer to convert ({reasons})")
    new = [pair for pair in plan.pairs if schemes[pair.form].new_modules is not None]
    added = [_new_modules(pair, schemes[pair.form]) for pair in new]  # all built (and validated) before any is set
    for pair, modules in zip(new, added):
        pair.module.add_module(NEW_MODULES, modules)
    compiler = BranchCompiler() if compile else None
    # a run is a maximal sequence of consecutive converted layers of one stack and one scheme (cut into pieces of
    # max_run): it opens and merges the streams
    runs = [[pair for _, pair in run] for _, run in groupby(
        enumerate(plan.pairs), key=lambda ip: (ip[1].stack, ip[1].index - ip[0], ip[1].scheme))]
    if max_run is not None:
        runs = [run[i:i + max_run] for run in runs for i in range(0, len(run), max_run)]
    for run in runs:
        for i, pair in enumerate(run):
            layer = pair.module
            scheme = schemes[pair.form]
            outputs = len(pair.call.output) if isinstance(pair.call.output, (tuple, list)) else None
            layer._revcompile = LayerRuntime(layer, scheme, pair.structure.branch_graphs,
                                             pair.structure.trace.signature, is_first=i == 0,
                                             is_last=i == len(run) - 1, invert=invert, original_class=type(layer),
                                             chunks=chunks_by_branch(scheme, pair.structure.splits_by_token,
                                                                     recompute_chunks), compiler=compiler,
                                             form=pair.form, outputs=outputs)
    for pair in plan.pairs:
        pair.module.__class__ = reversible_class(type(pair.module))
    model._revcompile_plan = plan
    return model


def _new_modules(pair: Pair, scheme: Scheme) -> nn.ModuleDict:
    """The modules the scheme adds to this pair's layer, sized for its hidden state, on its dtype and device."""
    _, hidden, _ = bind_call(unwrapped_forward(pair.module), pair.module, pair.call.args, pair.call.kwargs)
    return nn.ModuleDict(scheme.new_modules(hidden.shape[-1])).to(dtype=hidden.dtype, device=hidden.device)


def converted_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that make_reversible converted, in model order."""
    return [m for m in model.modules() if isinstance(getattr(m, "_revcompile", None), LayerRuntime)]


def undo(model: nn.Module) -> nn.Module:
    """Restore the original layers of a converted model (in place; returns it).

    The original parameters are untouched; modules a scheme added (MEFT's adapters, RevFFN's projections) are
    removed with their weights, since the original architecture has no place for them.
    """
    layers = converted_layers(model)
    if not layers:
        raise RevcompileError("this model was not converted by revcompile.make_reversible; nothing to undo")
    refuse_wrapped(model, "undo works on the unwrapped model: call it before fully_shard (whose layer classes it "
                          "would drop), or on the model inside DistributedDataParallel (revcompile.undo(ddp.module))")
    for layer in layers:
        layer.__class__ = layer._revcompile.original_class
        del layer._revcompile
        if hasattr(layer, NEW_MODULES):  # adapters and projections a scheme added: the original has no place for them
            delattr(layer, NEW_MODULES)
    del model._revcompile_plan
    return model


def inversion_report(model: nn.Module) -> str:
    """Per converted layer, how its implicit steps (fixed_point, revffn) fared in the forwards so far: how many
    were inverted by fixed-point iteration and how many kept their input instead (the hybrid fallback).

    Example:
        >>> print(revcompile.inversion_report(model))
    """
    layers = [layer for layer in converted_layers(model) if layer._revcompile.scheme.implicit]
    if not layers:
        raise RevcompileError("inversion_report() needs a model converted with a scheme that has implicit steps "
                              "(fixed_point, revffn)")
    names = {m: n for n, m in model.named_modules()}
    rows = [[names[layer], s.solved, s.stored, s.max_iterations, s.converged_fraction]
            for layer in layers for s in [layer._revcompile.inversions]]
    return tabulate(rows, headers=["layer", "inverted", "kept input", "max iterations", "converged fraction"],
                    floatfmt=".3g")
