"""Start-up cost of the pipeline's processes: seconds to import an entry point in a fresh interpreter; prints JSON.

Every stage of ``make demo`` and many tests start a new Python process, and one that imports NNI's NAS modules with
NNI's default framework shortcuts (``NNI_FRAMEWORK=pytorch``) also imports NNI's Lightning evaluator, hence
``pytorch_lightning`` and ``torchmetrics``. ``search_space`` turns the shortcuts off
(``search_space._skip_nni_framework_shortcuts``). This measures, per module, a fresh ``python -c "import M"`` with
NNI's default (the baseline, ``NNI_FRAMEWORK=pytorch``) and with ours (``NNI_FRAMEWORK`` unset), the two interleaved,
median of ``--repeat`` rounds, and whether the process imported ``pytorch_lightning``:

    {"modules": {M: {"nni_default_s", "ours_s", "ratio", "lightning_nni_default", "lightning_ours"}}, ...}

Usage:
    python bench/import_cost.py                       # derive, search_space, retrain; 3 rounds
    python bench/import_cost.py --modules trainer.evaluate --repeat 5
    python bench/import_cost.py --quick               # one module, one round
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: derive's entry point; search_space, which trainer.evaluate and trainer.warmstart import when they build the model
#: (not at start-up); trainer.retrain, which uses Lightning itself and gains nothing (a check that nothing got worse)
DEFAULT_MODULES = ("derive.export_genotype", "search_space", "trainer.retrain")
_PROBE = "import importlib, sys; importlib.import_module(sys.argv[1]); print('pytorch_lightning' in sys.modules)"


def import_once(module: str, nni_framework: str | None) -> tuple[float, bool]:
    """(seconds, whether pytorch_lightning was imported) of ``import module`` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "NNI_FRAMEWORK"}
    if nni_framework is not None:
        env["NNI_FRAMEWORK"] = nni_framework
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"import {module} failed (NNI_FRAMEWORK={nni_framework}):\n{res.stderr[-2000:]}")
    return dt, res.stdout.strip().splitlines()[-1] == "True"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: the first module, one round")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    modules, repeat = (args.modules[:1], 1) if args.quick else (args.modules, args.repeat)
    rows: dict[str, Any] = {}
    for module in modules:
        base, ours, light = [], [], {}
        for _ in range(repeat):  # interleaved: a load change hits both
            dt, light["nni_default"] = import_once(module, "pytorch")
            base.append(dt)
            dt, light["ours"] = import_once(module, None)
            ours.append(dt)
        b, o = statistics.median(base), statistics.median(ours)
        rows[module] = {"nni_default_s": round(b, 3), "ours_s": round(o, 3), "ratio": round(o / b, 3),
                        "lightning_nni_default": light["nni_default"], "lightning_ours": light["ours"]}
    res = {"modules": rows, "repeat": repeat, "python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
