"""Capture: find a model's layer stacks with one real run, and trace each distinct layer with torch.fx."""

from .probe import LayerCall, Stack, default_example, example_call, find_stacks
from .tracer import LayerTrace, trace_layer

__all__ = ["LayerCall", "Stack", "default_example", "example_call", "find_stacks", "LayerTrace", "trace_layer"]
