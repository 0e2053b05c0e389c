"""Distributed engines on a converted model: FSDP2 and DDP compose with revcompile when they come after it.

The order that works: `make_reversible(model)` first, then `fully_shard` on each decoder layer and on the root
(FSDP2), or `DistributedDataParallel(model)`. The other orders are refused here with a RevcompileError instead of
failing later, on some ranks only, or silently:
- converting a wrapped or sharded model: the probe and the analysis run the layers around the engine's hooks
  (sharded parameters, collectives issued by some calls and not others);
- sharding a submodule of a converted layer (say its MoE block alone): the backward recompute runs that submodule
  again, and its own FSDP hooks reduce and reshard before revcompile hands its gradients over, so they are lost.

Example:
    >>> revcompile.make_reversible(model)
    >>> for layer in model.model.layers:
    ...     fully_shard(layer)
    >>> fully_shard(model)
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from .errors import RevcompileError

ORDER = ("call revcompile.make_reversible(model) first, then fully_shard each decoder layer and the root, or wrap "
         "the model in DistributedDataParallel")


@cache
def _wrappers() -> dict[type, str]:
    """Module classes of the distributed engines, with how to name what they did to a module."""
    if not torch.distributed.is_available():
        return {}
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return {FSDPModule: "sharded by fully_shard (FSDP2)",
            FullyShardedDataParallel: "wrapped in FullyShardedDataParallel (FSDP1)",
            DistributedDataParallel: "wrapped in DistributedDataParallel"}


def _wrapped(modules) -> tuple[str, str] | None:
    """(name, what the engine did) of the first of `modules` ((name, module) pairs) a distributed engine wrapped."""
    for name, module in modules:
        how = next((how for cls, how in _wrappers().items() if isinstance(module, cls)), None)
        if how is not None:
            return name, how
    return None


def refuse_wrapped(model: nn.Module, action: str) -> None:
    """Raise RevcompileError when `model` or one of its modules is already wrapped or sharded.

    action: what cannot run on such a model and what to do instead, e.g. "convert the model before wrapping it".
    """
    found = _wrapped(model.named_modules())
    if found is not None:
        name, how = found
        raise RevcompileError(f"{name or type(model).__name__} is {how}; {action}")


def refuse_sharded_inside(layer: nn.Module) -> None:
    """Raise RevcompileError when a submodule of a converted layer (not the layer itself) is wrapped or sharded."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # no engine can have wrapped anything: skip the walk over the layer's modules
    found = _wrapped((name, m) for name, m in layer.named_modules() if m is not layer)
    if found is not None:
        name, how = found
        raise RevcompileError(f"{name}, inside a converted {type(layer).__name__}, is {how}: shard whole converted "
                              "layers (fully_shard(layer) on each decoder layer, then the root), not their "
                              "submodules; the backward recompute runs those submodules again and their own hooks "
                              "would reduce their gradients before revcompile hands them over")
