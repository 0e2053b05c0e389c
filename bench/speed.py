"""Training-step time of plain training, HF activation checkpointing and revcompile, each eager and under
torch.compile, and of torch selective checkpointing, side by side in one run, as ratios to plain eager and to HF
checkpointing in the same mode (compiled compared with compiled); and the FLOPs of a step
(torch.utils.flop_counter.FlopCounterMode).

    python bench/speed.py                         # CPU -> bench/results/speed_cpu.{md,json,png}
    python bench/speed.py --device cuda --dtype bfloat16   # on a GPU (a larger config) -> speed_cuda.*
    python bench/speed.py --device cuda --dtype bfloat16 --large   # hidden 2048, 64 experts top-8, 16 layers
    python bench/speed.py --small --out /tmp/s    # a dry run of the script, tiny config
    python bench/speed.py --profile               # also: where the time of a step goes, per method
    python bench/speed.py --cpu-seconds           # CPU seconds of one thread per step: steady on a loaded machine
    python bench/speed.py --breakdown             # also: each method's step split by phase (bench/phases.py)
    python bench/speed.py --cpu-seconds --dtype bfloat16 --set batch=2 seq=256 --out bench/results/bf16
                                                  # another config: entries overridden

Config (compute dominates): tiny Mixtral, hidden 256, 4 layers, 8 heads, 4 experts top-2 (intermediate 512),
Hugging Face's "grouped_mm" experts (the "eager" ones break Dynamo's graph), sdpa attention, fp32, batch 4 x 512
tokens. Every method's model is built from the same seed in this one process; after warm-up steps (compilation
included) the methods take turns, one step each, `--rounds` times, and a method's figure is its median step.
NOTE: on CPU the process runs with glibc told to keep the memory it frees (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`), as CUDA's caching allocator does: otherwise the step of a method that allocates more
(plain training) is timed mostly by page faults of memory handed back to the kernel and taken again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tabulate import tabulate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.measure import METHOD_LABELS, SPEED_METHODS, prepare
from revcompile.models import tiny_config, tiny_model_from_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 1024,
          "max_position_embeddings": 1024, "batch": 4, "seq": 512}
# on a GPU the CPU config would time kernel launches: a model a GPU has to work on
CUDA_CONFIG = dict(CONFIG, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, num_local_experts=8, vocab_size=32000, max_position_embeddings=2048,
                   batch=8, seq=1024)
# a MoE of a real model's width (hidden 2048, 64 experts top-8, 16 layers; expert width 512 so that every method's
# model and gradients fit one 141 GB GPU together); --large, for a GPU
LARGE_CUDA_CONFIG = dict(CUDA_CONFIG, hidden_size=2048, intermediate_size=512, num_hidden_layers=16,
                         num_local_experts=64, num_experts_per_tok=8, batch=4)
LARGE_METHODS = ("plain", "compiled", "checkpointing", "checkpointing-compiled", "revcompile", "revcompile-backend")
SMALL = dict(CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, batch=2, seq=32)
# FlopCounterMode, op count
EAGER = ("plain", "checkpointing", "selective", "revcompile", "revcompile-unchunked", "revcompile-float",
         "revcompile-reference", "checkpointing-chunked", "revcompile-original-head", "revcompile-record-all")
# the layers alone: revcompile and HF checkpointing with the same LM head (its chunked one, or HF's)
SAME_HEAD = (("revcompile", "checkpointing-chunked"), ("revcompile-original-head", "checkpointing"))
COMPILED = ("compiled", "checkpointing-compiled", "revcompile-compiled", "revcompile-backend",
            "revcompile-compiled-float", "revcompile-compiled-two-calls")
PROFILED = ("plain", "checkpointing", "revcompile", "revcompile-unchunked", "compiled", "checkpointing-compiled",
            "revcompile-backend")
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


class _Global:
    """Stands in for FlopCounterMode's ModuleTracker: only the total is needed here.

    NOTE: the tracker hooks every module call and registers gradient hooks on its inputs, which fails inside a
    custom autograd Function (a no-grad view of a tensor that requires grad has no grad_fn) and breaks
    `torch.autograd.grad` in its backward (gradient hooks on leaves); checkpointing's recompute is not affected.
    """

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a step runs that compute something (views and bare allocations left out): on a GPU
    each is a kernel launch, so this count is the eager step's launch overhead, measurable on any device."""

    FREE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
            torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of `addmm(self, a, b)` from the shapes (FlopCounterMode's custom_mapping form)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


class Trainer:
    """One method's model and a training step of it (forward, backward, gradients kept allocated)."""

    def __init__(self, method: str, config: dict, device: str, dtype: torch.dtype = torch.float32,
                 clock=time.perf_counter):
        model_config = {k: v for k, v in config.items() if k not in ("batch", "seq")}
        torch.manual_seed(0)
        cfg = tiny_config("mixtral", attn_implementation="sdpa", experts_implementation="grouped_mm", **model_config)
        self.model = tiny_model_from_config(cfg, dtype).to(device)
        self.model.config.use_cache = False
        self.forward = prepare(self.model, method)
        self.model.train()
        self.ids = torch.randint(3, cfg.vocab_size, (config["batch"], config["seq"]),
                                 generator=torch.Generator().manual_seed(1)).to(device)
        self.cuda = device.startswith("cuda")
        self.clock = clock

    def step(self) -> float:
        """One training step; its time in seconds by `clock` (wall time, or the process's CPU time)."""
        if self.cuda:
            torch.cuda.synchronize()
        start = self.clock()
        self.forward(self.ids, labels=self.ids).loss.backward()
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = self.clock() - start
        self.model.zero_grad(set_to_none=False)
        return elapsed

    def _step_under(self, mode):
        """One training step run under a counting mode (FLOPs, operators); gradients zeroed after it."""
        with mode:
            self.forward(self.ids, labels=self.ids).loss.backward()
        self.model.zero_grad(set_to_none=False)
        return mode

    def flops(self) -> int:
        """FLOPs of one training step (torch's counter knows `addmm`, not the in-place `addmm_` that the chunked
        head accumulates its weight gradient with: counted here alike)."""
        counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
        counter.mod_tracker = _Global()
        return self._step_under(counter).get_total_flops()

    def op_count(self) -> int:
        """Aten operators of one training step that compute (`_OpCounter`)."""
        return self._step_under(_OpCounter()).count

    def layer_forward_flops(self) -> int:
        """FLOPs of the decoder layers in one forward (what a recompute of every layer costs)."""
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.forward(self.ids, labels=self.ids)
        return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if re.search(r"\.layers\.\d+$", name))


