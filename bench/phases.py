"""Where a reversible training step's time goes, by phase: the model outside the converted layers, the coupling's
own bookkeeping (streams, slots, undo, gradient sums), the branch calls of forward, their recompute in backward and
the branches' backward (`torch.autograd.grad`), or those two in one compiled call; forward and backward apart. Used
by `bench/speed.py --breakdown`.

The phases are timed by wrapping the functions of `revcompile.runtime.function` that run them, for the steps of the
breakdown only; a phase's time excludes the phases timed inside it (a branch call inside the Function's forward is
the branch's, not the Function's). On CUDA each boundary synchronizes the device, so every phase is charged for its
own kernels (the steps run slower than untimed ones: compare the phases, not their sum, with the timed steps).

Example:
    >>> clock = PhaseClock(time.process_time, cuda=False)
    >>> with clock.timing():
    ...     with clock.phase("forward"):
    ...         loss = model(ids, labels=ids).loss
    >>> clock.totals               # {"forward": seconds, "forward: branches (routing recorded)": ...}
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Callable

import torch
from tabulate import tabulate

from revcompile.runtime import compiled, function

# (attribute of revcompile.runtime.function, phase while it runs outside another phase than its direction's own)
WRAPPED = (("run_recorded", "branches (routing recorded)"), ("run_replayed", "branch recompute"),
           ("run_recorded_again", "branch recompute"), ("_solve", "fixed-point iteration"))
FUNCTION = "coupling's own work (streams, slots, undo, gradient sums)"
OUTSIDE = "model outside the converted layers (embedding, masks, head, loss; autograd engine)"
BRANCH_BACKWARD = "branches' backward (autograd.grad)"
ONE_CALL = "branch recompute and backward in one compiled call"


class PhaseClock:
    """Exclusive time per phase name, phases nested (a stack); `timing()` wraps revcompile's runtime functions."""

    def __init__(self, clock: Callable[[], float], cuda: bool):
        self.clock, self.cuda = clock, cuda
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time of the phases inside it]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()

    @contextmanager
    def phase(self, name: str):
        direction = self._stack[0][0] if self._stack else name  # "forward" or "backward"
        full = name if not self._stack else f"{direction}: {name}"
        entry = [full, self._now(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            elapsed = self._now() - entry[1]
            self._stack.pop()
            self.totals[full] = self.totals.get(full, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def _wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            if self._stack and self._stack[-1][0].endswith(WRAPPED[-1][1]):
                return fn(*args, **kwargs)  # the iterations' branch calls belong to the iteration
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    @contextmanager
    def timing(self):
        """Wrap the runtime's functions (and torch.autograd.grad, which only the Function's backward calls in these
        steps; and a compiled branch's one-call recompute and backward) while the block runs."""
        saved = [(function, attr, getattr(function, attr)) for attr, _ in WRAPPED]
        saved += [(function.ReversibleCoupling, "forward", function.ReversibleCoupling.forward),
                  (function.ReversibleCoupling, "backward", function.ReversibleCoupling.backward),
                  (torch.autograd, "grad", torch.autograd.grad),
                  (compiled.LayerBranch, "vjp", compiled.LayerBranch.vjp)]
        for attr, name in WRAPPED:
            setattr(function, attr, self._wrap(getattr(function, attr), name))
        function.ReversibleCoupling.forward = staticmethod(self._wrap(function.ReversibleCoupling.forward, FUNCTION))
        function.ReversibleCoupling.backward = staticmethod(self._wrap(function.ReversibleCoupling.backward,
                                                                       FUNCTION))
        torch.autograd.grad = self._wrap(torch.autograd.grad, BRANCH_BACKWARD)
        compiled.LayerBranch.vjp = self._wrap(compiled.LayerBranch.vjp, ONE_CALL)
        try:
            yield self
        finally:
            for owner, attr, value in saved:
                setattr(owner, attr, staticmethod(value) if owner is function.ReversibleCoupling else value)



def phase_step(trainer) -> dict[str, float]:
    """One training step of a `speed.Trainer`, split by phase (seconds)."""
    clock = PhaseClock(trainer.clock, trainer.cuda)
    with clock.timing():
        with clock.phase("forward"):
            loss = trainer.forward(trainer.ids, labels=trainer.ids).loss
        with clock.phase("backward"):
            loss.backward()
    trainer.model.zero_grad(set_to_none=False)
    totals = dict(clock.totals)
    for direction in ("forward", "backward"):  # what no other phase took: the model's own code
        totals[f"{direction}: {OUTSIDE}"] = totals.pop(direction)
    return totals


def breakdown_table(trainers: dict, methods: list[str], labels: dict[str, str], steps: int = 9) -> tuple[str, dict]:
    """(markdown table, {method: {phase: median ms per step}}) of `steps` steps of each method split by phase, the
    methods taking turns (as in the timed rounds: a slower spell of the machine falls on all of them alike)."""
    runs = {method: [] for method in methods}
    for _ in range(steps):
        for method in methods:
            runs[method].append(phase_step(trainers[method]))
    medians = {method: {name: 1e3 * statistics.median(run.get(name, 0.0) for run in runs[method])
                        for name in set().union(*runs[method])} for method in methods}
    names = sorted(set().union(*medians.values()), key=_order)
    rows = [[name, *(f"{medians[m][name]:.2f}" if name in medians[m] else "" for m in methods)] for name in names]
    rows.append(["sum", *(f"{sum(medians[m].values()):.2f}" for m in methods)])
    return tabulate(rows, headers=["phase: ms per step (median)", *(labels[m] for m in methods)],
                    tablefmt="github"), medians


def _order(name: str) -> tuple:
    direction, _, phase = name.partition(": ")
    rank = [OUTSIDE, FUNCTION, *(n for _, n in WRAPPED), BRANCH_BACKWARD, ONE_CALL]
    return (direction != "forward", rank.index(phase) if phase in rank else len(rank), name)
