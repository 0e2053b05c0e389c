"""The zoo: every causal-LM family of the installed transformers, built tiny, converted, gradients checked.

Families come from transformers' own auto-mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), never a hand list. For
each: a tiny config (`models.tiny_config`), random weights in float64, one training step with inversion against
the same converted model under `disable_inversion()`. The outcome is one of

- converted:   the gradients agree (relative to the largest reference gradient) within the bound,
- mismatch:    they do not (a defect),
- crashed:     conversion or the step raised (a defect),
- skipped:     no layer converts; the plan's reasons say why,
- not built:   the tiny config or model cannot be built, or its float64 loss is not finite (the error is shown).

Example:
    >>> from revcompile.zoo import causal_lm_families, run_family
    >>> run_family("mixtral").status
    'converted'
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from .api import analyze, converted_layers, make_reversible
from .errors import RevcompileError
from .models import tiny_config, tiny_model_from_config
from .runtime.layer import disable_inversion

# NOTE: the bounds, from the measured errors of the whole zoo (bench/results/zoo.md) and of the worst families over
# seeds and schemes. A layer computing only in float64 rebuilds its input to float64 rounding: at most ~1e-15
# measured, bound 1e-8. Most layers compute something in float32 even in a float64 model (RMSNorm casts to
# float32, routers and softmaxes often do): the recompute on a rebuilt input rounds those float32 values
# differently. Worst measured: 3.8e-6 (beam, a float32 DeepSeek-style router, leapfrog over whole layers); bound
# 1e-4, the project's float32 tolerance (tests/conftest.py). A wrong inverse (an undo off by 1e-3,
# tests/test_zoo.py) lands far above both.
FLOAT64, FLOAT32 = "float64", "float32 inside"
BOUND = {FLOAT64: 1e-8, FLOAT32: 1e-4}
MAX_PARAMETERS = 20_000_000  # a "tiny" config that builds bigger than this kept a full-size default somewhere

CONVERTED, MISMATCH, CRASHED, SKIPPED, NOT_BUILT = "converted", "mismatch", "crashed", "skipped", "not built"


def causal_lm_families() -> list[str]:
    """The model_types with a causal-LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass
class ZooResult:
    family: str
    status: str
    layers: int = 0  # layers in the model's stacks
    converted: int = 0  # layers converted
    forms: Counter = field(default_factory=Counter)  # layer form -> converted layers
    schemes: Counter = field(default_factory=Counter)  # scheme -> converted layers
    error: float | None = None  # worst gradient error relative to the largest reference gradient
    bound: str = FLOAT64  # FLOAT32 where a layer computes in float32 (a router, a norm) inside the float64 model
    reason: str = ""


class _Float32Watch(TorchFunctionMode):
    """Sees whether a float64 layer computes something in float32 (a router or a norm that casts to float32)."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dtype == torch.float32 and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            self.seen = True
        return result


def computes_in_float32(layers: list[torch.nn.Module], run) -> bool:
    """Does any of `layers` cast a float64 value to float32 while `run()` runs?"""
    watch = _Float32Watch()

    def enter(*_):
        watch.__enter__()

    def leave(*_):
        watch.__exit__(None, None, None)

    hooks = [hook for layer in layers
             for hook in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return watch.seen


def _loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def reversible_nodes(loss: torch.Tensor) -> list:
    """The reversible Function nodes of the autograd graph of `loss` (`node.call` is the layer call's CouplingCall)."""
    seen, stack, nodes = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "ReversibleCouplingBackward":
            nodes.append(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return nodes


def _grads(model, ids, reference: bool) -> tuple[dict[str, torch.Tensor], int]:
    """(gradients of one step, how many reversible layer calls it ran)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws in both runs (the reversible one replays them in backward)
    with disable_inversion() if reference else contextlib.nullcontext():
        loss = _loss(model, ids)
        calls = len(reversible_nodes(loss))
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, calls


def build(family: str, layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """The family's tiny causal LM in float64, in train mode."""
    config = tiny_config(family, num_hidden_layers=layers)
    with torch.device("meta"):
        size = sum(p.numel() for p in tiny_model_from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still builds {size / 1e6:.0f} M parameters")
    torch.manual_seed(seed)
    return tiny_model_from_config(config).to(torch.float64).train()


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def run_family(family: str, scheme: str | None = None, layers: int = 3, seed: int = 0) -> ZooResult:
    """Build, convert and check one family (see the module docstring for the outcomes)."""
    try:
        model = build(family, layers, seed)
        ids = torch.randint(3, model.get_input_embeddings().num_embeddings, (2, 8),
                            generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            if not torch.isfinite(_loss(model, ids)):  # no reference to compare with
                raise ValueError("the tiny model's float64 loss is not finite")
    except Exception as err:  # a config or model transformers itself cannot build tiny, or run in float64
        return ZooResult(family, NOT_BUILT, reason=_first_line(err))
    try:
        plan = analyze(model)
    except RevcompileError as err:  # no layer stack
        return ZooResult(family, SKIPPED, reason=str(err))
    if not plan.pairs:
        return ZooResult(family, SKIPPED, layers=len(plan.skipped), reason=plan.reasons())
    with torch.no_grad():
        in_float32 = computes_in_float32([p.module for p in plan.pairs], lambda: _loss(model, ids))
    try:
        make_reversible(model, **({} if scheme is None else {"scheme": scheme}))
    except Exception:
        return ZooResult(family, CRASHED, reason="conversion: " + traceback.format_exc(limit=-3))
    plan = model._revcompile_plan
    result = ZooResult(family, CONVERTED, layers=len(plan.pairs) + len(plan.skipped),
                       converted=len(converted_layers(model)), bound=FLOAT32 if in_float32 else FLOAT64,
                       forms=Counter(p.form for p in plan.pairs), schemes=Counter(p.scheme for p in plan.pairs),
                       reason=plan.reasons() if plan.skipped else "")
    try:
        (grads, calls), (reference, _) = _grads(model, ids, False), _grads(model, ids, True)
    except Exception:
        result.status, result.reason = CRASHED, "training step: " + traceback.format_exc(limit=-3)
        return result
    if calls != result.converted:  # the comparison means nothing unless backward did rebuild every layer
        result.status, result.reason = MISMATCH, f"{calls} reversible layer calls for {result.converted} layers"
        return result
    if grads.keys() != reference.keys():
        result.status, result.reason = MISMATCH, f"gradients of {sorted(grads.keys() ^ reference.keys())} differ"
        return result
    largest = max(float(g.abs().max()) for g in reference.values())
    result.error = max(float((grads[n] - reference[n]).abs().max()) for n in reference) / max(largest, 1e-300)
    if not result.error <= BOUND[result.bound]:
        result.status = MISMATCH
    return result
