"""Make a branch's recompute in backward see exactly what its forward saw: RNG state and expert choices.

RNG: dropout and router jitter draw random numbers; the state before each branch call is saved in forward and
restored around the recompute (the CPU generator and, for CUDA tensors, the device's).

Routing: a reconstructed input differs from the true one by rounding, and a near-tied router can then pick
another expert. Every selection among floating-point values a branch makes in forward (`topk`, `sort`, `argsort`,
`max` / `min` along a dim as PhiMoE's sparsemixer uses, `argmax` / `argmin` as Switch-style top-1 routers use) is
recorded (the indices: tokens x k integers) and replayed in backward: the recompute gathers its values at the
recorded indices (argmax and argsort: returns them), so gradients flow through the same router weights the forward
used. Classification also uses the recorder: a branch whose forward makes a selection is a router feeding experts,
i.e. MoE.

Autocast: the recompute runs under the autocast state of the forward (`AutocastState`), not the backward's.

Example:
    >>> out, replay = run_recorded(branch, (x,), rng=True)
    >>> again = run_replayed(branch, (x,), replay)        # same dropout mask, same experts
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from ..errors import RevcompileError


@dataclass(frozen=True)
class _Selection:
    """How a selecting function takes its dimension and what it returns: (values, indices) as `result`, or the
    indices alone (`result` None); indices of the input's rank (`keeps_rank`), or with the dimension reduced."""

    dim_position: int
    dim_default: int | None
    result: type | None
    keeps_rank: bool


_TOPK = _Selection(2, -1, torch.return_types.topk, keeps_rank=True)
_SORT = _Selection(1, -1, torch.return_types.sort, keeps_rank=True)
_ARGSORT = _Selection(1, -1, None, keeps_rank=True)
_MAX = _Selection(1, None, torch.return_types.max, keeps_rank=False)
_MIN = _Selection(1, None, torch.return_types.min, keeps_rank=False)
_ARGEXTREME = _Selection(1, None, None, keeps_rank=False)  # argmax, argmin
_SELECTIONS = {torch.topk: _TOPK, torch.Tensor.topk: _TOPK, torch.sort: _SORT, torch.Tensor.sort: _SORT,
               torch.argsort: _ARGSORT, torch.Tensor.argsort: _ARGSORT, torch.max: _MAX, torch.Tensor.max: _MAX,
               torch.min: _MIN, torch.Tensor.min: _MIN, torch.argmax: _ARGEXTREME,
               torch.Tensor.argmax: _ARGEXTREME, torch.argmin: _ARGEXTREME, torch.Tensor.argmin: _ARGEXTREME}


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _selected(func, args: tuple, kwargs: dict, result: Any) -> torch.Tensor | None:
    """The indices `result` of `func(*args, **kwargs)` (one of `_SELECTIONS`) selected among floating-point values, or
    that is no such selection (`max` of a whole tensor or of two tensors, a sort of integer expert ids).

    NOTE: a selection among integers (the expert ids Hugging Face's grouped kernels sort) is decided by the
    selections before it; recording it would keep a tokens x k index per layer for nothing.
    """
    selection = _SELECTIONS[func]
    tensor = _arg(args, kwargs, 0, "input", None)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return None
    if selection.result is None:
        return result if isinstance(result, torch.Tensor) else None
    return result.indices if isinstance(result, selection.result) else None


def _gather_selected(func, args: tuple, kwargs: dict, indices: torch.Tensor):
    """The result `func(*args, **kwargs)` would give if it had selected `indices`, values differentiable."""
    selection = _SELECTIONS[func]
    if selection.result is None:
        return indices
    tensor = _arg(args, kwargs, 0, "input", None)
    dim = _arg(args, kwargs, selection.dim_position, "dim", selection.dim_default)
    if selection.keeps_rank or _arg(args, kwargs, 2, "keepdim", False):
        return selection.result((tensor.gather(dim, indices), indices))
    return selection.result((tensor.gather(dim, indices.unsqueeze(dim)).squeeze(dim), indices))


