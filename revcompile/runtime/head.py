"""The LM head and loss in token chunks: the full logits and their gradient never exist.

At a real vocabulary the logits (tokens x vocab, upcast to fp32 by the loss, and their gradient) are the largest
tensors of a training step. `make_reversible(model)` (with `head="chunked"`, the default) rewrites a Hugging Face
causal LM's head the way it rewrites the layers, by swapping classes: the model's class and its `lm_head`'s class
get subclasses, `undo` swaps them back. When the model is called with `labels` and grad enabled:
- `lm_head(hidden)` records `hidden` and returns a (..., 1) placeholder instead of the logits, so what the model's
  forward does to the logits in between (Gemma's final logit softcapping) costs nothing;
- `self.loss_function(logits, labels, vocab_size, **kwargs)` runs `chunked_cross_entropy` on the recorded hidden
  states: forward computes each chunk's logits once and turns them into the chunk's share of the gradients, which
  backward only scales (no logits are kept, none recomputed);
- the output's `logits` is None.
Without labels, under torch.no_grad() (evaluation that wants logits) or with `return_dict=False`, the original
head runs and returns the logits as before.

Hugging Face semantics (transformers' ForCausalLMLoss) hold exactly: the labels are shifted (or `shift_labels`
used), `ignore_index` tokens are skipped, the sum is divided by the number of counted tokens or by
`num_items_in_batch` (the Trainer's gradient accumulation), `logits_to_keep` slices the hidden states before the
head as it slices the logits, tied embeddings get the head's gradient on the shared weight. Which transform the
model applies between head and loss (none, or `final_logit_softcapping`) is not assumed from the config but
checked at conversion on a probe call (with labels, counting the loss function's calls); a head that is not a
Linear, a loss that is not ForCausalLMLoss, a forward that computes its loss itself (BART's causal LM) or another
transform leaves the head as it is, with the reason in `plan.head` (`model._revcompile_plan`).

Example:
    >>> revcompile.make_reversible(model)                  # head="chunked" by default
    >>> out = model(ids, labels=ids); out.loss.backward()  # out.logits is None: never materialised
    >>> revcompile.make_reversible(model, head="liger")    # the same loss by Liger-Kernel's fused kernel (CUDA)
    >>> revcompile.make_reversible(model, head="original") # keep the original head and loss

head="liger" (Liger-Kernel's fused linear cross-entropy) and head="cce" (Apple's Cut Cross-Entropy) run the same
Hugging Face semantics with a maintained Triton kernel in place of `ChunkedLinearCrossEntropy`, on CUDA
(`pip install 'revcompile[gpu]'`).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.probe import eval_mode, example_call
from ..errors import RevcompileError

HEADS = ("chunked", "liger", "cce", "original")
# NOTE: the maintained fused kernels are Triton, CUDA only: head="liger" or "cce" on another device is an error, not
# a silent fallback. Which of them (or the PyTorch "chunked") is fastest on a GPU is for bench/gpu.py --head to
# measure; until it has, "chunked" is the default everywhere.
FUSED_KERNELS = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}  # head -> the package (revcompile[gpu] extra)
FUSED_KERNEL_DEVICES = ("cuda",)


MIN_CHUNK_TOKENS = 128  # below this the head is bound by reading the weight once per chunk (CPU: 4x slower at 8)


def chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk by default: a chunk's logits about the size of all the hidden states (Liger-Kernel's rule),
    so the head's working set grows like the hidden states, not like tokens x vocab; at least MIN_CHUNK_TOKENS."""
    return min(tokens, max(MIN_CHUNK_TOKENS, math.ceil(tokens / math.ceil(vocab / hidden))))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a chunk's logits upcast to `acc`, tanh(linear / softcap) in the weight's dtype or None without softcap).

    NOTE: the order of Hugging Face's forward and ForCausalLMLoss: the linear and Gemma's softcapping (divide,
    tanh, multiply) in the weight's dtype, then the upcast.
    """
    linear = F.linear(hidden, weight, bias)
    if softcap is None:
        return linear.to(acc), None
    tanh = torch.tanh(linear / softcap)
    return (tanh * softcap).to(acc), tanh


# torch.addmm(..., out_dtype=torch.float32): a 16-bit GEMM written to an fp32 output (CUDA, torch >= 2.8)
_ADDMM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, with `total` fp32 (or fp64) and a, b possibly 16-bit.

    NOTE: on CUDA (sm80+) 16-bit operands run as one 16-bit GEMM with an fp32 output, accumulated in fp32: products
    of 16-bit values are exact in fp32, so this equals the GEMM of the upcast operands up to summation order, on
    tensor cores (an fp32 GEMM gets none: the upcast weight gradient was the slowest part of the head on an H200).
    Elsewhere (no such kernel on CPU) the operands are upcast.
    """
    if (_ADDMM_OUT_DTYPE and total.is_cuda and total.dtype == torch.float32 and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(total.device)[0] >= 8):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.addmm_(a.to(total.dtype), b.to(total.dtype))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(softcap(hidden @ weight.T + bias), targets), computed `chunk` tokens at a time.

    Forward computes each chunk's logits once and turns them, in place, into the chunk's share of the gradients of
    the hidden states, the weight and the bias for an incoming gradient of 1 (d loss / d logits = softmax(logits) -
    onehot(target), zero for ignored tokens); it keeps those gradients, never the logits, and backward only scales
    them by the incoming gradient (Liger-Kernel's fused linear cross-entropy does the same). So the head runs
    forward once per step, as Hugging Face's does, and holds what its backward would allocate anyway: a gradient
    the size of the hidden states and one the size of the weight.

    NOTE (numerics): logits are upcast per chunk to fp32 (fp64 stays fp64), and the loss is accumulated over chunks
    in that dtype. The weight's gradient is accumulated over chunks in fp32 (fp64 for fp64 weights) and cast once,
    after the scaling: a bf16 accumulator would round at every chunk, where one matmul over all tokens rounds once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, ignore_index, chunk):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits, tanh = _logits(h, weight, bias, softcap, acc)
            # NOTE: ignored tokens are masked, not indexed out: indexing by `counted.nonzero()` would wait for the
            # device once per chunk
            counted = t != ignore_index
            target = torch.where(counted, t, 0)[:, None]
            log_norm = torch.logsumexp(logits, -1, keepdim=True)
            total += torch.where(counted, (log_norm - logits.gather(1, target)).squeeze(1), 0).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # softmax - onehot, in place on the logits (their only copy in fp32 weights without softcap)
            grad = logits.sub_(log_norm).exp_()
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=acc))
            grad *= counted.to(acc)[:, None]
            grad = grad.to(weight.dtype if tanh is None else tanh.dtype)
            if tanh is not None:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
                grad *= 1 - tanh * tanh
            if need_hidden:
                grad_hidden[start:start + chunk] = grad @ weight
            with torch.autocast(hidden.device.type, enabled=False):
                if need_weight:
                    _accumulate(grad_weight, grad.t(), h)
                if need_bias:
                    grad_bias += grad.sum(0, dtype=acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # NOTE: scaled in place, and handed to autograd as they are: a scaled copy would hold a second
        # weight-sized fp32 gradient (vocab x hidden) at the head's peak. So a second backward cannot scale them again.
        if getattr(ctx, "scaled", False):
            raise RevcompileError("backward ran twice through the chunked LM head; retain_graph=True is not "
                                  "supported (make_reversible(model, head='original') keeps the original head)")
        ctx.scaled = True
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def check_fused_kernel(kernel: str, lm_head: nn.Module | None) -> None:
    """RevcompileError unless head=`kernel` ("liger" or "cce") can serve this lm_head: its package is installed,
    and for Cut Cross-Entropy, which takes no bias, the head has none."""
    import importlib.util

    module = FUSED_KERNELS[kernel].replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise RevcompileError(f"head={kernel!r} needs {FUSED_KERNELS[kernel]} (Triton, CUDA): pip install "
                              f"'revcompile[gpu]', or use head='chunked' (the same loss in PyTorch, any device)")
    if kernel == "cce" and getattr(lm_head, "bias", None) is not None:
        raise RevcompileError("head='cce': Cut Cross-Entropy takes no bias and this lm_head has one; use "
                              "head='liger' or head='chunked'")


def fused_loss_sum(kernel: str, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, softcap: float | None, ignore_index: int) -> torch.Tensor:
    """The sum over tokens of cross_entropy(softcap(flat @ weight.T + bias), targets) by a maintained fused
    kernel: Liger-Kernel's fused linear cross-entropy (kernel="liger") or Cut Cross-Entropy ("cce").

    NOTE (numerics, to match ChunkedLinearCrossEntropy): Liger accumulates the weight's gradient in fp32
    (`accum_dtype`; its default is the weight's dtype, which rounds at every chunk in bf16), and Cut Cross-Entropy
    runs with `filter_eps=None` (its default skips softmax entries below a threshold in backward: an approximation
    of the gradient).
    """
    if flat.device.type not in FUSED_KERNEL_DEVICES:
        raise RevcompileError(f"head={kernel!r} runs {FUSED_KERNELS[kernel]}'s Triton kernel, on CUDA only; this "
                              f"call's hidden states are on {flat.device.type} (head='chunked' computes the same "
                              "loss in PyTorch on any device)")
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(flat, weight, targets, bias, ignore_index=ignore_index,
                                                reduction="sum", softcap=softcap,
                                                accum_dtype=torch.promote_types(weight.dtype, torch.float32))
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(flat, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                reduction="sum", filter_eps=None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, *, num_items_in_batch: torch.Tensor | int | None = None,
                          ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
                          softcap: float | None = None, chunk_tokens: int | None = None,
                          kernel: str = "chunked") -> torch.Tensor:
    """Hugging Face's causal-LM loss of `softcap(linear(hidden, weight, bias))`, without the full logits.

    hidden (..., H) and labels (...) as the model's head and ForCausalLMLoss get them: labels are shifted left by
    one (the last position ignored) unless `shift_labels` is given; the sum of the token losses is divided by the
    number of tokens not equal to `ignore_index` (NaN when there are none, like F.cross_entropy's mean), or by
    `num_items_in_batch` when given. chunk_tokens: tokens per chunk (default: `chunk_size`). kernel: "chunked"
    (`ChunkedLinearCrossEntropy`, PyTorch) or a fused CUDA kernel, "liger" or "cce" (see `fused_loss_sum`).

    Example:
        >>> loss = chunked_cross_entropy(hidden, model.lm_head.weight, None, labels)
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"labels give {targets.shape[0]} targets for {flat.shape[0]} positions of hidden states "
                         "(with logits_to_keep, pass shift_labels for the kept positions)")
    if kernel == "chunked":
        chunk = chunk_tokens or chunk_size(flat.shape[0], weight.shape[0], weight.shape[1])
        total = ChunkedLinearCrossEntropy.apply(flat, weight, bias, targets, softcap, ignore_index, chunk)
    else:
        total = fused_loss_sum(kernel, flat, weight, bias, targets, softcap, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class HeadRuntime:
    """What a model whose head was converted needs at run time: the head, the transform checked at conversion
    (softcap or None), the kernel ("chunked", "liger" or "cce") and chunk size, and the hidden states recorded
    during a call."""

    def __init__(self, model: nn.Module, head: nn.Linear, softcap: float | None, chunk_tokens: int | None,
                 kernel: str):
        self.original_class, self.head_class = _original(type(model)), _original(type(head))
        self.signature = inspect.signature(type(model).forward)
        self.head, self.softcap, self.chunk_tokens, self.kernel = head, softcap, chunk_tokens, kernel
        self.recorded: list[torch.Tensor] | None = None  # a list while a call with labels runs

    def follow(self, head: nn.Module) -> None:
        """Chunk `head`, the model's output embeddings now, instead of the one converted: `resize_token_embeddings`
        replaces an untied lm_head by a new Linear, which would return full logits that the loss never sees.

        Raises RevcompileError for a head that is not a Linear."""
        if not isinstance(head, nn.Linear):
            kind = f"{type(head).__module__}.{type(head).__qualname__}"
            raise RevcompileError(f"the model's lm_head is now a {kind} (an adapter, or replaced since conversion), "
                                  "which the chunked head cannot compute: convert with make_reversible(model, "
                                  "head='original'), which keeps the model's own head")
        if self.kernel in FUSED_KERNELS:
            check_fused_kernel(self.kernel, head)
        self.head.__class__ = self.head_class
        del self.head._revcompile_head
        self.head, self.head_class = head, type(head)
        head._revcompile_head = self
        head.__class__ = _subclass(ChunkedHead, type(head))

    def loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
             **kwargs):
        """ForCausalLMLoss's signature; `logits` is the placeholder, the hidden states were recorded by the head."""
        if len(self.recorded) != 1:
            raise RuntimeError(f"the chunked head expected one lm_head call before the loss, saw "
                               f"{len(self.recorded)}; convert with head='original'")
        return chunked_cross_entropy(self.recorded.pop(), self.head.weight, self.head.bias, labels,
                                     num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                     shift_labels=shift_labels, softcap=self.softcap, chunk_tokens=self.chunk_tokens,
                                     kernel=self.kernel)


class ChunkedHeadModel(nn.Module):
    """Mixin of a converted causal LM's class: calls with labels and grad enabled run the chunked loss."""

    def forward(self, *args, **kwargs):
        runtime: HeadRuntime | None = self.__dict__.get("_revcompile_head")
        if runtime is None:  # an instance made from the class itself (type(model).from_pretrained): unconverted
            return super().forward(*args, **kwargs)
        bound = runtime.signature.bind(self, *args, **kwargs).arguments
        labels = bound.get("labels", bound.get("kwargs", {}).get("labels"))
        if labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False:
            return super().forward(*args, **kwargs)
        if _custom_loss(self):  # set since conversion (one set before keeps the original head): it must be used
            warnings.warn("a loss_function other than ForCausalLMLoss was set on the model after conversion: it gets "
                          "the full logits (the chunked head is bypassed; its memory saving with it)", stacklevel=2)
            return super().forward(*args, **kwargs)
        head = self.get_output_embeddings()
        if head is not runtime.head:  # replaced since conversion (resize_token_embeddings of an untied head)
            runtime.follow(head)
        runtime.recorded = []
        try:
            out = super().forward(*args, **kwargs)
        finally:
            runtime.recorded = None
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})  # logits=None: they never existed

    @property
    def loss_function(self):
        runtime = self.__dict__.get("_revcompile_head")
        return runtime.loss if runtime is not None and runtime.recorded is not None else super().loss_function

    @loss_function.setter
    def loss_function(self, value):
        self._loss_function = value