def profile_table(trainers: dict[str, Trainer], methods: list[str], steps: int = 2, rows: int = 15) -> str:
    """Self time per op (ms per step, calls per step) of each method's steps, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per_method = {}
    for method in methods:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainers[method].step()
        per_method[method] = {e.key: (e.self_device_time_total if trainers[method].cuda else e.self_cpu_time_total,
                                      e.count) for e in prof.key_averages()}
    ops = sorted(set().union(*per_method.values()),
                 key=lambda k: -max(p.get(k, (0, 0))[0] for p in per_method.values()))[:rows]

    def cell(method: str, op: str) -> str:
        self_time, calls = per_method[method].get(op, (0, 0))
        return f"{self_time / 1e3 / steps:.1f} ({calls // steps})"

    table = [[op[:60], *(cell(m, op) for m in methods)] for op in ops]
    totals = ["all ops", *(f"{sum(v[0] for v in per_method[m].values()) / 1e3 / steps:.1f}" for m in methods)]
    return tabulate([*table, totals], headers=["op: self ms per step (calls)", *methods], tablefmt="github")


def measure(args: argparse.Namespace) -> dict:
    config = SMALL if args.small else LARGE_CUDA_CONFIG if args.large else \
        CUDA_CONFIG if args.device.startswith("cuda") else CONFIG
    config = dict(config, **args.set)
    if args.cpu_seconds:
        torch.set_num_threads(1)
    clock = time.process_time if args.cpu_seconds else time.perf_counter
    trainers = {}
    for method in args.methods:
        trainers[method] = Trainer(method, config, args.device, getattr(torch, args.dtype), clock)
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainers[method].step()
        print(f"{method}: ready ({time.perf_counter() - start:.1f} s of warm-up steps)", flush=True)
    times = {m: [] for m in args.methods}
    for r in range(args.rounds):
        order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]  # turns rotate
        for method in order:
            times[method].append(trainers[method].step())
    flops = {m: trainers[m].flops() for m in args.methods if m in EAGER}
    ops = {m: trainers[m].op_count() for m in args.methods if m in EAGER}
    layer_flops = trainers["plain"].layer_forward_flops() if "plain" in trainers else None
    result = {"config": config, "device": args.device, "dtype": args.dtype, "rounds": args.rounds, "times": times,
              "flops": flops, "ops": ops,
              "layer_forward_flops": layer_flops, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "clock": "CPU seconds" if args.cpu_seconds else "wall time"}
    if args.profile:
        result["profile"] = profile_table(trainers, [m for m in PROFILED if m in trainers])
    if args.breakdown:
        from phases import breakdown_table

        result["breakdown"], result["phases"] = breakdown_table(trainers, args.methods, METHOD_LABELS)
    return result


def baseline_of(method: str) -> str:
    """The HF checkpointing a method is compared with: compiled methods with compiled checkpointing."""
    return "checkpointing-compiled" if method in COMPILED else "checkpointing"


def goals_of(device: str) -> list[tuple[str, str, float]]:
    """(method, what it is divided by, limit) of issue 15's goals on a device."""
    eager_vs_checkpointing = 0.9 if device.startswith("cuda") else 1.0
    return [("revcompile", "plain", 1.35), ("revcompile", "checkpointing", eager_vs_checkpointing),
            ("revcompile-compiled", "compiled", 1.4), ("revcompile-compiled", "checkpointing-compiled", 1.0),
            ("revcompile-backend", "compiled", 1.4), ("revcompile-backend", "checkpointing-compiled", 1.0)]


