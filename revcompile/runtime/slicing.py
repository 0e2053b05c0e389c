"""A branch run a piece at a time: slices of the sequence or of the batch, in forward, recompute and reference alike.

Two ways a branch may be split, each found on real values by the analysis pass (`passes/classify.py`):
- TOKEN: an FFN or MoE acts on each token alone; it runs on slices of the sequence (dim -2), the context whole.
- SEQUENCE: attention (or a whole layer) treats each sequence of the batch alone; it runs on slices of the batch
  (dim 0), each with the same rows of the context tensors that carry the batch (a padding mask, per-sequence
  position embeddings). Which context leaves carry it is read from the analysis probe (`BatchContext`); a context
  laid out otherwise (a padding mask that was None at the probe) is checked the same way on its first call
  (`LayerRuntime`), and runs in one piece if the check fails.

NOTE: why slices. A recompute's working set (a MoE's gathered tokens and every expert's activations, attention's
projections, rotated queries and keys, and their gradients) grows with the tokens it runs on, and one layer's
recompute is the peak of a reversible step: slicing divides it. Forward runs the very same slices, each recording
its own routing and RNG state, so the recompute repeats the forward's kernels on the forward's shapes and returns its
bits (exact streams rely on that); the coupled reference (`invert=False`) runs them too.

Example:
    >>> pieces = branch_pieces(Split(SEQUENCE, None), read, context, [BatchContext.of(probe_context, 1)])
    >>> out = pieces[0].join([branch(piece.take(read), *piece.context(context)) for piece in pieces])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

TOKEN, SEQUENCE = "token", "sequence"
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)

# NOTE: the default slicing (chunks None), by device and by measurement. What slicing buys is memory (see the module
# NOTE; bench/maxbatch.py); what it costs is smaller kernels, and each MoE slice computes the expert-weight gradients
# from its own tokens. On CPU (bench/maxbatch.py's model, 16 layers, batch 25 x 512 tokens) slices of 512, 1024 and
# 2048 tokens gave the same step peak (166, 166 and 167 MB: with attention sliced too, the LM head and the forward
# are the peak, not a layer's recompute, and one slice's working set is small beside the streams), while on
# bench/speed.py's step (4 x 512 tokens) 512-token slices cost 7 % against 2048 (1.08x against 1.01x HF
# checkpointing): 2048. On CUDA each MoE slice costs a host synchronisation in the experts kernels (token counts per
# expert): 4 slices made an H200 step of 8 x 1024 tokens 2.2x slower, so the default there is one piece
# (`recompute_chunks` sets a number of slices on any device; whether a budget of tens of thousands of tokens pays at
# large batches is for `bench/gpu.py --slice-tokens` to measure).
AUTO_SLICE_TOKENS = {"cpu": 2048}


@dataclass(frozen=True)
class Split:
    """How a branch may run in pieces: `kind` TOKEN or SEQUENCE, `chunks` how many (None: by device)."""

    kind: str
    chunks: int | None = None


@dataclass(frozen=True)
class BatchContext:
    """The layout of a layer's context at the analysis probe, and which of its tensor leaves carry the batch
    (dimension 0 the size of the hidden state's): those are sliced with the batch, the others given whole."""

    spec: TreeSpec
    batched: tuple[bool | None, ...]  # per leaf: a tensor carrying the batch, another tensor, or not a tensor (None)

    @classmethod
    def of(cls, context: list, batch: int) -> "BatchContext":
        """The layout of `context` in a call with `batch` sequences. A leaf of size 1 along dimension 0 is broadcast
        over the batch there and counts as carrying it: a later call may give it one row per sequence."""
        leaves, spec = tree_flatten(context)
        return cls(spec, tuple(leaf.dim() >= 1 and leaf.shape[0] in (1, batch) if isinstance(leaf, torch.Tensor)
                               else None for leaf in leaves))

    def fits(self, context: list, batch: int) -> bool:
        """Can a call with this context be sliced by batch: laid out as at the probe, every batch-carrying leaf of
        the batch's size or broadcast over it (size 1)?"""
        leaves, spec = tree_flatten(context)
        if spec != self.spec:
            return False
        for leaf, batched in zip(leaves, self.batched):
            if (batched is None) != (not isinstance(leaf, torch.Tensor)):
                return False
            if batched is None and not isinstance(leaf, _CONSTANTS):  # a KV cache, say: it would see each piece
                return False
            if batched and (leaf.dim() < 1 or leaf.shape[0] not in (1, batch)):
                return False
        return True


@dataclass(frozen=True)
class Piece:
    """One slice a branch runs on: `index` along the sequence (dim -2) or along the batch (dim 0)."""

    dim: int
    index: slice
    batched: tuple[bool | None, ...] = ()  # SEQUENCE pieces: the context leaves to slice (BatchContext.batched)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The piece of a stream-shaped tensor, contiguous (a branch may `.view` its input)."""
        return (x[self.index] if self.dim == 0 else x[..., self.index, :]).contiguous()

    def put(self, whole: torch.Tensor, part: torch.Tensor) -> None:
        if self.dim == 0:
            whole[self.index] = part
        else:
            whole[..., self.index, :] = part

    def add(self, whole: torch.Tensor, part: torch.Tensor) -> None:
        """whole[piece] += part, in place."""
        (whole[self.index] if self.dim == 0 else whole[..., self.index, :]).add_(part)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=self.dim)

    def context(self, context: list) -> list:
        """The context this piece runs with: batch-carrying leaves sliced (those broadcast over it kept whole)."""
        if self.dim != 0 or not any(self.batched):
            return context
        leaves, spec = tree_flatten(context)
        leaves = [leaf[self.index] if batched and leaf.shape[0] > 1 else leaf
                  for leaf, batched in zip(leaves, self.batched)]
        return tree_unflatten(leaves, spec)


