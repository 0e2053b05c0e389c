"""How close is a converted model to the original? KL(original || converted) of next-token distributions.

    python bench/conversion.py        # -> bench/results/conversion.{md,json}

For each depth, a tiny Mixtral is first trained briefly on the standard library's sources (bytes) so that its
branches do real work (random-init branches are near zero and would make any conversion look exact), then
converted with the symplectic scheme (h0 carried, merge q + p - h0) and, for comparison, with the same steps and
the plain average merge (q + p) / 2 and no h0 stream. KL is averaged over tokens of held-out text.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from tabulate import tabulate
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import revcompile  # noqa: E402
from revcompile.coupling import Scheme  # noqa: E402
from revcompile.data import VOCAB, byte_batches, stdlib_text  # noqa: E402
from revcompile.models import tiny_model  # noqa: E402

SYMPLECTIC = revcompile.get_scheme("symplectic")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
AVERAGE_MERGE = Scheme(name="symplectic_average", streams=("q", "p"), open={"q": 1.0, "p": 1.0},
                       steps=SYMPLECTIC.steps, merge={"q": 0.5, "p": 0.5})


def trained(depth: int, steps: int) -> torch.nn.Module:
    model = tiny_model("mixtral", num_hidden_layers=depth, hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    text = stdlib_text(["json", "textwrap", "argparse", "csv", "dataclasses"])
    for ids in tqdm(byte_batches(text, 8, 128, steps, seed=depth), desc=f"training depth {depth}", leave=False):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def main() -> None:
    held_out = byte_batches(stdlib_text(["shlex", "fnmatch"]), 4, 128, 8, seed=99)
    rows, results = [], []
    for depth in (2, 4, 8):
        for steps in (0, 300):
            original = trained(depth, steps)
            with torch.no_grad():
                loss = sum(float(original(ids, labels=ids).loss) for ids in held_out) / len(held_out)
            figures = {}
            for scheme in (SYMPLECTIC, AVERAGE_MERGE):
                converted = revcompile.make_reversible(copy.deepcopy(original), scheme=scheme).eval()
                figures[scheme.name] = revcompile.kl_divergence(original, converted, held_out)
            results.append(dict(depth=depth, train_steps=steps, held_out_loss=loss, **figures))
            rows.append([depth, steps, loss, figures[SYMPLECTIC.name], figures[AVERAGE_MERGE.name]])
    table = tabulate(rows, headers=["depth", "training steps", "held-out loss (nats)",
                                    "KL symplectic (q+p-h0)", "KL average merge ((q+p)/2)"],
                     tablefmt="github", floatfmt=".4g")
    text = ("# Converted vs original model: KL(original || converted), nats per token\n\n"
            "`python bench/conversion.py`; tiny Mixtral (hidden 128), standard-library text as bytes.\n\n"
            f"{table}\n")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "conversion.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, "conversion.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(text)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
