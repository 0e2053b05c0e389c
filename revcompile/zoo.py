"""The zoo: every causal-LM family of the installed transformers, built tiny, converted, gradients checked.

Families come from transformers' own auto-mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), never a hand list. For
each: a tiny config (`models.tiny_config`), random weights, two training steps with inversion (the second records
routing only where the first found it) against the same converted model under `disable_inversion()`, in one of
three precisions (`PRECISIONS`): float64 weights; bfloat16 weights; float32 weights under bfloat16 autocast. The
16-bit runs use exact streams (the default there), so their gradients must equal the reference's bit for bit. In
float64 two more checks: a copy converted with max_run=1 computes the unconverted model's logits, loss, gradients
and greedy generate() tokens (the rewrite of the layers and of the head changes nothing), and the model, trained
one step, saved and loaded by `revcompile.from_pretrained`, computes the same logits. The outcome is one of

- converted:   the gradients agree (relative to the largest reference gradient) within the bound,
- mismatch:    they do not, or a float64 check fails (a defect),
- crashed:     conversion or the step raised (a defect),
- skipped:     no layer converts; the plan's reasons say why,
- not built:   the tiny config or model cannot be built, or the unconverted model cannot run a finite loss in
               that precision (transformers' own error is shown).

Example:
    >>> from revcompile.zoo import causal_lm_families, run_family
    >>> run_family("mixtral").status
    'converted'
    >>> run_family("mixtral", precision="bfloat16").error    # exact streams: bit for bit
    0.0
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from .api import analyze, converted_layers, make_reversible
from .capture.probe import eval_mode
from .check import TOLERANCE
from .errors import RevcompileError, describe
from .models import tiny_config, tiny_model_from_config
from .passes.residuals import PARALLEL
from .runtime.layer import disable_inversion

# NOTE: the bounds, from the measured errors of the whole zoo (bench/results/zoo.md) and of the worst families over
# seeds and schemes. A layer computing only in float64 rebuilds its input to float64 rounding: at most ~1e-15
# measured, bound 1e-8. Most layers compute something in float32 even in a float64 model (RMSNorm casts to
# float32, routers and softmaxes often do): the recompute on a rebuilt input rounds those float32 values
# differently. Worst measured: 4.9e-6 (cpmant, seed 1) and 3.8e-6 (beam, a float32 DeepSeek-style router, leapfrog
# over whole layers); bound 1e-4, the project's float32 tolerance (tests/conftest.py). A wrong inverse (an undo off
# by 1e-3, tests/test_zoo.py) lands far above both.
# In bfloat16 (weights, or autocast) the streams are exact integers: backward rebuilds every input bit for bit and
# recomputes each branch on it with the forward's routing and RNG, so every converted layer's gradients equal the
# reference's bit for bit; any difference is a defect (the zoo measured 0 in every family, seed 0 on 2 threads and
# seed 1 on 1 thread). Gradients outside the layers summed over several of them may differ by rounding (run_family).
# Conversion itself changes nothing where each layer is its own run (max_run=1: symplectic on a sequential layer
# and midpoint on a whole one then compute the layer as it was): over the zoo's 173 such families, logits measured
# equal to 9.5e-16 relative (bound 1e-8), the loss of a training step to 1.4e-7 and its gradients to 3.3e-7 (bounds
# 1e-5: Hugging Face's loss casts float64 logits to float32, the chunked head keeps float64). Parallel layers are
# not compared: their pair scheme runs M after A by design.
FLOAT64, FLOAT32, BIT_FOR_BIT = "float64", "float32 inside", "bit for bit"
ORIGINAL_BOUND = {"logits": 1e-8, "loss": 1e-5, "gradients": 1e-5}
# generate() on that copy: transformers' own fails at the tiny config; it fails converted (a loud limitation; RWKV's
# did until converted layers returned the recurrent state their branch fills); the same greedy tokens; other tokens
# (a silent change: a mismatch)
GENERATE_OUTCOMES = ("fails unconverted", "fails converted", "same tokens", "other tokens")
# A trained converted model saved and loaded with revcompile.from_pretrained computes what it did: logits measured
# equal bit for bit in 174 of 180 families; the others (hy_v4, deepseek_v4, bailing_hybrid, flint, inkling_text,
# dbrx) differ by at most 2.4e-7, as their unconverted models do through transformers' own round trip (parameters
# it stores in another precision). Bound 1e-5 (one seed measured: a margin of 40); a checkpoint that loads other
# weights or converts otherwise lands far above (1e-2 and more).
RELOAD_BOUND = 1e-5
BOUND = {FLOAT64: 1e-8, FLOAT32: 1e-4, BIT_FOR_BIT: 0.0}
# precision -> (weights' dtype, autocast dtype or None)
PRECISIONS = {"float64": (torch.float64, None), "bfloat16": (torch.bfloat16, None),
              "bf16 autocast": (torch.float32, torch.bfloat16)}
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
    layer_error: float | None = None  # the same over the converted layers' parameters only
    original_error: dict[str, float] | None = None  # max_run=1 against the unconverted model (float64)
    generate: str | None = None  # max_run=1's greedy generate() against the unconverted model's (GENERATE_OUTCOMES)
    reload_error: float | str | None = None  # trained, saved, from_pretrained: logits error, or transformers' error
    bound: str = FLOAT64  # FLOAT32 where a layer computes in float32 (a router, a norm) inside the float64 model
    reason: str = ""
    precision: str = "float64"


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


def _logits(model, ids) -> torch.Tensor:
    with eval_mode(model), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _outputs(model, ids) -> dict[str, torch.Tensor]:
    """Logits in eval mode; the loss and every parameter's gradient (flattened, in name order) of one training step
    with labels (the chunked head's path)."""
    logits = _logits(model, ids)
    loss, grads, _ = _step(model, ids)
    model.zero_grad(set_to_none=True)
    gradients = torch.cat([grads[name].flatten() if name in grads else torch.zeros(p.numel(), dtype=p.dtype)
                           for name, p in sorted(model.named_parameters())])
    return {"logits": logits, "loss": loss, "gradients": gradients}


def _generated(model, ids) -> torch.Tensor | str:
    """Greedy generate() of 4 tokens with the KV cache after the first sequence of `ids`, or its error."""
    try:
        with eval_mode(model), torch.no_grad():
            return model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    except Exception as err:
        return describe(err, 200)


def _against_original(family: str, layers: int, seed: int, ids: torch.Tensor, original: dict[str, torch.Tensor],
                      tokens: torch.Tensor | str) -> tuple[dict[str, float], str]:
    """Another copy converted with max_run=1 against the unconverted model: the relative errors of its outputs, and
    whether greedy generation gives the same tokens (GENERATE_OUTCOMES)."""
    model = make_reversible(build(family, layers, seed), max_run=1)
    errors = {name: float((value - original[name]).abs().max() / original[name].abs().max())
              for name, value in _outputs(model, ids).items()}
    generated = _generated(model, ids)
    if isinstance(tokens, str):
        return errors, f"{GENERATE_OUTCOMES[0]}: {tokens}"
    if isinstance(generated, str):
        return errors, f"{GENERATE_OUTCOMES[1]}: {generated}"
    return errors, GENERATE_OUTCOMES[2] if torch.equal(generated, tokens) else GENERATE_OUTCOMES[3]


def _reload_error(model, ids) -> float | str:
    """Save a trained converted model and load it with revcompile.from_pretrained: the relative error of its logits,
    or the error of transformers, which cannot load some families from a directory (a text sub-config)."""
    from transformers import AutoModelForCausalLM

    from .saving import from_pretrained

    expected = _logits(model, ids)
    config = model.config
    implementations = {"attn_implementation": config._attn_implementation}
    if getattr(config, "_experts_implementation", None):
        implementations["experts_implementation"] = config._experts_implementation
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        try:
            loaded = from_pretrained(path, dtype=torch.float64, **implementations)
        except RevcompileError:
            # a defect of revcompile, unless transformers' own model loaded alike cannot run (XLNet loaded in float64
            # makes its positions in float32, and revcompile's probe run fails with it)
            try:
                _logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **implementations), ids)
            except Exception as err:
                return describe(err, 200)
            raise
        except Exception as err:
            return describe(err, 200)
    return float((_logits(loaded, ids) - expected).abs().max() / expected.abs().max())


