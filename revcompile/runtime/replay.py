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

Where the recorder and replayer look: both are TorchFunctionModes, which cost a Python call per op they see. A
branch's first recorded call (per mode, train or eval, and input shape) looks at every op and notes in which module
each selection was made; later calls look only inside the innermost module that made them all (`SelectionScopes`:
Hugging Face's router, `gate`, a handful of ops out of the MoE branch's ~100) and not at all into a branch that made
none (attention). The replay of a call looks where its recording looked.

Autocast: the recompute runs under the autocast state of the forward (`AutocastState`), not the backward's.

Example:
    >>> scopes = SelectionScopes()
    >>> out, replay = run_recorded(branch, (x,), rng=True, scopes=scopes)
    >>> again = run_replayed(branch, (x,), replay)        # same dropout mask, same experts
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
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
    """Records the indices of every selection (top-k, max along a dim) run under it, in call order; with a
    `calls` stack (`_ModuleCalls`), also the modules being called at each (`where`)."""

    def __init__(self, calls: "_ModuleCalls | None" = None):
        super().__init__()
        self.choices: list[torch.Tensor] = []
        self.where: list[tuple[nn.Module, ...]] = []
        self._calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func not in _SELECTIONS:  # (every op of a branch passes here: no further Python call for the common case)
            return result
        indices = _selected(func, args, kwargs, result)
        if indices is not None:
            self.choices.append(_compact(indices.detach(), _selection_size(func, args, kwargs)))
            if self._calls is not None:
                self.where.append(tuple(self._calls.stack))
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


class _ModuleCalls:
    """While active: the modules being called, outermost first (`stack`), by global forward hooks."""

    def __init__(self):
        self.stack: list[nn.Module] = []

    def _push(self, module: nn.Module, *_) -> None:
        self.stack.append(module)

    def _pop(self, module: nn.Module, *_) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    @contextmanager
    def active(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = [register_module_forward_pre_hook(self._push),
                   register_module_forward_hook(self._pop, always_call=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _inside(module: nn.Module, mode: TorchFunctionMode):
    """`mode` active during every call of `module` in this block (and nowhere else)."""
    def enter(*_) -> None:  # (a hook's return value would replace the module's input or output)
        mode.__enter__()

    def leave(*_) -> None:
        mode.__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_NO_SELECTION = "no selection"  # a SelectionScopes entry: the branch's first call made none


class SelectionScopes:
    """Per branch, mode (train / eval) and input shape: where its selections are made, learned on its first
    recorded call.

    An entry is the innermost module whose calls made every selection of that call (a Hugging Face MoE's router,
    `mlp.gate`; DeepSeek-V3.2's indexer in an attention branch), or the branch itself (selections in the branch's
    own code, or in modules side by side), or `_NO_SELECTION` (attention, a dense FFN). Later calls record inside
    that module alone (looked up at its path in the branch each call: a module replaced there is learned anew), or
    not at all.

    NOTE: what the first call shows is taken as the branch's habit: which ops a branch runs is fixed by its code,
    its mode, its config (top-k, group-limited routing, PhiMoE's sparsemixer in training or eval) and the shapes it
    is called on (a top-k over min(k, sequence length) keys), hence the key; not by the values it sees. A branch
    that selected only on some values, outside the module its first call selected in, would have those choices
    neither recorded nor replayed: with exact streams (bf16, the default there) the recompute sees the forward's
    input bit for bit and chooses alike; with float streams a near tie could flip.
    """

    def __init__(self):
        # (branch, training, input shape) -> (the module it selects in, or _NO_SELECTION; its path in the branch)
        self._learned: dict[tuple[nn.Module, bool, torch.Size], tuple[nn.Module | str, str]] = {}

    def record(self, branch: nn.Module, args: tuple, training: bool) -> tuple[Any, list, nn.Module | None]:
        """Call `branch(*args)`, recording its selections: (output, choices, the module they were recorded in; None:
        the whole call).

        A module no longer found where it was (replaced after the first step: an adapter library wrapping the
        router, a user's surgery) is learned anew, on this call; its hooks would never fire, and the branch's
        selections would go unrecorded."""
        key = (branch, training, args[0].shape)
        scope, path = self._learned.get(key, (None, ""))
        if scope is not None and scope is not _NO_SELECTION and _submodule(branch, path) is not scope:
            scope = None
        if scope is None:  # the first call: record everything, and where
            with _ModuleCalls().active() as calls, RoutingRecorder(calls) as recorder:
                out = branch(*args)
            self._learned[key] = _innermost(recorder.where, branch) if recorder.choices else (_NO_SELECTION, "")
            return out, recorder.choices, None
        if scope is _NO_SELECTION:
            return branch(*args), [], None
        recorder = RoutingRecorder()
        with _inside(scope, recorder):
            out = branch(*args)
        return out, recorder.choices, scope


def _submodule(branch: nn.Module, path: str) -> nn.Module | None:
    try:
        return branch.get_submodule(path)
    except AttributeError:
        return None


def _innermost(where: list[tuple[nn.Module, ...]], branch: nn.Module) -> tuple[nn.Module, str]:
    """The innermost module of `branch` on every one of the call stacks `where`, and its path in the branch (the
    branch itself, "", when none is common)."""
    common = branch
    for modules in zip(*where):
        if any(module is not modules[0] for module in modules):
            break
        common = modules[0]
    return next(((module, name) for name, module in branch.named_modules() if module is common), (branch, ""))


@dataclass
class Replay:
    """What one branch call needs to be recomputed exactly: its RNG state, its choices, and the module they were
    recorded in (None: the whole call)."""

    rng: RngState | None = None
    routing: list[torch.Tensor] = field(default_factory=list)
    scope: nn.Module | None = None


def run_recorded(branch: Callable, args: tuple, rng: bool, scopes: SelectionScopes | None = None,
                 training: bool = True) -> tuple[Any, Replay]:
    """Call `branch(*args)`, recording its top-k choices and (when `rng`) the RNG state before it; with `scopes`
    (an eager nn.Module branch), only where its selections are made (`SelectionScopes`), else over the whole call
    (a compiled branch: Dynamo traces the mode, at no cost per op)."""
    replay = Replay(RngState.capture(args[0].device) if rng else None)
    if scopes is not None:
        out, replay.routing, replay.scope = scopes.record(branch, args, training)
    else:
        with RoutingRecorder() as recorder:
            out = branch(*args)
        replay.routing = recorder.choices
    if rng and replay.rng.same_as(RngState.capture(args[0].device)):
        replay.rng = None  # nothing to replay: do not keep ~5 KB per call until backward
    return out, replay


def run_replayed(branch: Callable, args: tuple, replay: Replay) -> Any:
    """Call `branch(*args)` with the RNG state and expert choices of the recorded call."""
    # NOTE: a call that made no selection (attention, a dense FFN) is recomputed without the replayer: a
    # TorchFunctionMode costs a Python call per op, and there is nothing to replay
    replayer = nullcontext()
    if replay.routing:
        mode = RoutingReplayer(replay.routing)
        replayer = mode if replay.scope is None else _inside(replay.scope, mode)
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
