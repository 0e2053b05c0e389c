"""Plain PyTorch models (not Hugging Face, own names) for the tests: a pre-norm MoE (dense or sparse), a post-norm
and a parallel-residual transformer that revcompile must skip with a reason."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TopKMoE(nn.Module):
    def __init__(self, width: int, experts: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                     for _ in range(experts))

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + gate * expert(x)
        return out


class SparseTopKMoE(TopKMoE):
    """Runs only the experts some token chose, as hand-written MoEs do: the others get no gradient at all."""

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            gate = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + gate * self.experts[e](x)
        return out


class FlatTopKMoE(TopKMoE):
    """Flattens tokens with `.view` as Hugging Face MoEs do (`hidden_states.view(-1, hidden_dim)`): it needs a
    contiguous input."""

    def forward(self, x):
        return super().forward(x.view(-1, x.shape[-1])).view(x.shape)


def _gated(p: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return p.gather(-1, index), index


def _lowest_of_negated(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, index = torch.min(-p, dim=-1)
    return -low.unsqueeze(-1), index.unsqueeze(-1)


def _first_sorted(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = p.sort(-1, descending=True)
    return values[..., :1], order[..., :1]


# each way a router can pick one expert from its probabilities p: (the gate, the expert's index), both tokens x 1
TOP1_SELECTIONS = {
    "argmax": lambda p: _gated(p, p.argmax(-1, keepdim=True)),
    "argmin": lambda p: _gated(p, torch.argmin(-p, dim=-1, keepdim=True)),
    "max": lambda p: tuple(p.max(-1, keepdim=True)),
    "min": _lowest_of_negated,
    "sort": _first_sorted,
    "argsort": lambda p: _gated(p, torch.argsort(p, dim=-1, descending=True)[..., :1]),
}


class Top1MoE(TopKMoE):
    """Sends each token to one expert, picked by `select` (a key of TOP1_SELECTIONS: argmax as Switch
    Transformer's router does, or min, sort, ...) and scaled by its probability."""

    def __init__(self, width: int, select: str = "argmax"):
        super().__init__(width)
        self.select = select

    def forward(self, x):
        gate, chosen = TOP1_SELECTIONS[self.select](self.router(x).softmax(-1))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + gate * (chosen == e) * expert(x)
        return out


class PreNormBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm_a, self.mix = nn.LayerNorm(width), SelfAttention(width)
        self.norm_b, self.ff = nn.LayerNorm(width), TopKMoE(width)

    def forward(self, x):
        x = x + self.mix(self.norm_a(x))
        return x + self.ff(self.norm_b(x))


class Top1Block(PreNormBlock):
    """A pre-norm block whose MoE routes each token to one expert (`Top1MoE`)."""

    def __init__(self, width: int, select: str = "argmax"):
        super().__init__(width)
        self.ff = Top1MoE(width, select)


class SparsePreNormBlock(PreNormBlock):
    """A pre-norm block whose MoE has 8 separate experts and runs only the chosen ones."""

    def __init__(self, width: int):
        super().__init__(width)
        self.ff = SparseTopKMoE(width, experts=8)


class FlatMoEBlock(PreNormBlock):
    """Normalises after the branches, as OLMo-2 and FlexOlmo do: the MoE reads the residual stream itself."""

    def __init__(self, width: int):
        super().__init__(width)
        self.ff = FlatTopKMoE(width)

    def forward(self, x):
        x = x + self.norm_a(self.mix(x))
        return x + self.norm_b(self.ff(x))


class NoGradScaleMoE(TopKMoE):
    """Scales its output by a statistic of its input computed under no_grad: no gradient flows through the scale."""

    def forward(self, x):
        with torch.no_grad():
            scale = x.pow(2).mean(-1, keepdim=True).add(1).rsqrt()
        return scale * super().forward(x)


class SliceWriteAttention(SelfAttention):
    """Assembles its keys in a `new_empty` tensor through slices' `copy_`, as DeepSeek-V3's attention does."""

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        half = k.shape[-1] // 2
        keys = k.new_empty(k.shape)
        keys[..., :half].copy_(k[..., :half])
        keys[..., half:].copy_(-k[..., half:])
        y = F.scaled_dot_product_attention(q, keys, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TorchLevelQuirksBlock(PreNormBlock):
    """A pre-norm block whose code, captured by Dynamo at the level of torch ops, holds grad-mode switches (a
    `with torch.no_grad():` block in its MoE) and writes through views (its attention's keys)."""

    def __init__(self, width: int):
        super().__init__(width)
        self.mix, self.ff = SliceWriteAttention(width), NoGradScaleMoE(width)


class NoGradGateBlock(PreNormBlock):
    """Gates its attention branch by a statistic of the stream computed under no_grad, in the block's own code."""

    def forward(self, x):
        with torch.no_grad():
            gate = x.pow(2).mean(-1, keepdim=True).add(1).rsqrt()
        x = x + gate * self.mix(self.norm_a(x))
        return x + self.ff(self.norm_b(x))


class CollectingMoE(TopKMoE):
    """Appends its router logits to a list it shares with the model (`collected`), as custom MoEs do for their
    load-balancing loss: a value carrying gradient that leaves the layer by a side effect, not as its output."""

    collected: list

    def forward(self, x):
        self.collected.append(self.router(x))
        return super().forward(x)


class CollectingBlock(PreNormBlock):
    def __init__(self, width: int):
        super().__init__(width)
        self.ff = CollectingMoE(width)


class AuxLossMoE(TopKMoE):
    """Keeps a load-balancing loss of its router in `self.aux_loss`, for the training loop to add."""

    def forward(self, x):
        self.aux_loss = self.router(x).softmax(-1).mean((0, 1)).pow(2).sum()
        return super().forward(x)


class AuxLossBlock(PreNormBlock):
    def __init__(self, width: int):
        super().__init__(width)
        self.ff = AuxLossMoE(width)


class PostNormBlock(PreNormBlock):
    def forward(self, x):
        x = self.norm_a(x + self.mix(x))
        return self.norm_b(x + self.ff(x))


class ParallelBlock(PreNormBlock):
    def forward(self, x):
        return x + self.mix(self.norm_a(x)) + self.ff(self.norm_b(x))


class PlainLM(nn.Module):
    """`blocks[i]` of `block` class over a token embedding; returns logits."""

    def __init__(self, block: type = PreNormBlock, depth: int = 3, width: int = 32, vocab: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def near_tied_top1_lm(select: str, depth: int = 6, seed: int = 0) -> PlainLM:
    """A PlainLM of Top1Blocks picking by `select` whose routers' first two experts are tied to 1e-7 (relative
    rounding of fp32 float streams flips some of their choices in a recompute that does not replay them)."""
    torch.manual_seed(seed)
    model = PlainLM(functools.partial(Top1Block, select=select), depth=depth)
    with torch.no_grad():
        for block in model.blocks:
            weight = block.ff.router.weight
            weight[1] = weight[0] + 1e-7 * torch.randn_like(weight[0])
    return model


class CollectingLM(PlainLM):
    """A PlainLM of CollectingBlocks whose MoEs append their router logits to `self.collected` (emptied per call)."""

    def __init__(self, depth: int = 3, width: int = 32, vocab: int = 64):
        super().__init__(CollectingBlock, depth, width, vocab)
        self.collected = []
        for block in self.blocks:
            block.ff.collected = self.collected

    def forward(self, input_ids):
        self.collected.clear()
        return super().forward(input_ids)


class CarryBlock(PreNormBlock):
    """Returns (hidden, carry) and reads the previous block's carry: state passed from layer to layer beside the
    hidden state, made by its MoE's router."""

    def forward(self, x, carry):
        x = x + self.mix(self.norm_a(x)) * carry
        h = self.norm_b(x)
        return x + self.ff(h), self.ff.router(h).sigmoid().mean(-1, keepdim=True)


class CarryLM(PlainLM):
    def __init__(self, depth: int = 3, width: int = 32, vocab: int = 64):
        super().__init__(CarryBlock, depth, width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        carry = torch.ones_like(x[..., :1])
        for block in self.blocks:
            x, carry = block(x, carry)
        return self.head(self.norm(x))


class RouterStateMoE(TopKMoE):
    """Routes by a small router state made from its input and the previous layer's (Zaya's router states), and
    returns (output, its router state): floating-point state, with gradient, carried from layer to layer."""

    def __init__(self, width: int, state: int = 8):
        super().__init__(width)
        self.down = nn.Linear(width, state)
        self.router = nn.Linear(state, len(self.experts), bias=False)

    def forward(self, x, previous):
        state = self.down(x) + previous
        weights, chosen = self.router(state).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
        return out, state


class RouterStateBlock(PreNormBlock):
    def __init__(self, width: int):
        super().__init__(width)
        self.ff = RouterStateMoE(width)

    def forward(self, x, state):
        x = x + self.mix(self.norm_a(x))
        out, state = self.ff(self.norm_b(x), state)
        return x + out, state


class RouterStateLM(PlainLM):
    """A PlainLM of RouterStateBlocks, each reading the previous block's router state."""

    def __init__(self, depth: int = 3, width: int = 32, vocab: int = 64):
        super().__init__(RouterStateBlock, depth, width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        state = torch.zeros(*x.shape[:-1], self.blocks[0].ff.down.out_features, dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(self.norm(x))


class MaybeBiasedAttention(SelfAttention):
    """Returns (output, its output bias), the bias None when `biased` is off (GPT-NeoX-Japanese's attention)."""

    def __init__(self, width: int, biased: bool = False):
        super().__init__(width)
        self.bias_out = nn.Parameter(torch.randn(width) * 0.1)
        self.biased = biased

    def forward(self, x):
        return super().forward(x), self.bias_out if self.biased else None


class MaybeBiasedBlock(PreNormBlock):
    """Tests its attention's second output against None, as GPT-NeoX-Japanese's layer does: a trace with that output a
    proxy takes the "not None" way and adds None."""

    def __init__(self, width: int):
        super().__init__(width)
        self.mix = MaybeBiasedAttention(width)

    def forward(self, x):
        a, bias = self.mix(self.norm_a(x))
        if bias is not None:
            a = a + bias
        x = x + a
        return x + self.ff(self.norm_b(x))
