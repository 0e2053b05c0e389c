"""`revcompile.check(model, batch)`: how exact is inversion on this model, in this dtype, layer by layer?

One training step with inversion and one under `disable_inversion()` (the same coupled computation with ordinary
autograd) on the same batch. Per converted layer: the relative error of the input that backward rebuilt against
the true input, and the relative error and cosine of the layer's parameter gradients against the reference.
Reconstruction error grows with depth and in low precision; check() measures it instead of hiding it, and warns
when the gradients are off by more than the dtype's tolerance.

Example:
    >>> report = revcompile.check(model, ids)
    >>> print(report)
    >>> report.worst_grad_error
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tabulate import tabulate
from torch import nn

from .api import converted_layers
from .errors import RevcompileError, describe
from .runtime.layer import InversionStats, disable_inversion, observe_reconstruction
from .runtime.replay import RngState

# Gradient relative error beyond which check() warns, by parameter dtype.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class LayerCheck:
    layer: str
    input_error: float
    grad_error: float
    grad_cosine: float
    converged: float | None = None  # implicit schemes: fraction of fixed-point inversions that converged in forward


@dataclass
class CheckReport:
    """Per-layer figures of one check(); `print(report)` shows them as a table."""

    dtype: torch.dtype
    loss: float
    reference_loss: float
    layers: list[LayerCheck]

    @property
    def worst_grad_error(self) -> float:
        return max(r.grad_error for r in self.layers)

    @property
    def worst_input_error(self) -> float:
        return max(r.input_error for r in self.layers)

    @property
    def exact(self) -> bool:
        """Backward rebuilt every layer's input bit for bit (exact streams do, in any dtype)."""
        return all(r.input_error == 0 for r in self.layers)

    @property
    def tolerance(self) -> float:
        """The gradient error check() accepts for this dtype (TOLERANCE)."""
        return TOLERANCE.get(self.dtype, 1e-4)

    @property
    def within_tolerance(self) -> bool:
        return self.worst_grad_error <= self.tolerance

    def __str__(self) -> str:
        headers = ["layer", "rebuilt input rel. error", "grad rel. error", "grad cosine"]
        rows = [[r.layer, r.input_error, r.grad_error, r.grad_cosine] for r in self.layers]
        if any(r.converged is not None for r in self.layers):  # which layers fell back to keeping their input
            headers.append("fixed point converged")
            rows = [row + [r.converged] for row, r in zip(rows, self.layers)]
        tolerance = self.tolerance
        verdict = "within" if self.within_tolerance else "EXCEEDS"
        rebuilt = "exact: every layer's input rebuilt bit for bit" if self.exact else \
            f"worst rebuilt input error {self.worst_input_error:.3g}"
        return (f"revcompile check ({str(self.dtype).replace('torch.', '')}): loss {self.loss:.6g} with inversion, "
                f"{self.reference_loss:.6g} without\n"
                + tabulate(rows, headers=headers, floatfmt=".3g")
                + f"\n{rebuilt}; " + ("gradients bit-identical to the reference" if self.worst_grad_error == 0 else
                                      f"worst gradient error {self.worst_grad_error:.3g}: {verdict} the tolerance "
                                      f"{tolerance:g} for {str(self.dtype).replace('torch.', '')}"))


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    if hasattr(model, "config"):
        return model(batch, labels=batch).loss
    raise RevcompileError("pass loss_fn=(model, batch) -> loss for a model that is not a Hugging Face causal LM")


def _flat_grads(module: nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flattened; zeros where there is none (a parameter whose output went unused)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in module.parameters()])


def check(model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
          autocast: torch.dtype | None = None) -> CheckReport:
    """Compare one step with inversion against the reference, per converted layer (gradients are left zeroed).

    batch:    token ids (Hugging Face causal LMs: labels = ids), or a dict of model keyword arguments.
    loss_fn:  (model, batch) -> scalar loss, for other models.
    autocast: run both steps under torch.autocast with this dtype (weights stay as they are).
    """
    layers = converted_layers(model)
    if not layers:
        raise RevcompileError("check() needs a model converted by revcompile.make_reversible")
    names = {m: n for n, m in model.named_modules()}
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    rebuilt: dict[nn.Module, float] = {}

    def record(layer, error):
        rebuilt[layer] = error

    def step(reference: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        cast = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
        with (disable_inversion() if reference else observe_reconstruction(record)), cast:
            try:
                loss = loss_fn(model, batch)
            except RevcompileError:
                raise
            except Exception as err:
                raise RevcompileError(f"check(): the model could not run this batch ({describe(err)}); pass token "
                                      "ids of shape (batch, seq), a dict of the model's keyword arguments, or "
                                      "loss_fn=(model, batch) -> loss") from err
        try:
            with disable_inversion() if reference else observe_reconstruction(record):
                loss.backward()
        except RevcompileError as err:
            raise RevcompileError(f"check(): the reversible backward failed: {err}") from err
        return float(loss.detach()), [_flat_grads(layer) for layer in layers]

    for layer in layers:  # count this check's fixed-point inversions only
        layer._revcompile.inversions = InversionStats()
    training = model.training
    model.train()
    # NOTE: both steps draw the same random numbers (dropout, a router that samples its experts); a reference with
    # other dropout masks differed by 0.45 in bf16 and blamed the precision.
    start = RngState.capture(device)
    try:
        with start.restored():
            loss, grads = step(reference=False)
        with start.restored():
            reference_loss, reference_grads = step(reference=True)
    finally:
        model.train(training)
        model.zero_grad(set_to_none=True)
    rows = []
    for layer, g, r in zip(layers, grads, reference_grads):
        error = float((g - r).norm() / r.norm().clamp_min(1e-300))
        cosine = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
        stats = layer._revcompile.inversions if layer._revcompile.scheme.implicit else None
        rows.append(LayerCheck(names[layer], rebuilt.get(layer, float("nan")), error, cosine,
                               stats.converged_fraction if stats else None))
    dtype = autocast or next(model.parameters()).dtype
    report = CheckReport(dtype, loss, reference_loss, rows)
    if not report.within_tolerance:  # NOTE: an unreplayable RNG or a non-deterministic op shows up here
        worst = max(rows, key=lambda r: r.grad_error)
        warnings.warn(f"revcompile.check: gradients of {worst.layer} differ from the reference by "
                      f"{worst.grad_error:.3g} (more than {report.tolerance:g} for {dtype}); see the report, and "
                      "prefer a higher precision for the streams or fewer layers per reversible run", stacklevel=2)
    return report