def _custom_loss(model: nn.Module) -> bool:
    """Is a loss_function other than transformers' ForCausalLMLoss set on `model`?"""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return model.__dict__.get("_loss_function", ForCausalLMLoss) is not ForCausalLMLoss


class ChunkedHead(nn.Module):
    """Mixin of a converted model's lm_head class: while a call with labels runs, record the hidden states and
    return a (..., 1) placeholder instead of the logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        runtime: HeadRuntime | None = self.__dict__.get("_revcompile_head")
        if runtime is None or runtime.recorded is None:
            return super().forward(hidden)
        runtime.recorded.append(hidden)
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], 1)


_CLASSES: dict[tuple[type, type], type] = {}


def _original(cls: type) -> type:
    """The class a Chunked subclass was made from (itself if it is none)."""
    return cls.__bases__[1] if issubclass(cls, (ChunkedHeadModel, ChunkedHead)) else cls


def _subclass(mixin: type, cls: type) -> type:
    """The (cached) subclass of `cls` with `mixin`'s forward, which shows `cls.forward`'s signature: the Trainer
    reads it (`labels` among the label names, dataset columns kept, `**kwargs` for num_items_in_batch).

    NOTE: it keeps `cls`'s name: `save_pretrained` writes the class name into config.json's `architectures`, by
    which serving engines (vLLM, TGI) choose the model class; a "ChunkedMixtralForCausalLM" there would not load.
    """
    if (mixin, cls) not in _CLASSES:
        forward = functools.wraps(cls.forward)(lambda self, *args, **kwargs: mixin.forward(self, *args, **kwargs))
        _CLASSES[mixin, cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "forward": forward})
    return _CLASSES[mixin, cls]


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM a wrapper forwards its calls to (PEFT's PeftModel: `get_base_model()`), whose
    class and lm_head the chunked head swaps; else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def head_transform(model: nn.Module, example_inputs: Any = None) -> tuple[str | None, float | None]:
    """(reason the head cannot be chunked or None, the softcap the model applies to the head's output or None).

    Runs one probe call (eval mode, no grad) and compares the model's logits with its lm_head's output.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = causal_lm_of(model)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not hasattr(model, "config") or not isinstance(head, nn.Linear):
        return "not a Hugging Face causal LM with a Linear lm_head", None
    if model.loss_function is not ForCausalLMLoss:
        return f"its loss_function is {getattr(model.loss_function, '__name__', model.loss_function)}, " \
               "not ForCausalLMLoss", None
    args, kwargs = example_call(model, example_inputs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not torch.is_tensor(ids):
        return "the probe call has no input_ids to check the loss with", None
    seen, losses = [], []

    def loss_spy(*loss_args, **loss_kwargs):
        losses.append(1)
        return ForCausalLMLoss(*loss_args, **loss_kwargs)

    # NOTE: with labels, and the loss function swapped for one that counts its calls: a model whose forward computes
    # its loss itself (BART's decoder-only class calls CrossEntropyLoss on the logits) cannot take the chunked loss
    hook = head.register_forward_hook(lambda module, args, output: seen.append(output))
    previous = model.__dict__.get("_loss_function")
    model.loss_function = loss_spy
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(*args, **dict(kwargs, labels=ids)).logits
    except Exception as err:  # a model that cannot take labels so: its head stays as it is
        return f"its probe call with labels failed ({type(err).__name__}: {err})", None
    finally:
        hook.remove()
        if previous is None:
            del model._loss_function
        else:
            model.loss_function = previous
    if len(seen) != 1 or logits is None:
        return f"lm_head ran {len(seen)} times in one call", None
    if not losses:
        return "its forward computes the loss itself, not with loss_function (ForCausalLMLoss)", None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    for candidate in (None, softcap) if softcap else (None,):
        expected = seen[0] if candidate is None else torch.tanh(seen[0] / candidate) * candidate
        if logits.shape == expected.shape and torch.equal(logits, expected):
            return None, candidate
    return "the model transforms lm_head's output before the loss in a way the chunked head does not know", None


def convert_head(model: nn.Module, softcap: float | None, chunk_tokens: int | None, kernel: str = "chunked") -> None:
    """Swap in the chunked head (after `head_transform` found no reason against it); `undo_head` swaps it back."""
    model = causal_lm_of(model)
    lm_head = model.get_output_embeddings()
    runtime = HeadRuntime(model, lm_head, softcap, chunk_tokens, kernel)
    model._revcompile_head = lm_head._revcompile_head = runtime
    model.__class__ = _subclass(ChunkedHeadModel, runtime.original_class)
    lm_head.__class__ = _subclass(ChunkedHead, runtime.head_class)


def chunked_head(model: nn.Module, chunk_tokens: int | None = None, example_inputs: Any = None,
                 kernel: str = "chunked") -> nn.Module:
    """The chunked LM head and loss alone, on a model whose layers stay as they are (in place; returns it).

    For a baseline with the same loss (HF activation checkpointing + chunked loss, or + Liger with kernel="liger")
    or a model not worth converting; `revcompile.undo(model)` restores it. Raises RevcompileError saying why when
    the head cannot be chunked.

    Example:
        >>> revcompile.chunked_head(model); model.gradient_checkpointing_enable()
    """
    if kernel not in HEADS or kernel == "original":
        raise RevcompileError(f"kernel must be 'chunked', 'liger' or 'cce', got {kernel!r}")
    if kernel in FUSED_KERNELS:
        check_fused_kernel(kernel, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    reason, softcap = head_transform(model, example_inputs)
    if reason is not None:
        raise RevcompileError(f"cannot chunk the LM head of {type(model).__name__}: {reason}")
    convert_head(model, softcap, chunk_tokens, kernel)
    return model


def has_chunked_head(model: nn.Module) -> bool:
    return "_revcompile_head" in causal_lm_of(model).__dict__


def undo_head(model: nn.Module) -> None:
    """Restore the original model and lm_head classes, if the head was chunked (nothing else was changed)."""
    model = causal_lm_of(model)
    runtime = model.__dict__.pop("_revcompile_head", None)
    if runtime is not None:
        model.__class__ = runtime.original_class
        runtime.head.__class__ = runtime.head_class
        del runtime.head._revcompile_head