def _compact(indices: torch.Tensor, bound: int) -> torch.Tensor:
    """Indices (all < bound) in the narrowest integer type: 64 experts fit a byte, not 8. Kept per layer."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound - 1 <= torch.iinfo(dtype).max:
            return indices.to(dtype)
    return indices


def _selection_size(func, args: tuple, kwargs: dict) -> int:
    """How many candidates a selection chooses among (the size of the selected dimension; all elements when a
    selection without a dimension, `argmax(x)`, picks one of the whole tensor)."""
    selection = _SELECTIONS[func]
    tensor = _arg(args, kwargs, 0, "input", None)
    dim = _arg(args, kwargs, selection.dim_position, "dim", selection.dim_default)
    return tensor.numel() if dim is None else tensor.shape[dim]


class RoutingRecorder(TorchFunctionMode):
    """Records the indices of every selection (top-k, max along a dim) run under it, in call order."""

    def __init__(self):
        super().__init__()
        self.choices: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func not in _SELECTIONS:  # (every op of a branch passes here: no further Python call for the common case)
            return result
        indices = _selected(func, args, kwargs, result)
        if indices is not None:
            self.choices.append(_compact(indices.detach(), _selection_size(func, args, kwargs)))
        return result


class RoutingReplayer(TorchFunctionMode):
    """Answers each selection with the recorded indices, gathering the (differentiable) values at them."""

    def __init__(self, choices: list[torch.Tensor]):
        super().__init__()
        self._choices = list(choices)
        self._next = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SELECTIONS:
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        fresh = _selected(func, args, kwargs, result)
        if fresh is None:
            return result
        if self._next >= len(self._choices) or self._choices[self._next].shape != fresh.shape:
            raise RevcompileError("routing replay: the recompute made other selections than the forward; the "
                                  "branch is not deterministic on recompute")
        indices = self._choices[self._next].to(fresh.dtype)
        self._next += 1
        return _gather_selected(func, args, kwargs, indices)


@dataclass
class RngState:
    cpu: torch.Tensor
    device: torch.device | None = None
    device_state: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        if device.type == "cuda":
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state())

    def same_as(self, other: "RngState") -> bool:
        return torch.equal(self.cpu, other.cpu) and (self.device_state is None or
                                                     torch.equal(self.device_state, other.device_state))

    @contextmanager
    def restored(self):
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


@dataclass(frozen=True)
class AutocastState:
    """The autocast state a forward ran under, to recompute under the same one."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> "AutocastState":
        return cls(device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    def restored(self):
        # NOTE: cache_enabled=False: the autocast weight cache would hand the recompute the casts made in
        # forward under no_grad, which carry no gradient to the weights.
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=False)


@dataclass
class Replay:
    """What one branch call needs to be recomputed exactly."""

    rng: RngState | None = None
    routing: list[torch.Tensor] = field(default_factory=list)


def run_recorded(branch: Callable, args: tuple, rng: bool) -> tuple[Any, Replay]:
    """Call `branch(*args)`, recording its top-k choices and (when `rng`) the RNG state before it."""
    replay = Replay(RngState.capture(args[0].device) if rng else None)
    recorder = RoutingRecorder()
    with recorder:
        out = branch(*args)
    replay.routing = recorder.choices
    if rng and replay.rng.same_as(RngState.capture(args[0].device)):
        replay.rng = None  # nothing to replay: do not keep ~5 KB per call until backward
    return out, replay


def run_replayed(branch: Callable, args: tuple, replay: Replay) -> Any:
    """Call `branch(*args)` with the RNG state and expert choices of the recorded call."""
    # NOTE: a call that made no selection (attention, a dense FFN) is recomputed without the replayer: a
    # TorchFunctionMode costs a Python call per op, and there is nothing to replay
    replayer = RoutingReplayer(replay.routing) if replay.routing else nullcontext()
    with (replay.rng.restored() if replay.rng else nullcontext()), replayer:
        return branch(*args)


CHOICES_DIFFER = ("the recompute of a compiled branch chose other experts than its forward on the same input (a "
                  "non-deterministic kernel, or weights changed between forward and backward?); make_reversible(..., "
                  "compile=False) replays the forward's choices instead")


def run_recorded_again(branch: Callable, args: tuple, replay: Replay) -> tuple[Any, torch.Tensor | None]:
    """Call `branch(*args)` with the recorded call's RNG state, recording its choices anew (the forward's graph, not
    the replayer's): (output, a 0-d bool tensor on the device, True where a choice differs from the recorded ones;
    None for a branch that makes none).

    For a recompute handed the forward's very input (exact streams) by a branch whose graph is compiled: the
    replayer would make Dynamo trace another graph, which Inductor may fuse into kernels that round otherwise. The
    comparison stays on the device (no host synchronisation per branch); the caller raises `CHOICES_DIFFER` once.
    """
    recorder = RoutingRecorder()
    with (replay.rng.restored() if replay.rng else nullcontext()), recorder:
        out = branch(*args)
    if [c.shape for c in recorder.choices] != [c.shape for c in replay.routing]:
        raise RevcompileError(CHOICES_DIFFER)
    differs = [torch.ne(a, b).any() for a, b in zip(recorder.choices, replay.routing)]
    return out, torch.stack(differs).any() if differs else None
