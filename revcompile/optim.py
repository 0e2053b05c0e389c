"""Step the optimizer inside backward, one parameter at a time, so whole-model gradient buffers never exist.

A reversible backward finishes one layer's gradients at a time. With `optimizer_in_backward`, each parameter gets
its own optimizer, stepped by a `register_post_accumulate_grad_hook` as soon as the parameter's gradient is
complete, after which the gradient is freed (torchtune's optimizer-in-backward pattern). A training step is then
just `loss.backward()`: no `optimizer.step()`, no `zero_grad()`.

Example:
    >>> opt = revcompile.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-4)
    >>> model(ids, labels=ids).loss.backward()     # every parameter stepped, every .grad None again
    >>> torch.save(opt.state_dict(), "optim.pt")   # per parameter name

What it rules out: anything that needs all gradients at once before the step, namely gradient clipping by the
global norm, and gradient accumulation over several backwards (each backward steps). A learning-rate schedule
sets `lr` in every optimizer's param_groups (`opt.set_lr(lr)`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class OptimizerInBackward:
    """One optimizer per trainable parameter (by name), stepped in backward; `remove()` detaches the hooks."""

    def __init__(self, model: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs: Any):
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._handles = []
        for name, param in model.named_parameters():  # tied weights once: their hook fires once, on the sum
            if param.requires_grad:
                optimizer = optimizer_class([param], **kwargs)
                self.optimizers[name] = optimizer
                self._handles.append(param.register_post_accumulate_grad_hook(_stepper(optimizer)))

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, dict]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def step(param: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the gradient's memory is free again before the next layer's

    return step


def optimizer_in_backward(model: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer],
                          **kwargs: Any) -> OptimizerInBackward:
    """Give every trainable parameter of `model` its own `optimizer_class(**kwargs)`, stepped inside backward.

    Example:
        >>> opt = revcompile.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-4, weight_decay=0.1)
        >>> for ids in batches:
        ...     model(ids, labels=ids).loss.backward()
    """
    return OptimizerInBackward(model, optimizer_class, **kwargs)
