"""Hugging Face's output capture, seen from reversible layers: `output_router_logits` and `output_hidden_states`.
(The torch.compile backend's layers collect the router logits their MoE branch hands out the same way.)

transformers v5 collects such outputs with forward hooks into a collector that is active during one model call
(a context variable). Two consequences for reversible layers:
- router logits recorded during the Function's no-grad forward carry no gradient. The Function returns them as
  extra outputs, which gives those very tensors a gradient path into its backward; there the recompute records
  the router logits again into a private collector (so the user's lists are never appended twice) and the
  load-balancing loss's gradient flows through them;
- hidden states recorded between converted layers would be packed streams, not hidden states: that is a clear
  error instead.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

ROUTER_LOGITS = "router_logits"
_CAPTURING = "transformers.utils.output_capturing"  # a private module of transformers v5
# a collector of our own while transformers is not imported: the torch.compile backend collects the router logits
# its layers hand out (`backend.HandsOut`) in plain PyTorch models too
_OWN_COLLECTOR: ContextVar[dict | None] = ContextVar("revcompile_collector", default=None)


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
