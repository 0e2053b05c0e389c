"""The LM head and loss alone, by every kernel this device can run: Hugging Face's (logits materialised, upcast to
fp32), revcompile's chunked PyTorch one, Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy (both
Triton, CUDA only, `pip install 'revcompile[gpu]'`): peak memory, time of forward + backward, and the error of the
loss and of the gradients of the hidden states and the weight against an fp64 computation. This is the measurement
that chooses `make_reversible(model, head=...)`'s default on a device.

    python bench/heads.py --device cuda                 # bf16, 16,384 tokens, hidden 2048, vocab 50,304 and 151,936
    python bench/heads.py                               # CPU: fp32, 2,048 tokens, hidden 256, vocab 32,000, 151,936
    python bench/heads.py --small --out /tmp/h          # a dry run of the script

Each kernel runs in a child process (one kernel's allocations never colour another's). Memory is the peak above
the inputs (hidden states, weight, labels and the weight's gradient buffer): torch.cuda.max_memory_allocated on
CUDA, peak RSS on CPU (glibc's mmap threshold fixed, as in revcompile/measure.py). Time: median of --repeats steps
after one warm-up, wall time on CUDA, CPU seconds of one thread on the CPU (steady on a loaded machine, as
bench/speed.py --cpu-seconds). Errors are relative (norm of the difference / norm of the fp64 value), one seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.measure import reset_peak_rss, rss_bytes  # noqa: E402
from revcompile.runtime.head import FUSED_KERNEL_DEVICES, FUSED_KERNELS, chunked_cross_entropy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KERNELS = ("original", "chunked", "liger", "cce")
LABELS = {"original": "Hugging Face (logits materialised)", "chunked": "revcompile chunked (PyTorch)",
          "liger": "Liger-Kernel fused linear CE", "cce": "Cut Cross-Entropy"}
SIZES = {"cuda": dict(tokens=16384, hidden=2048, vocabs=[50304, 151936], dtype="bfloat16"),
         "cpu": dict(tokens=2048, hidden=256, vocabs=[32000, 151936], dtype="float32")}
SMALL = dict(tokens=256, hidden=64, vocabs=[1000], dtype="float32")


def runnable(kernel: str, device: str) -> bool:
    if kernel not in FUSED_KERNELS:
        return True
    package = FUSED_KERNELS[kernel].replace("-", "_")
    return device in FUSED_KERNEL_DEVICES and importlib.util.find_spec(package) is not None


def head_loss(kernel: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of lm_head(hidden) by `kernel`, with transformers' semantics (shifted labels, mean)."""
    if kernel == "original":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(F.linear(hidden, weight), labels, weight.shape[0])
    return chunked_cross_entropy(hidden, weight, None, labels, kernel=kernel)


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Hidden states of an LM's last layer (RMS-normed scale), a head weight as initialised, labels with 1 in 8
    ignored; on the CPU first, so that every dtype and device gets the same values."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 0.02
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    labels[torch.rand(1, tokens, generator=generator) < 0.125] = -100
    return h.to(device, dtype), w.to(device, dtype), labels.to(device)


def child(kernel: str, tokens: int, hidden: int, vocab: int, dtype: str, device: str, repeats: int) -> dict:
    """In this process: the kernel's peak memory, median time and errors against fp64."""
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    if not cuda:
        torch.set_num_threads(1)
    h, w, labels = inputs(tokens, hidden, vocab, getattr(torch, dtype), device)
    h.requires_grad_(), w.requires_grad_()
    w.grad = torch.zeros_like(w)  # allocated before the step, as a training step's gradients are

    def step() -> torch.Tensor:
        h.grad = None
        w.grad.zero_()
        loss = head_loss(kernel, h, w, labels)
        loss.backward()
        return loss.detach()

    loss = step()  # warm-up (Triton autotuning, oneDNN primitives)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes("VmRSS")
        reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = clock()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - before
    got = loss.double().cpu(), h.grad.double().cpu(), w.grad.double().cpu()
    # the fp64 reference: revcompile's chunked kernel in fp64 (equal to F.cross_entropy to 1e-12, tests/test_head.py)
    h64, w64, labels64 = inputs(tokens, hidden, vocab, torch.float64, "cpu")
    h64.requires_grad_(), w64.requires_grad_()
    ref = chunked_cross_entropy(h64, w64, None, labels64)
    ref.backward()
    err = [float((g - r).norm() / r.norm()) for g, r in zip(got, (ref.detach(), h64.grad, w64.grad))]
    return dict(kernel=kernel, tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, peak_mb=peak / 2**20,
                median_ms=statistics.median(times) * 1e3, loss_err=err[0], grad_hidden_err=err[1],
                grad_weight_err=err[2])


