"""MEFT1, MEFT2, MEFT3 (Liao, Tan, Monz, NeurIPS 2023): reversible couplings with adapters that keep the
pretrained model's starting point.

The hidden state is duplicated into (x1, x2) = (h, h) and each layer computes

    y1 = lam * x1 + F(x2)        y2 = beta * x2 + G(y1)

    MEFT1: F = the pretrained layer + adapter, G = adapter;       lam 0.1, beta 1;   output [y2, y1]
    MEFT2: F = adapter, G = the pretrained layer + adapter;       lam 1,   beta 0.1; output [y2, y1]
    MEFT3: F = attention + adapter, G = FFN/MoE + adapter;        lam 0.1, beta 0.1; output [y1, y2]

"The pretrained layer" includes its residual connection (x + f(x)): in the step algebra that is the step's mix
term, and the branch is f(x) + adapter(x). Adapters are Linear(d, r) -> ReLU -> Linear(r, d) with the up
projection zero-initialised, so they add nothing until trained. The undo divides by lam and beta: the small one
amplifies reconstruction error by its inverse at every layer (check() measures it).

Merge (our choice, measured in bench/schemes.py): the paper averages the two output streams; at initialisation
one of them is the previous layer's state, so the average blends layers N and N-1. merge="main" (the default)
takes the stream that carries the last pretrained layer's output instead; merge="mean" is the paper's.
"""

from dataclasses import dataclass

from ..coupling import Scheme, Step
from .branches import Adapter, AdapterBranch, WithAdapter
from .config import SchemeConfig

_ACTIVATIONS = ("relu", "gelu", "silu")


@dataclass(frozen=True)
class MEFTConfig(SchemeConfig):
    """lam, beta: the coefficients of x1 and x2; rank, activation: the adapters'; merge: "main" or "mean"."""

    lam: float = 0.1
    beta: float = 0.1
    rank: int = 8
    activation: str = "relu"
    merge: str = "main"

    def __post_init__(self):
        self.require(self.lam != 0, "lam must be non-zero: the inverse divides by it")
        self.require(self.beta != 0, "beta must be non-zero: the inverse divides by it")
        self.require(isinstance(self.rank, int) and self.rank >= 1, "rank must be a positive integer")
        self.require(self.activation in _ACTIVATIONS, f"activation must be one of {', '.join(_ACTIVATIONS)}")
        self.require(self.merge in ("main", "mean"), 'merge must be "main" or "mean"')

    def new_modules(self, hidden: int) -> dict:
        return {"adapter_f": Adapter(hidden, self.rank, self.activation),
                "adapter_g": Adapter(hidden, self.rank, self.activation)}

    def _scheme(self, steps, output_order, main, branch_roles, compose, description) -> Scheme:
        return Scheme(
            name=self.name, streams=("x1", "x2"), open={"x1": 1.0, "x2": 1.0}, steps=steps,
            merge={main: 1.0} if self.merge == "main" else {"x1": 0.5, "x2": 0.5}, output_order=output_order,
            branch_roles=branch_roles, compose=compose, new_modules=self.new_modules,
            description=description)


@dataclass(frozen=True)
class MEFT1Config(MEFTConfig):
    name = "meft1"
    lam: float = 0.1
    beta: float = 1.0

    def scheme(self) -> Scheme:
        return self._scheme(
            steps=(Step("x1", "x2", "layer", scale=self.lam, mix=(("x2", 1.0),)),
                   Step("x2", "x1", "adapter", scale=self.beta)),
            output_order=("x2", "x1"), main="x2",
            branch_roles={"layer": ("layer",), "adapter": ()},
            compose=lambda roles, extra: {"layer": WithAdapter(roles["layer"], extra["adapter_f"]),
                                          "adapter": AdapterBranch(extra["adapter_g"])},
            description=f"y1 = {self.lam:g} x1 + layer(x2) + adapter; y2 = {self.beta:g} x2 + adapter(y1); [y2, y1]")


@dataclass(frozen=True)
class MEFT2Config(MEFTConfig):
    name = "meft2"
    lam: float = 1.0
    beta: float = 0.1

    def scheme(self) -> Scheme:
        return self._scheme(
            steps=(Step("x1", "x2", "adapter", scale=self.lam),
                   Step("x2", "x1", "layer", scale=self.beta, mix=(("x1", 1.0),))),
            output_order=("x2", "x1"), main="x1",
            branch_roles={"adapter": (), "layer": ("layer",)},
            compose=lambda roles, extra: {"adapter": AdapterBranch(extra["adapter_f"]),
                                          "layer": WithAdapter(roles["layer"], extra["adapter_g"])},
            description=f"y1 = {self.lam:g} x1 + adapter(x2); y2 = {self.beta:g} x2 + layer(y1) + adapter; [y2, y1]")


@dataclass(frozen=True)
class MEFT3Config(MEFTConfig):
    name = "meft3"
    lam: float = 0.1
    beta: float = 0.1

    def scheme(self) -> Scheme:
        return self._scheme(
            steps=(Step("x1", "x2", "attn", scale=self.lam, mix=(("x2", 1.0),)),
                   Step("x2", "x1", "mlp", scale=self.beta, mix=(("x1", 1.0),))),
            output_order=None, main="x2",
            branch_roles={"attn": ("attn",), "mlp": ("mlp",)},
            compose=lambda roles, extra: {"attn": WithAdapter(roles["attn"], extra["adapter_f"]),
                                          "mlp": WithAdapter(roles["mlp"], extra["adapter_g"])},
            description=f"y1 = {self.lam:g} x1 + x2 + A(x2) + adapter; y2 = {self.beta:g} x2 + y1 + M(y1) + adapter")
