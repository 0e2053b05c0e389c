"""A converted layer's outputs beside its hidden state: Hugging Face's output capture (`output_router_logits`,
`output_attentions`, `output_hidden_states`) and the layer's own other outputs. (The torch.compile backend's
layers collect the router logits their MoE branch hands out the same way.)

transformers v5 collects such outputs with forward hooks into a collector that is active during one model call
(a context variable). Two consequences for reversible layers:
- router logits and attention weights recorded during the Function's no-grad forward carry no gradient. The
  Function returns them as extra outputs, which gives those very tensors a gradient path into its backward; there
  the recompute records them again into a private collector (so the user's lists are never appended twice) and
  the gradient of a loss on them (the load-balancing loss) flows through them;
- hidden states recorded between converted layers would be packed streams, not hidden states: the next converted
  layer puts in their place the hidden state they merge into, which the layer that made them also returns (from its
  reversible Function in training, so that a loss on it reaches backward: `layer._record_hidden_state`).
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

ROUTER_LOGITS, HIDDEN_STATES = "router_logits", "hidden_states"
# what Hugging Face collects from inside a converted layer's branches that may carry gradient (a load-balancing loss,
# an attention-transfer loss): the reversible Function returns them and its backward recomputes them
GRADIENT_OUTPUTS = (ROUTER_LOGITS, "attentions", "cross_attentions")
_CAPTURING = "transformers.utils.output_capturing"  # a private module of transformers v5
# a collector of our own while transformers is not imported: the torch.compile backend collects the router logits
# its layers hand out (`backend.HandsOut`) in plain PyTorch models too
_OWN_COLLECTOR: ContextVar[dict | None] = ContextVar("revcompile_collector", default=None)


def is_cache(value: Any) -> bool:
    """Is `value` a Hugging Face KV cache (`transformers.Cache`, checked by name: transformers stays unimported)?"""
    return _is_cache_class(type(value))


@functools.cache  # (asked for every argument of every compiled branch call)
def _is_cache_class(cls: type) -> bool:
    return any(base.__name__ == "Cache" and base.__module__.startswith("transformers") for base in cls.__mro__)


def _collector_variable() -> ContextVar:
    """transformers' collector context variable, or our own while that module is not imported (importing
    transformers here would cost every `import revcompile` seconds)."""
    module = sys.modules.get(_CAPTURING)
    return getattr(module, "_active_collector", None) or _OWN_COLLECTOR


def active_collector() -> dict | None:
    """The collector of the model call in progress, or None."""
    return _collector_variable().get()


@contextmanager
def private_collector(*keys: str):
    """A fresh collector for `keys` while the block runs (used by the backward recompute)."""
    collected: dict[str, list] = {key: [] for key in keys}
    variable = _collector_variable()
    token = variable.set(collected)
    try:
        yield collected
    finally:
        variable.reset(token)


# A layer's other outputs (beside its hidden state: DSA's top-k indices, RWKV's recurrent state, attention weights)
# are computed by the branch that makes them (plan.with_other_outputs), which returns them through this sink while a
# converted layer's forward runs the scheme's steps; a backward recompute puts them into a sink of its own (to take
# their gradients in), a fixed-point iteration nowhere.
_OTHER_OUTPUTS: ContextVar[dict | None] = ContextVar("revcompile_other_outputs", default=None)


def other_outputs_sink() -> dict | None:
    """The sink of the converted layer call in progress, or None."""
    return _OTHER_OUTPUTS.get()


@contextmanager
def other_outputs_into(sink: dict | None):
    """While the block runs, branches that make other outputs of their layer put them into `sink` (None: nowhere),
    by position in the layer's output."""
    token = _OTHER_OUTPUTS.set(sink)
    try:
        yield sink
    finally:
        _OTHER_OUTPUTS.reset(token)


class OtherOutputs(nn.Module):
    """A branch returning `(update, *values)`, called as one returning `update`: the values go into the active sink
    at their `positions` in the layer's output.

    NOTE: a scheme branch that contains one runs in one piece (`runs_whole`, `function.step_pieces`): values made
    in slices would need joining by a layout nobody knows (a recurrent state filled in place is one object).
    """

    def __init__(self, branch: nn.Module, positions: tuple[int, ...]):
        super().__init__()
        self.branch, self.positions = branch, positions

    def forward(self, *args):
        update, *values = self.branch(*args)
        sink = _OTHER_OUTPUTS.get()
        if sink is not None:
            sink.update(zip(self.positions, values))
        return update


_RUNS_WHOLE = "_revcompile_runs_whole"


def mark_whole(branches: dict[str, nn.Module]) -> None:
    """Mark the scheme branches that make other outputs of their layer (they contain an OtherOutputs)."""
    for branch in branches.values():
        if any(isinstance(m, OtherOutputs) for m in branch.modules()):
            setattr(branch, _RUNS_WHOLE, True)


def runs_whole(branch: nn.Module) -> bool:
    return getattr(branch, _RUNS_WHOLE, False)