def _autocast(precision: str):
    autocast = PRECISIONS[precision][1]
    return torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()


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


def _step(model, ids, reference: bool = False, precision: str = "float64"
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, gradients of one training step, how many reversible layer calls it ran), seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws in both runs (the reversible one replays them in backward)
    with disable_inversion() if reference else contextlib.nullcontext(), _autocast(precision):
        loss = _loss(model, ids)
        calls = len(reversible_nodes(loss))
        loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, \
        calls


def build(family: str, layers: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The family's tiny causal LM in `dtype`, in train mode."""
    config = tiny_config(family, num_hidden_layers=layers)
    with torch.device("meta"):
        size = sum(p.numel() for p in tiny_model_from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still builds {size / 1e6:.0f} M parameters")
    torch.manual_seed(seed)
    return tiny_model_from_config(config, dtype).train()


def run_family(family: str, scheme: str | None = None, layers: int = 3, seed: int = 0,
               precision: str = "float64") -> ZooResult:
    """Build, convert and check one family in `precision` (one of PRECISIONS; see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    try:
        model = build(family, layers, seed, PRECISIONS[precision][0])
        # (token ids the head predicts: CPM-Ant's input embedding also holds prompt tokens beyond the vocabulary)
        embedded = model.get_input_embeddings().num_embeddings
        vocab = min(embedded, getattr(model.config.get_text_config(), "vocab_size", None) or embedded)
        ids = torch.randint(3, vocab, (2, 8),
                            generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad(), _autocast(precision):
            if not torch.isfinite(_loss(model, ids)):  # no reference to compare with
                raise ValueError(f"the tiny model's {precision} loss is not finite")
    except Exception as err:  # a config or model transformers itself cannot build tiny, or run in this precision
        return ZooResult(family, NOT_BUILT, reason=describe(err, 200), precision=precision)
    try:
        plan = analyze(model)
    except RevcompileError as err:  # no layer stack
        return ZooResult(family, SKIPPED, reason=str(err), precision=precision)
    if not plan.pairs:
        return ZooResult(family, SKIPPED, layers=len(plan.skipped), reason=plan.reasons(), precision=precision)
    original = None
    if precision == "float64":
        with torch.no_grad():
            bound = FLOAT32 if computes_in_float32([p.module for p in plan.pairs], lambda: _loss(model, ids)) \
                else FLOAT64
        if scheme is None and all(p.form != PARALLEL for p in plan.pairs):
            original, tokens = _outputs(model, ids), _generated(model, ids)
    else:
        bound = BIT_FOR_BIT
    try:
        make_reversible(model, **({} if scheme is None else {"scheme": scheme}))
    except Exception:
        return ZooResult(family, CRASHED, reason="conversion: " + traceback.format_exc(limit=-3),
                         precision=precision)
    plan = model._revcompile_plan
    result = ZooResult(family, CONVERTED, layers=len(plan.pairs) + len(plan.skipped),
                       converted=len(converted_layers(model)), bound=bound,
                       forms=Counter(p.form for p in plan.pairs), schemes=Counter(p.scheme for p in plan.pairs),
                       reason=plan.reasons() if plan.skipped else "", precision=precision)
    if original is not None:
        try:
            result.original_error, result.generate = _against_original(family, layers, seed, ids, original, tokens)
        except Exception:
            result.status, result.reason = CRASHED, "max_run=1 copy: " + traceback.format_exc(limit=-3)
            return result
        changed = [name for name, error in result.original_error.items() if not error <= ORIGINAL_BOUND[name]]
        changed += ["generated tokens"] if result.generate == GENERATE_OUTCOMES[3] else []
        if changed:
            result.status, result.reason = MISMATCH, f"converted with max_run=1, its {' and '.join(changed)} " \
                                                      f"differ from the unconverted model's: {result.original_error}"
            return result
    try:
        # two steps with inversion: the first records routing over every op of a branch, the second only inside
        # the module where the first found its selections (runtime/replay.py); both must equal the reference
        (_, first, calls), (_, second, _) = _step(model, ids, False, precision), _step(model, ids, False, precision)
        _, reference, _ = _step(model, ids, True, precision)
    except Exception:
        result.status, result.reason = CRASHED, "training step: " + traceback.format_exc(limit=-3)
        return result
    names = {id(p): n for n, p in model.named_parameters()}
    in_layers = [{names[id(p)] for p in layer.parameters()} for layer in converted_layers(model)]
    # the comparison means nothing unless backward rebuilt every layer the loss depends on (a layer whose output
    # never reaches the loss, as BLT's entropy patcher's, has no gradient and no backward)
    used = sum(1 for params in in_layers if params & reference.keys())
    if calls != used:
        result.status, result.reason = MISMATCH, f"{calls} reversible layer calls for {used} layers the loss uses"
        return result
    if first.keys() != reference.keys() or second.keys() != reference.keys():
        differ = (first.keys() | second.keys()) ^ reference.keys()
        result.status, result.reason = MISMATCH, f"gradients of {sorted(differ)} differ"
        return result
    largest = max(float(g.abs().max()) for g in reference.values())

    def error(names) -> float:
        return max((float((run[n].double() - reference[n].double()).abs().max()) for n in names
                    for run in (first, second)), default=0.0) / max(largest, 1e-300)

    result.error, result.layer_error = error(reference), error(reference.keys() & set().union(*in_layers))
    if result.bound == BIT_FOR_BIT:
        # NOTE: bit for bit inside the converted layers; a gradient summed over several layers outside them (an
        # input every layer reads, as Inkling2's block states) is summed per layer here and per operator by
        # autograd, in another order: it may differ by rounding, within the weights' dtype's tolerance
        if result.layer_error > 0 or result.error > TOLERANCE[PRECISIONS[precision][0]]:
            result.status = MISMATCH
    elif not result.error <= BOUND[result.bound]:
        result.status = MISMATCH
    if precision == "float64" and result.status == CONVERTED:
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # (the reference's gradients)
        try:
            result.reload_error = _reload_error(model, ids)
        except Exception:
            result.status, result.reason = CRASHED, "save and reload: " + traceback.format_exc(limit=-3)
            return result
        if isinstance(result.reload_error, float) and not result.reload_error <= RELOAD_BOUND:
            result.status = MISMATCH
            result.reason = f"saved and loaded by revcompile.from_pretrained: logits off by {result.reload_error:.1e}"
    return result
