"""Measure one training step of a method side by side with the others: real peak memory and time.

Each measurement runs in a child process (`python -m revcompile.measure`), so one method's allocations never
colour another's. Memory is real peak memory above the pre-step level:
- CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before the step. The child runs with
  glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072); with the default dynamic threshold freed tensors
  stay in the heap and RSS overstates every method.
- CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the step.
A warm-up step runs first and gradients stay allocated (zero_grad(set_to_none=False)), so the figure is what a
step adds on top of weights and gradients: activations and the backward's working set.

Example:
    >>> measure_step("revcompile", depth=8)["peak_mb"]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

METHODS = ("plain", "checkpointing", "selective", "revcompile")
# more ways to train, for speed (bench/speed.py): compiled ones, and revcompile recomputing MoE branches in 4 slices
SPEED_METHODS = ("plain", "compiled", "checkpointing", "checkpointing-compiled", "selective", "revcompile",
                 "revcompile-unchunked", "revcompile-compiled", "revcompile-backend", "revcompile-float",
                 "revcompile-reference", "checkpointing-chunked", "revcompile-original-head", "revcompile-record-all",
                 "revcompile-compiled-float", "revcompile-compiled-two-calls")
# the whole step at a real vocabulary (bench/maxbatch.py): baselines with their default loss and with the chunked one
HEAD_METHODS = ("plain", "checkpointing", "checkpointing-chunked", "revcompile-original-head", "revcompile")
METHOD_LABELS = {
    "plain": "plain training",
    "checkpointing": "HF activation checkpointing",
    "selective": "torch selective checkpointing",
    "revcompile": "revcompile (reversible)",
    "compiled": "plain torch.compile",
    "checkpointing-compiled": "HF activation checkpointing, torch.compile",
    "revcompile-unchunked": "revcompile, recompute_chunks=1 (one piece)",
    "revcompile-compiled": "revcompile, compile=True",
    "revcompile-backend": 'torch.compile(backend="revcompile")',
    "revcompile-float": "revcompile, exact=False (float streams)",
    "revcompile-reference": "revcompile's coupling, ordinary autograd (invert=False)",
    "checkpointing-chunked": "HF activation checkpointing + chunked loss",
    "checkpointing-offload-chunked": "HF activation checkpointing, offloaded to host memory, + chunked loss",
    "revcompile-original-head": "revcompile, head=\"original\"",
    "revcompile-record-all": "revcompile, routing recorded over every op (before)",
    "revcompile-compiled-float": "revcompile, compile=True, exact=False",
    "revcompile-compiled-two-calls": "revcompile, compile=True, exact=False, recompute + backward in two calls",
}
# A config where activations dominate (issue 2): tiny Mixtral, hidden 128, sdpa attention, fp32.
MEMORY_CONFIG = dict(model_type="mixtral", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256, batch=4, seq=512)


def _selective_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    keep = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def parse_scheme(spec: str) -> tuple[str, dict[str, Any]]:
    """A scheme and its options as bench/ names them: "fixed_point:anderson=0,max_iters=100" -> ("fixed_point",
    {"anderson": 0, "max_iters": 100}) (values are Python literals)."""
    name, _, options = spec.partition(":")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"scheme option {item!r} in {spec!r}: write KEY=VALUE, e.g. fixed_point:anderson=0")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"scheme option {item!r} in {spec!r}: the value must be a Python literal (a number, "
                             "True, None, a quoted string)") from None
    return name, parsed


def hf_checkpointing(model: torch.nn.Module, on: bool = True, offload: bool = False, **checkpoint_kwargs: Any) -> None:
    """Switch Hugging Face activation checkpointing on (non-reentrant `torch.utils.checkpoint`; `checkpoint_kwargs`
    go to it) or off: through `activation_checkpointing_enable` where transformers has it (later 5.x releases;
    `offload`: the layer inputs kept for the recompute go to pinned host memory), else the older, now deprecated
    `gradient_checkpointing_enable`.

    Example:
        >>> hf_checkpointing(model, offload=True)      # the baseline a GPU user short of memory would pick
    """
    new_api = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        return
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    if new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        raise RuntimeError("this transformers has no activation_checkpointing_enable(offload=True); upgrade it")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _converted_with(model: torch.nn.Module, options: dict, **runtime: Any) -> torch.nn.Module:
    """make_reversible(model, **options), then each converted layer's runtime attributes set (an earlier behaviour
    kept for measuring against)."""
    import revcompile
    from revcompile.api import converted_layers

    revcompile.make_reversible(model, **options)
    for layer in converted_layers(model):
        for name, value in runtime.items():
            setattr(layer._revcompile, name, value)
    return model


def prepare(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """Set `model` up for training with `method` (one of SPEED_METHODS, or "revcompile:SCHEME" with SCHEME as
    `parse_scheme` reads it), in place; returns what to call for a forward (the model, or its torch.compile
    wrapper)."""
    if method == "plain":
        return model
    if method == "compiled":
        return torch.compile(model)
    if method in ("revcompile-unchunked", "revcompile-compiled", "revcompile-float", "revcompile-reference"):
        import revcompile

        options = {"revcompile-unchunked": {"recompute_chunks": 1}, "revcompile-compiled": {"compile": True},
                   "revcompile-float": {"exact": False}, "revcompile-reference": {"invert": False}}[method]
        return revcompile.make_reversible(model, **options)
    if method == "revcompile-backend":
        import revcompile.backend  # registers the backend

        return torch.compile(model, backend="revcompile")
    if method in ("checkpointing", "checkpointing-chunked", "checkpointing-compiled"):
        hf_checkpointing(model)
        if method == "checkpointing-chunked":
            import revcompile

            revcompile.chunked_head(model)
        return torch.compile(model) if method == "checkpointing-compiled" else model
    if method == "revcompile-original-head":
        import revcompile

        return revcompile.make_reversible(model, head="original")
    if method in ("revcompile-compiled-float", "revcompile-compiled-two-calls"):
        # what a backward step cost as two calls (runtime/function.py, _one_call)
        return _converted_with(model, {"compile": True, "exact": False},
                               one_call_recompute=method == "revcompile-compiled-float")
    if method == "revcompile-record-all":  # what the routing recorder cost when it looked at every op of a branch
        return _converted_with(model, {}, selection_scopes=None)  # (runtime/replay.py: over the whole call)
    if method == "selective":
        # Hugging Face's per-layer checkpointing, with torch's selective policy: matmul and attention outputs are
        # kept, everything else (norms, activations, routing) is recomputed.
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = partial(create_selective_checkpoint_contexts, _selective_policy())
        hf_checkpointing(model, context_fn=context_fn)
        return model
    if method.partition(":")[0] == "revcompile":
        import revcompile

        scheme, options = parse_scheme(method.partition(":")[2] or "symplectic")
        return revcompile.make_reversible(model, scheme, **options)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SPEED_METHODS)}")


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: "VmRSS" (now) or "VmHWM" (peak since reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


class PhasePeaks:
    """Peak memory of a training step by phase, above `before`: the layers' forward (until the LM head starts),
    the head (its forward and backward, until the gradient of its input exists) and the layers' backward; `kept`
    is what the step holds when the head starts (what the layers keep for backward). Peak RSS on CPU,
    torch.cuda.max_memory_allocated on CUDA (the allocator's counters: read without a synchronisation)."""

    def __init__(self, model: torch.nn.Module, before: int, cuda: bool = False):
        self.before, self.peaks = before, {}
        if cuda:
            self.peak, self.now = torch.cuda.max_memory_allocated, torch.cuda.memory_allocated
            self.reset = torch.cuda.reset_peak_memory_stats
        else:
            self.peak, self.now, self.reset = (lambda: rss_bytes("VmHWM")), (lambda: rss_bytes("VmRSS")), reset_peak_rss
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._head_starts)

    def _mark(self, phase: str) -> None:
        self.peaks[phase] = (self.peak() - self.before) / 2**20
        self.reset()

    def _head_starts(self, module, args) -> None:
        self._mark("layers_forward_mb")
        self.peaks["kept_mb"] = (self.now() - self.before) / 2**20
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: self._mark("head_mb"))

    def finish(self) -> dict:
        self._mark("layers_backward_mb")
        self.handle.remove()
        return self.peaks


