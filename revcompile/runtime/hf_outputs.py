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

from contextlib import contextmanager

try:  # a private module of transformers v5; without it these features simply are not offered
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover
    _active_collector = None

ROUTER_LOGITS = "router_logits"


def active_collector() -> dict | None:
    """The collector of the model call in progress, or None."""
    return _active_collector.get() if _active_collector is not None else None


@contextmanager
def private_collector(*keys: str):
    """A fresh collector for `keys` while the block runs (used by the backward recompute)."""
    collected: dict[str, list] = {key: [] for key in keys}
    if _active_collector is None:
        yield collected
        return
    token = _active_collector.set(collected)
    try:
        yield collected
    finally:
        _active_collector.reset(token)
