"""Every causal-LM family of the installed transformers: built tiny, converted, gradients against the reference, in
float64, in bfloat16 and under bfloat16 autocast.

    python bench/zoo.py                  # -> bench/results/zoo.{md,json}; about 9 minutes on 2 cores
    python bench/zoo.py phi bloom        # some families only (prints the table, writes nothing)
    python bench/zoo.py --seed 1 --precisions bfloat16    # another draw of weights and tokens (writes nothing)

Per family and precision (revcompile/zoo.py): converted (layers, layer form, scheme, gradient error relative to the
largest reference gradient, and its bound; in bfloat16 the bound is 0: exact streams, bit for bit), skipped (the
plan's reasons), not built (transformers' own error for the tiny config, or for the unconverted model in that
precision), or a crash or mismatch (defects). In float64 also: the logits, loss and gradients of a copy converted
with max_run=1 (each layer its own run, which computes the original layer) against the unconverted model's,
relative (bounds 1e-8, 1e-5, 1e-5; not for parallel layers, whose pair scheme changes them by design), and its greedy
generate() with the KV cache against the unconverted model's tokens; and the logits of the model trained one step,
saved and loaded by revcompile.from_pretrained, against its own before saving (bound 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter

from tabulate import tabulate
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.zoo import (BOUND, CONVERTED, GENERATE_OUTCOMES, PRECISIONS, ZooResult,  # noqa: E402
                            causal_lm_families, run_family)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIRST = next(iter(PRECISIONS))  # float64: its row carries the layers, forms and schemes


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} ({n})" if len(counter) > 1 else str(name) for name, n in counter.items())


def _outcome(r: ZooResult) -> str:
    """A 16-bit precision's cell: 'bit for bit' where the gradients equal the reference's, else the status."""
    if r.status == CONVERTED and r.error == 0:
        return "bit for bit"
    if r.status == CONVERTED and r.layer_error == 0:  # (a gradient summed over layers outside them: see zoo.py)
        return f"layers bit for bit, others {r.error:.1e}"
    return r.status + (f" ({r.layer_error:.1e} in layers, {r.error:.1e} in all)" if r.error is not None else "")


def _row(family: str, results: dict[str, ZooResult]) -> list:
    r = results.get(FIRST)
    row = [family]
    if r is not None:
        row += [r.status, f"{r.converted}/{r.layers}" if r.layers else "", _counts(r.forms), _counts(r.schemes),
                "" if r.error is None else f"{r.error:.1e} ({BOUND[r.bound]:g}, {r.bound})",
                "" if r.original_error is None else " / ".join(f"{e:.0e}" for e in r.original_error.values()),
                "" if r.generate is None else r.generate.split(":")[0],
                "" if r.reload_error is None else f"{r.reload_error:.0e}" if isinstance(r.reload_error, float)
                else "transformers cannot load it"]
    row += [_outcome(results[p]) for p in PRECISIONS if p != FIRST and p in results]
    # the reasons: float64's, and the others' failures where they differ from it, each once
    by_reason: dict[str, list[str]] = {}
    for p, x in results.items():
        if x.reason and (p == FIRST or x.status != CONVERTED and (r is None or x.reason != r.reason)):
            by_reason.setdefault(x.reason, []).append(p)
    reasons = [reason if FIRST in ps else f"{', '.join(ps)}: {reason}" for reason, ps in by_reason.items()]
    if r is not None and r.generate and r.generate.startswith(GENERATE_OUTCOMES[1]):
        reasons.append(f"generate(), converted: {r.generate.split(': ', 1)[1]}")
    if r is not None and isinstance(r.reload_error, str):
        reasons.append(f"from_pretrained: {r.reload_error}")
    return row + ["; ".join(reasons).replace("\n", " ").replace("|", "/")]


def main(families: list[str], precisions: list[str], seed: int) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # (each reload's "Loading weights" bar)
    start, rows, records = time.time(), [], []
    for family in tqdm(families, desc="zoo"):
        results = {p: run_family(family, seed=seed, precision=p) for p in precisions}
        records.append({"family": family, **{p: {"status": r.status, "layers": r.layers, "converted": r.converted,
                                                 "forms": dict(r.forms), "schemes": dict(r.schemes),
                                                 "error": r.error, "layer_error": r.layer_error, "bound": r.bound,
                                                 "original_error": r.original_error,
                                                 "reload_error": r.reload_error, "generate": r.generate,
                                                 "reason": r.reason}
                                             for p, r in results.items()}})
        rows.append(_row(family, results))
    summary = (f"{len(families)} causal-LM families of transformers {transformers.__version__}: " + "; ".join(
        f"{p}: " + ", ".join(f"{n} {status}" for status, n in Counter(r[p]["status"] for r in records).most_common())
        for p in precisions) + f" ({time.time() - start:.0f} s)")
    first = ["status", "layers converted", "form", "scheme", "gradient error (bound)",
             "max_run=1 vs original: logits / loss / grads", "generate(), max_run=1",
             "trained, saved, reloaded: logits"]
    first = first if FIRST in precisions else []
    headers = ["family", *first, *(p for p in precisions if p != FIRST)]
    table = tabulate(rows, headers=headers + ["reason"], tablefmt="github")
    print(summary + "\n\n" + table)
    if families == causal_lm_families() and precisions == list(PRECISIONS) and seed == 0:
        with open(os.path.join(RESULTS, "zoo.md"), "w") as f:
            f.write(f"# The zoo\n\n`python bench/zoo.py`: {summary}.\n\n{__doc__.split(chr(10) + chr(10))[2]}\n"
                    f"{table}\n")
        with open(os.path.join(RESULTS, "zoo.json"), "w") as f:
            json.dump({"summary": summary, "families": records}, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="default: every causal-LM family of the installed transformers")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--seed", type=int, default=0, help="the weights' and tokens' seed (results written only "
                                                            "for seed 0)")
    args = parser.parse_args()
    main(args.families or causal_lm_families(), [p for p in PRECISIONS if p in args.precisions], args.seed)
