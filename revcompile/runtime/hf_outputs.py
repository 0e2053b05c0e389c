"""Hugging Face's output capture, seen from reversible layers: `output_router_logits` and `output_hidden_states`.

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

ROUTER_LOGITS = "router_logits"
_CAPTURING = "transformers.utils.output_capturing"  # a private module of transformers v5


def _collector_variable():
    """transformers' collector context variable, or None while that module is not imported (nothing can be
    collecting then; importing transformers here would cost every `import revcompile` seconds)."""
    module = sys.modules.get(_CAPTURING)
    return getattr(module, "_active_collector", None)


def active_collector() -> dict | None:
    """The collector of the model call in progress, or None."""
    variable = _collector_variable()
    return variable.get() if variable is not None else None


@contextmanager
def private_collector(*keys: str):
    """A fresh collector for `keys` while the block runs (used by the backward recompute)."""
    collected: dict[str, list] = {key: [] for key in keys}
    variable = _collector_variable()
    if variable is None:
        yield collected
        return
    token = variable.set(collected)
    try:
        yield collected
    finally:
        variable.reset(token)