def _ranges(length: int, pieces: int) -> list[slice]:
    bounds = torch.arange(length).tensor_split(min(pieces, length))
    return [slice(int(b[0]), int(b[-1]) + 1) for b in bounds]


def fitting_layout(layouts: list[BatchContext], context: list, batch: int) -> BatchContext | None:
    return next((layout for layout in layouts if layout.fits(context, batch)), None)


def branch_pieces(split: Split | None, read: torch.Tensor, context: list,
                  layouts: list[BatchContext]) -> list[Piece] | None:
    """The pieces a branch runs in for this call (forward, recompute and reference alike), or None for one piece.

    TOKEN: `split.chunks` slices of the sequence (None: of at most AUTO_SLICE_TOKENS tokens on this device).
    SEQUENCE: `split.chunks` slices of the batch (None: as many whole sequences per slice as fit AUTO_SLICE_TOKENS,
    at least one); only when the call's context fits a layout checked for it (`layouts`, `BatchContext.fits`).
    """
    if split is None or read.dim() < 3:
        return None
    limit = AUTO_SLICE_TOKENS.get(read.device.type)
    if split.kind == TOKEN:
        tokens = read.numel() // max(read.shape[-1], 1)
        chunks = split.chunks if split.chunks is not None else 1 if limit is None else -(-tokens // limit)
        if chunks <= 1 or read.shape[-2] < 2:
            return None
        return [Piece(-2, index) for index in _ranges(read.shape[-2], chunks)]
    batch = read.shape[0]
    layout = fitting_layout(layouts, context, batch) if batch > 1 else None
    if layout is None:
        return None
    per_sequence = read.numel() // (batch * max(read.shape[-1], 1))
    chunks = split.chunks if split.chunks is not None else \
        1 if limit is None else -(-batch // max(limit // max(per_sequence, 1), 1))
    if chunks <= 1:
        return None
    return [Piece(0, index, layout.batched) for index in _ranges(batch, chunks)]
