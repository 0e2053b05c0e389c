"""How a reversible run holds its streams, and the steps' arithmetic on them: floats, or exact integers.

`FloatStreams` runs the scheme's steps in the model's floating point (`exact=False`). `ExactStreams` holds every
stream a step updates as a fixed-point integer tensor (`exact=True`, DESIGN.md "Exact streams"), so that backward
rebuilds each layer's input bit for bit in any dtype. Both give the reversible Function and the coupled reference
one interface: `open` a run from h, `view` a stream as a branch reads it, `apply` / `undo` a step, `merge` back to h,
`pack` / `unpack` the tensor passed between layers (and its gradient).

NOTE: why integers. `q + a - a != q` in floating point: the add rounds q to the grid of the larger magnitude and
the low bits are gone; in bf16 (8 significant bits) a layer loses them at every step, and backward rebuilds a
different input (gradients off by 0.77 over 8 layers). Integer addition loses nothing: a stream is `V * 2**-shift`
with V an int32 (16-bit models) or int64 (32- and 64-bit models) tensor, a step adds `round(out * 2**shift)` to V
and undo subtracts the very same integer, so undo is exact whenever the recomputed branch returns the forward's
bits (same slices, kernels, autocast, routing and RNG: the Function sees to that). The branches read V converted
back to the model's dtype. Gradients pass straight through the rounding (in the reversible backward and, by a
straight-through estimator, in the `disable_inversion()` reference, which runs the identical integer arithmetic).

NOTE: the grid. One power-of-two shift per run, chosen from the run input's largest magnitude M so that values up
to M * 2**headroom fit (headroom 16 bits for int32, 24 for int64): the grid's step is M * 2**-(31 - 16) for int32
streams, finer than bf16's own rounding for every value above M / 2**7, which the residual stream's values are
after its first layers. A value outside the range is never wrapped: every step bounds its result (a max per step,
on the device), and the run's last layer raises RevcompileError naming `exact_headroom` if any bound was passed.

Example:
    >>> fmt = FixedPoint.choose(h)                        # the grid for a run whose input is h
    >>> torch.equal(fmt.quantize(h) + fmt.quantize(a) - fmt.quantize(a), fmt.quantize(h))
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cache

import torch

from ..coupling import Scheme, Step, weighted_sum
from ..errors import RevcompileError
from .replay import CHOICES_DIFFER

INT_FOR = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64,
           torch.float64: torch.int64}
BITS_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
           torch.float64: torch.int64}  # an integer type of the same width, to carry a float's bits
CARRIER = {torch.int32: torch.float32, torch.int64: torch.float64}  # the float type an int stream travels as
DEFAULT_HEADROOM = {torch.int32: 16, torch.int64: 24}
MAX_SHIFT = 120  # 2**±120 stays a normal number in float32, the arithmetic type of 16- and 32-bit models
NEAR_LIMIT = 2.0 ** -4  # a run whose streams reach this fraction of the integer range warns (raise_if_overflowed)


@dataclass
class FixedPoint:
    """One run's fixed-point grid: a stream value is `V * 2**-shift` with V of `int_dtype`; branches see `dtype`.

    overflow is the largest bound on a step's result so far, a 0-d tensor on the device (no host synchronisation
    per step); `raise_if_overflowed` compares it with the integer range once per run.
    """

    shift: int
    int_dtype: torch.dtype
    dtype: torch.dtype
    headroom: int
    overflow: torch.Tensor
    factors: dict = field(default_factory=dict, repr=False)  # (scale, device) -> scale * 2**shift (`grid`)

    @classmethod
    def choose(cls, h: torch.Tensor, headroom: int | None = None) -> "FixedPoint":
        """The grid for a run whose input is `h`: values up to max|h| * 2**headroom fit."""
        if h.dtype not in INT_FOR:
            raise RevcompileError(f"exact streams need a floating-point hidden state, got {h.dtype}")
        int_dtype = INT_FOR[h.dtype]
        headroom = DEFAULT_HEADROOM[int_dtype] if headroom is None else headroom
        peak = float(h.detach().abs().amax()) if h.numel() else 0.0
        if not math.isfinite(peak):
            raise RevcompileError("exact streams: the hidden state entering a reversible run is not finite (inf or "
                                  "nan); the model diverged before revcompile's layers")
        bits = torch.iinfo(int_dtype).bits - 1
        exponent = math.frexp(peak)[1] if peak > 0 else 1  # peak < 2**exponent
        shift = max(-MAX_SHIFT, min(MAX_SHIFT, bits - headroom - exponent))
        return cls(shift, int_dtype, h.dtype, headroom, torch.zeros((), dtype=torch.float64, device=h.device))

    @property
    def arithmetic(self) -> torch.dtype:
        """The float type rounding and merging run in: float64 for float64 models, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def limit(self) -> float:
        return float(2 ** (torch.iinfo(self.int_dtype).bits - 1))

    def grid(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.dtype | None, torch.Tensor]:
        """How x goes on the grid, round(scale * x * 2**shift): (the float type x is converted to first, or None;
        the factor scale * 2**shift as a 0-d tensor on x's device, made once per run and scale, so that compiled
        steps take it as an input, not as a constant to compile again for each run's shift).

        NOTE: a bf16 x scaled by a power of two stays in bf16: the product is exact (bf16 has float32's exponent
        range), and so is rounding it, so the integers are those of the float32 route without its stream-sized
        temporary and its conversion kernel. Another scale, or fp16 (whose range 2**shift would leave), goes
        through `arithmetic`.
        """
        upcast = None if x.dtype == torch.bfloat16 and math.frexp(abs(scale))[0] == 0.5 else self.arithmetic
        key = (scale, x.device)
        if key not in self.factors:  # (a fill kernel: no copy from the host, no synchronisation)
            self.factors[key] = torch.full((), scale * 2.0 ** self.shift, dtype=self.arithmetic, device=x.device)
        return upcast, self.factors[key]

    def quantize(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """round(scale * x * 2**shift) as integers; flags a value outside the range.

        NOTE: rounded as a float first, and its range checked there: a float out of the integer range has no
        integer to convert to."""
        y = _on_grid(x.detach(), *self.grid(x, scale))
        self.flag(_float_magnitude(y))
        return y.to(self.int_dtype)

    def dequantize(self, v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        # NOTE: into bf16 (or fp32, fp64) directly, then scaled there: every integer of the stream is in bf16's range,
        # the product with a power of two is exact (the scaled values are far from subnormals), and an integer
        # becomes a bf16 through float32 either way: the bits of scaling in float32 first, one kernel and one
        # stream-sized float32 temporary fewer. fp16 (largest value 65504) takes the float32 route.
        if torch.finfo(dtype).max < 2.0 ** 64:
            return (v.to(self.arithmetic) * 2.0 ** -self.shift).to(dtype)
        return v.to(dtype).mul_(2.0 ** -self.shift)

    def flag(self, bound: torch.Tensor) -> None:
        """Record that a result bounded by `bound` (a 0-d float64 tensor, in grid units; nan from a branch output
        that was not finite) may not fit. One kernel: the run keeps the largest bound, nan once it saw one."""
        self.overflow = torch.maximum(self.overflow, bound)

    def raise_if_overflowed(self) -> None:
        """Raise where a stream left the integer range; warn (once) where one came within NEAR_LIMIT of it.

        NOTE: streams that grow during training (activations that grow as a fine-tune goes on) end in this error
        at some step; the warning comes first, while there is room, so that a long run can be restarted with more
        headroom before it stops."""
        bound = float(self.overflow)  # (one host synchronisation per run)
        if bound >= NEAR_LIMIT * self.limit and bound < self.limit:
            warnings.warn(f"exact streams: a run's values came within {round(1 / NEAR_LIMIT)}x of the integer range "
                          "of their grid; if they grow further training stops with a RevcompileError: pass "
                          f"make_reversible(..., exact_headroom={self.headroom + 4}) (a coarser grid, more room)",
                          stacklevel=2)
        if not bound < self.limit:  # (nan compares False)
            raise RevcompileError(
                f"exact streams: a reversible stream left the {str(self.int_dtype).replace('torch.', '')} range, or a "
                "branch returned a value that is not finite (inf or nan). The run's grid was chosen from its input's "
                f"largest value with {self.headroom} bits of room for growth; pass make_reversible(..., "
                f"exact_headroom={self.headroom + 4}) (a coarser grid, more room), or max_run=k for shorter runs, or "
                "exact=False; a branch output that is not finite is the model's own overflow: it would reach the "
                "loss as nan without revcompile")

    # a float stream travels beside the integer ones as its bits, widened to the integer type
    def to_bits(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(BITS_OF[x.dtype]).to(self.int_dtype)

    def from_bits(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(BITS_OF[self.dtype]).view(self.dtype)


def exact_refusal(scheme: Scheme) -> str | None:
    """Why the scheme's steps cannot run on integer streams exactly, or None when they can."""
    for step in scheme.steps:
        if step.implicit:
            return (f"{scheme.name} inverts step {step.branch!r} by fixed-point iteration, to a tolerance, not "
                    "exactly")
        if step.scale not in (1, -1) or any(c != int(c) for _, c in step.mix):
            return (f"{scheme.name} multiplies a stream by {step.scale:g}, and a product of integer streams by a "
                    "non-integer loses bits that undo cannot restore")
    if scheme.open is None:
        return f"{scheme.name} splits the hidden state into feature halves"
    return None


def resolve_exact(scheme: Scheme, exact: bool | None, headroom: int | None) -> bool | None:
    """make_reversible's `exact`, validated: False where the scheme cannot be exact, else as given (None: decided
    per run by `exact_by_default`)."""
    if headroom is not None and (not isinstance(headroom, int) or not 0 <= headroom <= 30):
        raise RevcompileError(f"exact_headroom must be an integer number of bits from 0 to 30, got {headroom!r}")
    refusal = exact_refusal(scheme)
    if exact and refusal:
        raise RevcompileError(f"exact=True is not available for this scheme: {refusal}. Pass exact=False (float "
                              "streams; the README measures their error) or use a scheme whose steps add "
                              "(symplectic, midpoint, leapfrog)")
    return False if refusal else exact


# NOTE: the default. Float streams lose bits wherever a step adds in 16-bit arithmetic: bf16/fp16 hidden states, or
# fp32 ones whose branches run under autocast (their outputs are bf16). In plain fp32 they rebuild inputs to ~1e-7
# over 16 layers, and integer streams would double the streams' memory (int64) for that; in fp64 an int64 grid is
# coarser than the floats themselves.
def exact_by_default(h: torch.Tensor) -> bool:
    """Does a run whose input is `h` compute in 16 bits (so that exact streams pay)?"""
    return h.dtype in (torch.bfloat16, torch.float16) or (h.dtype == torch.float32
                                                          and torch.is_autocast_enabled(h.device.type))


def updated_streams(scheme: Scheme) -> tuple[str, ...]:
    """The streams a step writes or the output order moves: these become integers; the rest stay the input."""
    moved = {s for s, o in zip(scheme.streams, scheme.output_order) if s != o} if scheme.output_order else set()
    return tuple(s for s in scheme.streams if s in {step.target for step in scheme.steps} | moved)


class FloatStreams:
    """The steps in the model's floating point: the scheme's own arithmetic, unchanged."""

    exact = False

    def __init__(self, scheme: Scheme):
        self.scheme = scheme

    def open(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.scheme.open_streams(h)

    def view(self, state: dict[str, torch.Tensor], stream: str) -> torch.Tensor:
        return state[stream]

    def apply(self, step: Step, state: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return step.apply(state, out)

    def undo(self, step: Step, state: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return step.undo(state, out)

    def merge(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scheme.merge_streams(state)

    def unopen(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scheme.unopen(state)

    # streams travel between layers packed along a new leading dimension; unbind gives contiguous views
    def pack(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([state[s] for s in self.scheme.streams])

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        if packed.shape[0] != len(self.scheme.streams):
            raise RevcompileError("a converted layer received a hidden state instead of packed streams: converted "
                                  "layers must be called in order, from the first of their run to the last")
        return dict(zip(self.scheme.streams, packed.unbind(0)))

    def unpack_grad(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.scheme.streams, grad.unbind(0)))

    def pack_grad(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([grads[s] for s in self.scheme.streams])

    def input_error(self, true: torch.Tensor, rebuilt: torch.Tensor) -> float:
        """Relative error of a rebuilt layer input (as packed, or h for a run's first layer)."""
        return _relative(rebuilt.double() - true.double(), true.double())


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float:
    return float(difference.norm() / reference.norm().clamp_min(1e-300))


class ExactStreams(FloatStreams):
    """The steps on fixed-point integer streams (see the module's NOTE): forward and undo are exact inverses.

    State: int tensors for `updated_streams`, the run's input for the others. Packed between layers as one
    integer tensor (float streams as their bits) viewed as a float of the same width (autograd carries only
    floating-point tensors); its gradient is an ordinary float tensor of that type.
    """

    exact = True

    def __init__(self, scheme: Scheme, fmt: FixedPoint, compiled: bool = False):
        super().__init__(scheme)
        self.fmt = fmt
        self.integers = set(updated_streams(scheme))
        self._kernels = compiled_steps() if compiled else (step_integers, undo_integers)
        self.choices_differ: torch.Tensor | None = None  # a compiled recompute's expert choices (function.py)

    def flag_choices(self, differs: torch.Tensor | None) -> None:
        """Record (on the device) whether a recompute chose other experts than its forward."""
        if differs is not None:
            self.choices_differ = differs if self.choices_differ is None else self.choices_differ | differs

    def raise_if_choices_differed(self) -> None:
        if self.choices_differ is not None and bool(self.choices_differ):
            raise RevcompileError(CHOICES_DIFFER)

    def open(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: self.fmt.quantize(h, c) if s in self.integers else (h if c == 1 else c * h)
                for s, c in self.scheme.open.items()}

    def view(self, state: dict[str, torch.Tensor], stream: str) -> torch.Tensor:
        return self.fmt.dequantize(state[stream]) if stream in self.integers else state[stream]

    def _integer(self, state: dict[str, torch.Tensor], stream: str) -> torch.Tensor:
        return state[stream] if stream in self.integers else self.fmt.quantize(state[stream])

    def _step_args(self, step: Step, state: dict[str, torch.Tensor], out: torch.Tensor) -> tuple:
        mixes = [self._integer(state, source) for source, _ in step.mix]
        coeffs = tuple(int(coeff) for _, coeff in step.mix)
        return (state[step.target], out.detach(), mixes, coeffs, step.scale == -1,
                *self.fmt.grid(out, step.branch_scale))

    def apply(self, step: Step, state: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        new, self.fmt.overflow = self._kernels[0](*self._step_args(step, state, out), self.fmt.overflow)
        return new

    def undo(self, step: Step, state: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return self._kernels[1](*self._step_args(step, state, out))

    def merge(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        values = ((self.fmt.dequantize(state[s], self.fmt.arithmetic) if s in self.integers
                   else state[s].to(self.fmt.arithmetic), c) for s, c in self.scheme.merge.items())
        return weighted_sum(values).to(self.fmt.dtype)  # (a generator: one dequantized stream at a time)

    def unopen(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        # a stream that kept the input holds it exactly; an integer stream holds it on the grid
        kept = [s for s, c in self.scheme.open.items() if c == 1 and s not in self.integers]
        if kept:
            return state[kept[0]]
        stream, coeff = next((s, c) for s, c in self.scheme.open.items() if c)
        return self.fmt.dequantize(state[stream]) / coeff

    def pack(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = [state[s] if s in self.integers else self.fmt.to_bits(state[s]) for s in self.scheme.streams]
        return torch.stack(rows).view(CARRIER[self.fmt.int_dtype])

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        if packed.dtype != CARRIER[self.fmt.int_dtype]:
            raise RevcompileError("a converted layer in exact mode received a tensor that is not its run's packed "
                                  "streams: converted layers must be called in order, from the first of their run "
                                  "to the last")
        rows = super().unpack(packed.view(self.fmt.int_dtype))
        return {s: v if s in self.integers else self.fmt.from_bits(v) for s, v in rows.items()}

    def unpack_grad(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: g.to(self.fmt.dtype) for s, g in super().unpack_grad(grad).items()}

    def pack_grad(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().pack_grad(grads).to(CARRIER[self.fmt.int_dtype])

    def input_error(self, true: torch.Tensor, rebuilt: torch.Tensor) -> float:
        """0.0 exactly when every bit was rebuilt; else the relative error in grid units."""
        if true.dtype == self.fmt.dtype:  # a run's first layer: its input h, as the run holds it (on the grid)
            return super().input_error(self.unopen(self.open(true)), rebuilt)
        true, rebuilt = true.view(self.fmt.int_dtype), rebuilt.view(self.fmt.int_dtype)
        return _relative((rebuilt - true).double(), true.double())


def _on_grid(x: torch.Tensor, upcast: torch.dtype | None, factor: torch.Tensor) -> torch.Tensor:
    return torch.round((x if upcast is None else x.to(upcast)) * factor)


def step_integers(target: torch.Tensor, out: torch.Tensor, mixes: list[torch.Tensor], coeffs: tuple[int, ...],
                  negate: bool, upcast: torch.dtype | None, factor: torch.Tensor,
                  overflow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact step on integers: (±target + sum(c * mix) + round(out * factor), overflow raised to the bound on
    that result). `undo_integers` with the same arguments returns `target` again, bit for bit."""
    scaled = _on_grid(out, upcast, factor)
    bound = _magnitude(target) + _float_magnitude(scaled)  # (bounds the delta too: checked once, as a sum)
    delta = scaled.to(target.dtype)
    del scaled  # (eager: the float temporary goes before the sum is made)
    new = -target if negate else target
    for value, coeff in zip(mixes, coeffs):
        new = new + coeff * value
        bound = bound + abs(coeff) * _magnitude(value)
    return new + delta, torch.maximum(overflow, bound)


def undo_integers(target: torch.Tensor, out: torch.Tensor, mixes: list[torch.Tensor], coeffs: tuple[int, ...],
                  negate: bool, upcast: torch.dtype | None, factor: torch.Tensor) -> torch.Tensor:
    """The old target of `step_integers`, from its new one and the same branch output."""
    old = target - _on_grid(out, upcast, factor).to(target.dtype)
    for value, coeff in zip(mixes, coeffs):
        old = old - coeff * value
    return -old if negate else old


# NOTE: compiled steps (compile=True and the torch.compile backend). Eager, a step is about ten kernels, each a pass
# over a stream (scale, round, two range reductions, convert, add, ...); Inductor fuses them into one or two. The
# integers are the eager ones: scaling by a power of two, rounding and converting an integral float are exact in
# any kernel, and a non-power-of-two scale is one float32 product in both (tests/test_exact.py compares them).
@cache
def compiled_steps() -> tuple:
    """(step_integers, undo_integers) compiled with Inductor, once per process (shared by every model)."""
    return torch.compile(step_integers), torch.compile(undo_integers)


def _magnitude(v: torch.Tensor) -> torch.Tensor:
    """max |v| of an integer stream as a 0-d float64 tensor on v's device (no temporary of v's size).

    NOTE: -low wraps only for the type's minimum, which a stream holds only after a step already flagged.
    """
    low, high = torch.aminmax(v)
    return torch.maximum(-low, high).to(torch.float64)


def _float_magnitude(y: torch.Tensor) -> torch.Tensor:
    """max |y| of a float tensor as a 0-d float64 tensor (nan if y holds one), in one reduction."""
    return torch.linalg.vector_norm(y, math.inf).to(torch.float64)