def run_step_measurement(method: str, depth: int, batch: int, seq: int, device: str = "cpu",
                         dtype: str = "float32", steps: int = 1, attn: str = "sdpa", pretrained: str | None = None,
                         threads: int | None = None, split: bool = False, optimizer: str | None = None,
                         warmup_batch: int | None = None, onednn: bool = True, lora: int | None = None,
                         **config: Any) -> dict:
    """In this process: build the model, warm up, then measure `steps` training steps (peak of the first).

    pretrained: a local model directory to load instead of building a random one from `config` (depth unused).
    warmup_batch: the batch of the warm-up step (None: `batch`); a smaller one saves time, gradients are
                allocated all the same.
    split:      also report the first step's peak by phase (PhasePeaks: layers' forward, head, layers'
                backward) and the bytes of weights, gradients and optimizer state.
    optimizer:  None: forward and backward only, gradients kept allocated; "adamw": each step also runs
                AdamW.step() and zero_grad(); "adamw-in-backward": AdamW stepped in backward
                (revcompile.optimizer_in_backward), so no gradient outlives its parameter's step. With an
                optimizer the result also has `total_peak_mb`: the step's peak above the RSS before the model was
                built (weights, gradients, optimizer state and the step's working set).
    onednn:     False turns oneDNN (mkldnn) off for the step. NOTE: on CPU in bf16, oneDNN keeps a compiled
                primitive per distinct matrix shape (about 0.5 MB each, measured for a 256 x 1024 linear), and an
                eager MoE's experts see a new token count at almost every call: RSS then grows with the calls made,
                by depth in the first steps, for every method alike. A memory figure in bf16 on CPU needs it off.
    lora:       a LoRA rank: PEFT's LoRA on every attention projection, the base weights frozen (None: full
                fine-tuning).
    threads:    torch's intra-op threads (None: torch's default). With 1, "step_cpu_s" (the process's CPU seconds
                of the fastest step) is the step's work alone: other processes on a loaded machine barely move it,
                where they stretch the wall-clock "step_s" (median) by any factor.
    """
    from .models import as_loaded, tiny_config, tiny_model_from_config

    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn

    model_type = config.pop("model_type", "mixtral")
    torch.manual_seed(0)
    if pretrained:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation=attn,
                                                     experts_implementation=config.pop("experts", "eager"))
        cfg = model.config
    else:
        cfg = tiny_config(model_type, num_hidden_layers=depth, attn_implementation=attn,
                          experts_implementation=config.pop("experts", "eager"), **config)
        model = tiny_model_from_config(cfg)
    model = as_loaded(model, getattr(torch, dtype)).to(device)
    model.config.use_cache = False
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # the process with the model's code imported, before its weights: total_peak_mb's reference
    baseline = torch.cuda.memory_allocated() if device.startswith("cuda") else rss_bytes("VmRSS")
    baseline -= sum(p.numel() * p.element_size() for p in model.parameters())
    forward = prepare(model, method)
    model.train()
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), device=device)
    opt = None
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif optimizer == "adamw-in-backward":
        import revcompile

        revcompile.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-5)
    elif optimizer is not None:
        raise ValueError(f"unknown optimizer {optimizer!r}: None, 'adamw' or 'adamw-in-backward'")

    def step(ids=ids):
        loss = forward(ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    step(ids[:warmup_batch])
    model.zero_grad(set_to_none=optimizer is not None)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        before = rss_bytes("VmRSS")
        reset_peak_rss()
    phases = PhasePeaks(model, before, cuda) if split else None
    times, cpu_times = [], []
    loss = None
    for i in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if i == 0:
            if phases is not None:
                split_mb = phases.finish()
                peak = max(v for k, v in split_mb.items() if k != "kept_mb") * 2**20
            else:
                peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - before
        model.zero_grad(set_to_none=optimizer is not None)
    result = {"method": method, "depth": depth, "batch": batch, "seq": seq, "device": device, "dtype": dtype,
              "peak_mb": peak / 2**20, "step_s": statistics.median(times),
              "step_cpu_s": min(cpu_times), "loss": loss}
    if optimizer is not None:
        result.update(optimizer=optimizer, total_peak_mb=(peak + before - baseline) / 2**20)
    if phases is not None:
        states = [t for state in (opt.state.values() if opt else []) for t in state.values() if torch.is_tensor(t)]
        result.update(split_mb, weights_mb=_mb(model.parameters()),
                      grads_mb=_mb(p.grad for p in model.parameters() if p.grad is not None),
                      optimizer_mb=_mb(states))
    return result


def _mb(tensors) -> float:
    """Megabytes of distinct storage held by `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20


def onednn_for_memory(device: str, dtype: str) -> bool:
    """Whether a memory measurement may leave oneDNN on: not for 16-bit weights on CPU, where its per-shape
    primitive cache grows RSS with every new expert token count (see `run_step_measurement`'s `onednn`); those
    steps then run several times slower."""
    return not (device == "cpu" and dtype in ("bfloat16", "float16"))


def measure_step(method: str, depth: int, **kwargs: Any) -> dict:
    """`run_step_measurement` in a fresh child process (fixed mmap threshold); returns its result dict."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    spec = json.dumps(dict(method=method, depth=depth, **kwargs))
    proc = subprocess.run([sys.executable, "-m", "revcompile.measure", spec], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="measure one training step in this process (used by bench/)")
    parser.add_argument("spec", help="JSON object of run_step_measurement's arguments")
    print(json.dumps(run_step_measurement(**json.loads(parser.parse_args().spec))))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
