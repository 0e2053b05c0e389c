"""Every causal-LM family of the installed transformers: built tiny, converted, gradients against the reference.

    python bench/zoo.py                  # -> bench/results/zoo.{md,json}; a few minutes on 2 cores
    python bench/zoo.py phi bloom        # some families only (prints the table, writes nothing)

Per family (revcompile/zoo.py): converted (layers, layer form, scheme, gradient error relative to the largest
reference gradient, and its bound), skipped (the plan's reasons), not built (transformers' own error for the tiny
config, or a loss that is not finite), or a crash or mismatch (defects).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import Counter

from tabulate import tabulate
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from revcompile.zoo import BOUND, causal_lm_families, run_family  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} ({n})" if len(counter) > 1 else str(name) for name, n in counter.items())


def main(families: list[str]) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    start, rows, records = time.time(), [], []
    for family in tqdm(families, desc="zoo"):
        r = run_family(family)
        records.append({"family": family, "status": r.status, "layers": r.layers, "converted": r.converted,
                        "forms": dict(r.forms), "schemes": dict(r.schemes), "error": r.error, "bound": r.bound,
                        "reason": r.reason})
        rows.append([family, r.status, f"{r.converted}/{r.layers}" if r.layers else "", _counts(r.forms),
                     _counts(r.schemes), "" if r.error is None else f"{r.error:.1e} ({BOUND[r.bound]:g}, {r.bound})",
                     r.reason.replace("\n", " ").replace("|", "/")])
    statuses = Counter(r["status"] for r in records)
    summary = (f"{len(families)} causal-LM families of transformers {transformers.__version__}: "
               + ", ".join(f"{n} {status}" for status, n in statuses.most_common())
               + f" ({time.time() - start:.0f} s)")
    table = tabulate(rows, headers=["family", "status", "layers converted", "form", "scheme",
                                    "gradient error (bound)", "reason"], tablefmt="github")
    print(summary + "\n\n" + table)
    if families == causal_lm_families():
        with open(os.path.join(RESULTS, "zoo.md"), "w") as f:
            f.write(f"# The zoo\n\n`python bench/zoo.py`: {summary}.\n\n{__doc__.split(chr(10) + chr(10))[2]}\n"
                    f"{table}\n")
        with open(os.path.join(RESULTS, "zoo.json"), "w") as f:
            json.dump({"summary": summary, "families": records}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:] or causal_lm_families())
