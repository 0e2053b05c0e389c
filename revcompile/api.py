"""The Python API: make_reversible, analyze, undo, disable_inversion.

Example:
    >>> model = AutoModelForCausalLM.from_config(cfg)     # an unmodified Hugging Face MoE
    >>> revcompile.make_reversible(model)                 # in place; returns the model
    >>> model(ids, labels=ids).loss.backward()            # activations rebuilt in backward, not stored
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from itertools import groupby
from typing import Any

from tabulate import tabulate
from torch import nn

from .capture.tracer import bind_call, unwrapped_forward
from .coupling import Scheme
from .distributed import refuse_wrapped
from .errors import RevcompileError
from .passes.residuals import PARALLEL, SEQUENTIAL, WHOLE
from .plan import Pair, Skipped, analyze, with_other_outputs
from .runtime.compiled import BranchCompiler
from .runtime.head import (FUSED_KERNELS, HEADS, check_fused_kernel, convert_head, has_chunked_head, head_transform,
                           undo_head)
from .runtime.layer import NEW_MODULES, LayerRuntime, disable_inversion, reversible_class, splits_by_branch
from .runtime.streams import resolve_exact
from .schemes import SchemeConfig, get_scheme
from .schemes.branches import scheme_fits

DEFAULT_SCHEMES = {SEQUENTIAL: "symplectic", PARALLEL: "symplectic", WHOLE: "midpoint"}

__all__ = ["make_reversible", "analyze", "undo", "disable_inversion", "converted_layers", "inversion_report"]

RECORD_KEY = "revcompile"  # the conversion, recorded in the model's config (config.json) by make_reversible
KEEPS_FUNCTION = ("fixed_point",)  # every other scheme changes the function: trained weights mean something only
#                                     under the scheme they were trained with
CHECKPOINTING_OFF = ("Hugging Face activation checkpointing is switched off on the layers revcompile converted: "
                     "they already rebuild their activations in backward, and checkpointing them too would run each "
                     "layer once more per step. Unconverted layers keep it.")


def _records_call(convert):
    """Record every argument of a make_reversible call (new options included) on the converted model.

    The record (scheme name, its options, every other option, the converted layers) is a JSON dict kept in
    `model.config.revcompile` (so `save_pretrained` writes it to config.json; `revcompile.from_pretrained` reads it)
    or, for a model without a Hugging Face config, in `model._revcompile_call`.
    """
    signature = inspect.signature(convert)

    @functools.wraps(convert)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = convert(*args, **kwargs)
        arguments = dict(bound.arguments)
        for name in ("model", "example_inputs"):  # the model itself; example inputs only find the layers
            arguments.pop(name)
        options, scheme = arguments.pop("options"), arguments.pop("scheme")
        if isinstance(scheme, SchemeConfig):
            scheme, options = scheme.name, {name: getattr(scheme, name) for name in scheme.options()}
        ready_made = scheme is not None and not isinstance(scheme, str)  # a Scheme object: a reload cannot rebuild it
        record = {"scheme": None if ready_made else scheme, "options": options, **arguments,
                  "layers": [pair.layer for pair in model._revcompile_plan.pairs]}
        unrecordable = [name for name, value in {**arguments, **options}.items() if not _is_json(value)]
        record["not_recorded"] = sorted(unrecordable + (["scheme"] if ready_made else []))
        model._revcompile_call = record
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            setattr(config, RECORD_KEY, record)
        return model

    return wrapper


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@_records_call
def make_reversible(model: nn.Module, scheme: str | SchemeConfig | Scheme | None = None, *, invert: bool = True,
                    example_inputs: Any = None, recompute_chunks: int | None = None, max_run: int | None = None,
                    compile: bool = False, exact: bool | None = None, exact_headroom: int | None = None,
                    head: str = "chunked", head_chunk_tokens: int | None = None,
                    **options) -> nn.Module:
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
                     (with max_run=1, symplectic on sequential layers and midpoint on whole ones compute exactly
                     the original model: bench/zoo.py checks it for every family).
    recompute_chunks: backward recomputes an FFN/MoE branch that acts token by token this many slices of the
                     sequence at a time, and attention (any branch that treats each sequence alone) this many slices
                     of the batch (forward runs the same slices), dividing their working set; None: by device,
                     slices of at most 2048 tokens on CPU, one piece on CUDA (see slicing.AUTO_SLICE_TOKENS).
    compile:         run the branches as graphs compiled with torch.compile (Inductor), each distinct branch graph
                     compiled once for all the layers that share it (see `revcompile/runtime/compiled.py`).
    exact:           hold the streams as fixed-point integers, so that backward rebuilds every layer's input bit for
                     bit in any dtype (bf16 included; `runtime/streams.py`). None (default): exact where the run
                     computes in 16 bits (bf16/fp16 weights, or autocast) and the scheme's steps allow it
                     (symplectic, midpoint, leapfrog); float streams for the others (meft*, revffn, fixed_point)
                     and in plain fp32/fp64. True for a scheme that cannot is a RevcompileError.
    exact_headroom:  bits of room above the largest value entering a run (None: 16 for bf16/fp16 models, 24 for
                     fp32/fp64); a stream that outgrows it raises RevcompileError naming this option.
    head:            "chunked" (default): a Hugging Face causal LM called with labels (grad enabled) computes
                     lm_head + cross-entropy in token chunks, never materialising the logits or their gradient;
                     its output's `logits` is then None (see `revcompile/runtime/head.py`). "liger" / "cce": the
                     same, by Liger-Kernel's fused linear cross-entropy or Cut Cross-Entropy (Triton, CUDA only;
                     `pip install 'revcompile[gpu]'`). "original": leave the head and loss as they are. `plan.head`
                     says which ran and why.
    head_chunk_tokens: tokens per chunk of the chunked head (None: a chunk's logits about the size of the hidden
                     states).

    Returns the model; `revcompile.analyze(model)` is the Plan it followed. The call's options are recorded in
    `model.config.revcompile`: save the converted model with `save_pretrained` and reload it, converted the same way,
    with `revcompile.from_pretrained(path)`. Hugging Face activation checkpointing is switched off on converted
    layers (one warning). Layers that cannot be converted are left as they are and listed in `plan.skipped`.
    Schemes with adapters or projections (meft*, revffn) add them to each converted layer as
    `layer.revcompile_modules`, on the layer's dtype and device. Raises RevcompileError
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
    if isinstance(model, nn.Module) and converted_layers(model):
        raise RevcompileError("this model is already converted by revcompile; call revcompile.undo(model) first")
    if head not in HEADS:
        raise RevcompileError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
    if head_chunk_tokens is not None and (not isinstance(head_chunk_tokens, int) or head_chunk_tokens < 1):
        raise RevcompileError(f"head_chunk_tokens must be a positive integer or None, got {head_chunk_tokens!r}")
    if head in FUSED_KERNELS:
        check_fused_kernel(head, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    plan = analyze(model, example_inputs)
    schemes = {form: chosen or get_scheme(name) for form, name in DEFAULT_SCHEMES.items()}
    exact_by_form = {form: resolve_exact(scheme, exact, exact_headroom) for form, scheme in schemes.items()}
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
    head_skipped, softcap = head_transform(model, example_inputs) if head != "original" else ("head='original'", None)
    compiler = BranchCompiler() if compile else None
    # a run is a maximal sequence of consecutive converted layers of one stack and one scheme, ending where the
    # model reads a layer's output itself (cut into pieces of max_run): it opens and merges the streams
    runs = [[pair for _, pair in run] for _, run in groupby(
        enumerate(plan.pairs), key=lambda ip: (ip[1].stack, ip[1].index - ip[0], ip[1].scheme))]
    runs = [piece for run in runs for piece in _cut_after_read_outputs(run)]
    if max_run is not None:
        runs = [run[i:i + max_run] for run in runs for i in range(0, len(run), max_run)]
    for run in runs:
        for i, pair in enumerate(run):
            layer = pair.module
            scheme = schemes[pair.form]
            outputs = len(pair.call.output) if isinstance(pair.call.output, (tuple, list)) else None
            structure = pair.structure  # (traced in eval mode: LayerRuntime's NOTE on other outputs)
            graphs, other_outputs = with_other_outputs(structure.trace, pair.form, structure.chain,
                                                       structure.branch_graphs,
                                                       tuple(pair.hands_on) if structure.trace.training else None)
            layer._revcompile = LayerRuntime(layer, scheme, graphs,
                                             pair.structure.trace.signature, is_first=i == 0,
                                             is_last=i == len(run) - 1, invert=invert, original_class=type(layer),
                                             splits=splits_by_branch(scheme, pair.form, pair.structure.splits_by_token,
                                                                     pair.structure.splits_by_sequence,
                                                                     recompute_chunks),
                                             batch_context=pair.structure.batch_context, compiler=compiler,
                                             exact=exact_by_form[pair.form], exact_headroom=exact_headroom,
                                             form=pair.form, outputs=outputs,
                                             traced_training=pair.structure.trace.training,
                                             other_outputs=other_outputs, hands_on=tuple(pair.hands_on),
                                             child_nones=structure.trace.child_nones)
    for pair in plan.pairs:
        pair.module.__class__ = reversible_class(type(pair.module))
    if any(pair.module.__dict__.get("gradient_checkpointing") for pair in plan.pairs):
        warnings.warn(CHECKPOINTING_OFF, stacklevel=3)
    plan.applied = True
    if head_skipped is None:
        convert_head(model, softcap, head_chunk_tokens, head)
    plan.head = (f"{head} (softcap {softcap:g})" if softcap else head) if head_skipped is None else \
        f"original ({head_skipped})"
    model._revcompile_plan = plan
    # parameter versions now: undo can tell whether the model was trained since (optimizer steps write in place);
    # None when the weights were already trained under a conversion (saved with its record in the config)
    loaded_trained = getattr(getattr(model, "config", None), RECORD_KEY, None) is not None
    model._revcompile_baseline = None if loaded_trained else [p._version for p in model.parameters()]
    return model


def _cut_after_read_outputs(run: list[Pair]) -> list[list[Pair]]:
    """A run cut after each layer whose output the model also reads itself (it must hand on a hidden state)."""
    pieces, current = [], []
    for pair in run:
        current.append(pair)
        if pair.read_elsewhere:
            pieces.append(current)
            current = []
    return pieces + [current] if current else pieces


def _new_modules(pair: Pair, scheme: Scheme) -> nn.ModuleDict:
    """The modules the scheme adds to this pair's layer, sized for its hidden state, on its dtype and device."""
    _, hidden, _ = bind_call(unwrapped_forward(pair.module), pair.module, pair.call.args, pair.call.kwargs)
    return nn.ModuleDict(scheme.new_modules(hidden.shape[-1])).to(dtype=hidden.dtype, device=hidden.device)


