"""Effect of the glibc malloc tuning (``trainer.runs.tune_malloc``) on another bench: A/B in subprocesses.

The setting is process-wide and cannot be undone inside one process, so the bench named after ``--`` runs
in fresh subprocesses, alternately with ``PAIF_MALLOC_TUNING=0`` (glibc's defaults) and ``=1`` (the tuning),
``--rounds`` times each (interleaved so load on a shared machine hits both alike). Prints one JSON object:
for every numeric leaf of the bench's JSON output whose path contains ``--key`` (default ``seconds`` and
``s_per_step``), the median per setting and ``default / tuned`` (> 1: the tuning is faster).

    python bench/malloc_gain.py -- bench/decompose_speed.py --repeat 3
    python bench/malloc_gain.py --rounds 2 -- bench/retrain_step.py --size 96 128 --batch 8 --channels 16
    python bench/malloc_gain.py -- bench/step_profile.py --skip-step
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any


def leaves(doc: Any, prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": number}`` for every int/float leaf of a JSON document (bools excluded)."""
    if isinstance(doc, dict):
        return {k: v for key, sub in doc.items() for k, v in leaves(sub, f"{prefix}{key}/").items()}
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return {prefix.rstrip("/"): float(doc)}
    return {}


def run_once(cmd: list[str], tuned: bool) -> dict[str, float]:
    env = {**os.environ, "PAIF_MALLOC_TUNING": "1" if tuned else "0"}
    out = subprocess.run([sys.executable, *cmd], env=env, check=True, capture_output=True, text=True).stdout
    return leaves(json.loads(out))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("expected: malloc_gain.py [--rounds N] [--key K ...] -- BENCH.py [ARGS], got no '--'")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="subprocess runs per setting (alternated)")
    p.add_argument("--key", nargs="+", default=["seconds", "s_per_step"], help="keep leaves whose path has one")
    args = p.parse_args(argv[:split])
    cmd = argv[split + 1:]
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for tuned in (False, True):
            runs[tuned].append(run_once(cmd, tuned))
    keys = [k for k in runs[True][0] if any(s in k for s in args.key) and all(k in r for r in runs[False] + runs[True])]
    med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in keys} for t in runs}
    return {"bench": "malloc_gain", "command": cmd, "rounds": args.rounds,
            "default_s": {k: round(med[False][k], 5) for k in keys},
            "tuned_s": {k: round(med[True][k], 5) for k in keys},
            "default_over_tuned": {k: round(med[False][k] / med[True][k], 3) for k in keys if med[True][k] > 0}}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