def measure(kernel: str, args: argparse.Namespace, vocab: int, sizes: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, os.path.abspath(__file__), "--child", kernel, "--device", args.device,
               "--repeats", str(args.repeats), "--tokens", str(sizes["tokens"]), "--hidden", str(sizes["hidden"]),
               "--vocab", str(vocab), "--dtype", sizes["dtype"]]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return dict(kernel=kernel, vocab=vocab, error=done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], stem: str, command: str, device_name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tabulate import tabulate

    table = []
    for row in rows:
        if "error" in row:
            table.append([LABELS[row["kernel"]], row["vocab"], "failed: " + row["error"]] + [""] * 5)
            continue
        base = next(r for r in rows if r["kernel"] == "original" and r["vocab"] == row["vocab"])
        table.append([LABELS[row["kernel"]], row["vocab"], f"{row['peak_mb']:.1f}",
                      f"{row['peak_mb'] / base['peak_mb']:.2f}" if "peak_mb" in base else "-",
                      f"{row['median_ms']:.1f}",
                      f"{row['median_ms'] / base['median_ms']:.2f}" if "median_ms" in base else "-",
                      f"{row['loss_err']:.1e}", f"{row['grad_hidden_err']:.1e} / {row['grad_weight_err']:.1e}"])
    first = next(r for r in rows if "error" not in r)
    text = (f"# LM head + loss alone, by kernel ({device_name})\n\n`{command}`; {first['tokens']} tokens, hidden "
            f"{first['hidden']}, {first['dtype']}; forward + backward, median of the repeats "
            f"({'wall time' if device_name != 'cpu' else 'CPU seconds of one thread'}); errors against fp64\n\n"
            + tabulate(table, headers=["kernel", "vocab", "peak MB", "vs HF", "ms", "vs HF", "loss error",
                                       "grad error (hidden / weight)"], tablefmt="github") + "\n")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(dict(command=command, device=device_name, rows=rows), f, indent=1)
    good = [r for r in rows if "error" not in r]
    vocabs = sorted({r["vocab"] for r in good})
    present = [k for k in KERNELS if any(r["kernel"] == k for r in good)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(present)
    for i, kernel in enumerate(present):
        mine = {r["vocab"]: r for r in good if r["kernel"] == kernel}
        xs = [j + i * width for j, v in enumerate(vocabs) if v in mine]
        for ax, key in zip(axes, ("peak_mb", "median_ms")):
            ax.bar(xs, [mine[v][key] for v in vocabs if v in mine], width, label=LABELS[kernel],
                   color=f"C{KERNELS.index(kernel)}")
    for ax, title in zip(axes, ("peak memory above inputs (MB)",
                                "forward + backward (ms)" if device_name != "cpu" else "forward + backward (CPU ms)")):
        ax.set_xticks([j + (len(present) - 1) * width / 2 for j in range(len(vocabs))],
                      [f"vocab {v:,}" for v in vocabs])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a dry run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", choices=KERNELS, help=argparse.SUPPRESS)
    for name in ("tokens", "hidden", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS if name == "vocab" else None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.hidden, args.vocab, args.dtype, args.device,
                               args.repeats)))
        return
    device_type = torch.device(args.device).type
    sizes = dict(SMALL if args.small else SIZES.get(device_type, SIZES["cpu"]))
    sizes.update({k: getattr(args, k) for k in ("tokens", "hidden", "dtype") if getattr(args, k)})
    kernels = [k for k in args.kernels if runnable(k, device_type)]
    skipped = sorted(set(args.kernels) - set(kernels))
    if skipped:
        print(f"skipped (not installed, or not for {device_type}): {', '.join(skipped)}", flush=True)
    rows = []
    for vocab in sizes["vocabs"]:
        for kernel in kernels:
            rows.append(measure(kernel, args, vocab, sizes))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"heads_{device_type}" + ("_small" if args.small else ""))
    print(report(rows, stem, "python bench/heads.py " + " ".join(sys.argv[1:]), name))


if __name__ == "__main__":
    main()