def converted_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that make_reversible converted, in model order."""
    return [m for m in model.modules() if isinstance(getattr(m, "_revcompile", None), LayerRuntime)]


def _trained_since_conversion(model: nn.Module) -> bool:
    """Did a parameter change in place since conversion (an optimizer step, load_state_dict)? A deepcopy counts as
    changed too (its parameters' version counters start again)."""
    baseline = getattr(model, "_revcompile_baseline", None)
    return baseline is None or baseline != [p._version for p in model.parameters()]


def undo(model: nn.Module, force: bool = False) -> nn.Module:
    """Restore the original layers and LM head of a converted model (in place; returns it).

    The original parameters are untouched; modules a scheme added (MEFT's adapters, RevFFN's projections) are
    removed with their weights, since the original architecture has no place for them. A model trained under a
    scheme that changes the function (every scheme but fixed_point) would compute something else after undo: that
    is refused unless `force=True`; save it converted and reload it with `revcompile.from_pretrained` instead.

    Example:
        >>> revcompile.undo(model)              # right after make_reversible: the original model again
        >>> revcompile.undo(model, force=True)  # after training under symplectic: the original architecture,
        ...                                     # with weights trained for another function
    """
    layers = converted_layers(model)
    if not layers and not has_chunked_head(model):
        raise RevcompileError("this model was not converted by revcompile.make_reversible; nothing to undo")
    refuse_wrapped(model, "undo works on the unwrapped model: call it before fully_shard (whose layer classes it "
                          "would drop), or on the model inside DistributedDataParallel (revcompile.undo(ddp.module))")
    scheme = layers[0]._revcompile.scheme.name if layers else None  # None: the chunked head alone (chunked_head)
    if not force and scheme is not None and scheme not in KEEPS_FUNCTION and _trained_since_conversion(model):
        raise RevcompileError(
            f"this model's weights were trained under the {scheme!r} scheme, which changes the model's function: "
            "after undo the original layers would compute something else than the trained model. To keep what was "
            "trained, keep it converted: model.save_pretrained(path) records the conversion in config.json, and "
            "revcompile.from_pretrained(path) loads it converted the same way. Pass force=True to undo anyway")
    for layer in layers:
        layer.__class__ = layer._revcompile.original_class
        del layer._revcompile
        if hasattr(layer, NEW_MODULES):  # adapters and projections a scheme added: the original has no place for them
            delattr(layer, NEW_MODULES)
    undo_head(model)
    for name in ("_revcompile_plan", "_revcompile_call", "_revcompile_baseline"):  # (absent after chunked_head alone)
        model.__dict__.pop(name, None)
    if hasattr(getattr(model, "config", None), RECORD_KEY):
        delattr(model.config, RECORD_KEY)
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
    rows = [[names[layer], s.solved, s.stored, s.mean_iterations, s.max_iterations, s.converged_fraction]
            for layer in layers for s in [layer._revcompile.inversions]]
    return tabulate(rows, headers=["layer", "inverted", "kept input", "mean iterations", "max iterations",
                                   "converged fraction"], floatfmt=".3g")