def paired_ratio(times: dict[str, list[float]], method: str, versus: str) -> tuple[float, float, float]:
    """(median, 5th and 95th percentile by bootstrap) of `method`'s step time over `versus`'s, round by round.

    NOTE: the methods take turns, so the two steps of a round ran within seconds of each other: their ratio
    cancels the machine's slower drifts, which a ratio of the two medians keeps.
    """
    ratios = [a / b for a, b in zip(times[method], times[versus])]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), medians[100], medians[1899]


def verdict(low: float, high: float, limit: float) -> str:
    """A goal `ratio <= limit` judged on the ratio's interval (low, high)."""
    return "met" if high <= limit else "MISSED" if low > limit else "not separable from the goal at this noise"


def report(result: dict, stem: str, command: str) -> str:
    times, flops, fwd = result["times"], result["flops"], result["layer_forward_flops"]
    ops = result.get("ops", {})
    methods = list(times)
    median = {m: statistics.median(times[m]) for m in methods}
    base = median.get("plain")
    rows = []
    for m in methods:
        versus = median.get(baseline_of(m))
        row = [METHOD_LABELS[m], f"{median[m] * 1e3:.0f}", f"{median[m] / base:.2f}" if base else "",
               f"{median[m] / versus:.2f}" if versus else "", f"{min(times[m]) * 1e3:.0f}-{max(times[m]) * 1e3:.0f}"]
        if m in flops and "plain" in flops:
            row += [f"{flops[m] / 1e9:.2f}", f"{flops[m] / flops['plain']:.2f}",
                    f"{(flops[m] - flops['plain']) / fwd:+.2f}" if fwd else ""]
        else:
            row += ["", "", ""]
        rows.append(row + [ops.get(m, "")])
    table = tabulate(rows, headers=["method", "median step ms", "time vs plain eager",
                                    "time vs HF checkpointing (same mode)", "range ms", "GFLOP / step",
                                    "FLOPs vs plain", "extra FLOPs / layers' forward", "aten ops / step"],
                     tablefmt="github")
    goals = []
    for method, versus, limit in goals_of(result["device"]):
        if method in median and versus in median:
            value, low, high = paired_ratio(times, method, versus)
            goals.append(f"{METHOD_LABELS[method]} / {METHOD_LABELS[versus]}: {value:.3f} (90 % interval "
                         f"{low:.3f}-{high:.3f}; goal <= {limit:.2f}: {verdict(low, high, limit)})")
    for method, versus in SAME_HEAD:
        if method in median and versus in median:
            value, low, high = paired_ratio(times, method, versus)
            goals.append(f"{METHOD_LABELS[method]} / {METHOD_LABELS[versus]}: {value:.3f} (90 % interval "
                         f"{low:.3f}-{high:.3f}; the same LM head: the layers alone)")
    if "revcompile-record-all" in median and "revcompile" in median:
        value, low, high = paired_ratio(times, "revcompile", "revcompile-record-all")
        goals.append(f"{METHOD_LABELS['revcompile']} / {METHOD_LABELS['revcompile-record-all']}: {value:.3f} (90 % "
                     f"interval {low:.3f}-{high:.3f}; routing recorded inside the router alone)")
    if "revcompile-compiled-float" in median and "revcompile-compiled-two-calls" in median:
        value, low, high = paired_ratio(times, "revcompile-compiled-float", "revcompile-compiled-two-calls")
        goals.append(f"{METHOD_LABELS['revcompile-compiled-float']} / "
                     f"{METHOD_LABELS['revcompile-compiled-two-calls']}: {value:.3f} (90 % interval {low:.3f}-"
                     f"{high:.3f}; a branch's recompute and backward in one compiled call)")
    if "revcompile-unchunked" in median and "checkpointing" in median:
        goals.append(f"{METHOD_LABELS['revcompile-unchunked']} / {METHOD_LABELS['checkpointing']}: "
                     f"{median['revcompile-unchunked'] / median['checkpointing']:.2f} (the MoE recompute in one piece: "
                     "faster, more memory on CPU; the default on CUDA)")
    cfg = ", ".join(f"{k}={v}" for k, v in result["config"].items())
    text = (f"# Training-step time ({result['device']})\n\n`{command}`; tiny Mixtral, {cfg}, grouped_mm experts, sdpa, "
            f"{result.get('dtype', 'float32')}, torch {result['torch']}, {result['threads']} threads. "
            f"Median of {result['rounds']} steps per method ({result.get('clock', 'wall time')}) after warm-up, "
            "the methods taking turns; FLOPs of one step by FlopCounterMode (eager methods; compiled ones run the "
            "same arithmetic); 'extra FLOPs' are the FLOPs a method adds to plain training, in units of one forward "
            "of the decoder layers (1.0: one extra forward); 'aten ops' the operators of one eager step that compute "
            "(views left out), each a kernel launch on a GPU. Compiled methods are compared with HF checkpointing "
            "under torch.compile, eager ones with HF checkpointing eager.\n\n"
            f"{table}\n\nGoals (issue 15), each a median of the per-round ratios (the two steps of a round ran "
            "back to back) with a bootstrap 90 % interval; a goal is met when the whole interval is within it:\n\n"
            + "\n".join(f"- {g}" for g in goals) + "\n")
    if "profile" in result:
        text += ("\n## Where the time goes\n\ntorch.profiler over two steps of each method: self time per op, per "
                 "step (calls per step in brackets); Python time outside ops is in no row, so totals fall short of "
                 f"the step.\n\n{result['profile']}\n")
    if "breakdown" in result:
        text += ("\n## Where the time goes, by phase\n\nNine more steps of each method (taking turns), each split "
                 "into phases by timing the functions of `revcompile.runtime.function` that run them "
                 "(`bench/phases.py`); a phase's time excludes the phases inside it, and 'outside the converted "
                 f"layers' is what is left of the forward and of the backward.\n\n{result['breakdown']}\n")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ys = range(len(methods))[::-1]
    unit = "plain" if base else methods[0]  # a run without plain training is drawn against its first method
    base = median[unit]
    ax.barh(ys, [median[m] / base for m in methods], tick_label=[METHOD_LABELS[m] for m in methods],
            color=["tab:orange" if m.startswith("revcompile") else "tab:gray" for m in methods], label="step time")
    ax.scatter([flops[m] / flops["plain"] for m in methods if m in flops and "plain" in flops],
               [y for y, m in zip(ys, methods) if m in flops and "plain" in flops], marker="D", color="black",
               zorder=3, label="FLOPs")
    ax.axvline(1.0, color="black", lw=0.8)
    if unit == "plain":
        ax.axvline(1.35, color="tab:red", ls=":", lw=1, label="goal for revcompile eager (1.35)")
    ax.set(xlabel=f"ratio to {METHOD_LABELS[unit]} (median step)",
           title=f"Training step, tiny Mixtral ({result['device']})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, 1.45 * max(median[m] / base for m in methods))
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=SPEED_METHODS,
                        help="default: every method (LARGE_METHODS with --large)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (bfloat16 on a GPU, say)")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per method (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (compilation)")
    parser.add_argument("--small", action="store_true", help="a tiny config: a dry run of the script")
    parser.add_argument("--large", action="store_true", help="the larger GPU config (LARGE_CUDA_CONFIG); methods "
                        "default to LARGE_METHODS, results to speed_<device>_large.*")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table per method")
    parser.add_argument("--breakdown", action="store_true", help="add each method's step split by phase "
                        "(bench/phases.py)")
    parser.add_argument("--cpu-seconds", action="store_true", help="CPU: one thread, each step timed in the "
                        "process's CPU seconds (other processes on the machine barely move it), results to "
                        "speed_cpu_seconds.*")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=N",
                        help="override config entries (hidden_size=128 batch=2 seq=256 ...)")
    parser.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot")
    parser.add_argument("--from-json", help="redraw the table and plot from an earlier run's JSON")
    args = parser.parse_args()
    overrides = args.set
    pairs = [item.split("=", 1) for item in overrides]
    if any(len(pair) != 2 or pair[0] not in CONFIG or not pair[1].isdigit() for pair in pairs):
        parser.error(f"--set takes KEY=N with N a whole number and KEY one of {sorted(CONFIG)}; got {overrides}")
    args.set = {key: int(value) for key, value in pairs}
    explicit_methods = bool(args.methods)
    args.methods = args.methods or list(LARGE_METHODS if args.large else SPEED_METHODS)
    allocator_unset = any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items())
    if args.device == "cpu" and not args.from_json and allocator_unset:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})  # see NOTE above
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = measure(args)
    os.makedirs(args.out, exist_ok=True)
    suffix = "_large" if args.large else "_seconds" if args.cpu_seconds else ""
    stem = os.path.join(args.out, f"speed_{result['device'].split(':')[0]}{suffix}")
    command = "python bench/speed.py" + (f" --device {args.device}" if args.device != "cpu" else "") + \
        (f" --dtype {args.dtype}" if args.dtype != "float32" else "") + (" --large" if args.large else "") + \
        (" --cpu-seconds" if args.cpu_seconds else "") + (" --small" if args.small else "") + \
        (" --profile" if args.profile else "") + (" --breakdown" if args.breakdown else "") + \
        (" --set " + " ".join(overrides) if overrides else "") + \
        (f" --rounds {args.rounds}" if args.rounds != parser.get_default("rounds") else "") + \
        (" --methods " + " ".join(args.methods) if explicit_methods else "") + \
        (f" --out {os.path.relpath(args.out)}" if os.path.abspath(args.out) != RESULTS else "")
    text = report(result, stem, command)
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
