"""NNI trial of ``search.yml``: one robust DARTS search, in-process, with the tuner's hyper-parameters.

PAIF (Liu et al., ACM MM 2023) balances accuracy and robustness with ``w``/``w_arch``; an HPO-type NNI
experiment sweeps that balance, one search per trial. The tuner's parameters are config overrides; short
names map to config keys::

    w -> w, w_arch -> w_arch, eps -> attack.eps, attack_steps -> attack.steps, seed -> seed
    (any other name is used as a config key as is, e.g. "attack.name" or "lr")

Command (``trialCommand`` in search.yml)::

    python -m strategies.trial --config configs/search.yaml [key=value ...]

Under nnictl the run directory is ``$NNI_OUTPUT_DIR/search`` (inside the experiment directory, so NNI's
TensorBoard button shows ``tensorboard/``); the architecture probabilities are reported as intermediate
results every epoch and the final result at the end, whose ``default`` is the selection metric (held-out
adversarial task loss without ``w_arch``, :mod:`strategies.selection`), comparable across trials. Any failure exits
non-zero, so NNI marks the trial FAILED: bad settings or data, a diverged search or a file-system error with one line
``error: ...`` in ``trial.log`` and exit code 2, the run folder marked ``FAILED`` (``trainer.errors``).

With ``devices=N`` in the trial command (and ``trialGpuNumber: N`` in the experiment), one trial trains its
supernet data-parallel over N GPUs (:mod:`strategies.search`): the processes Lightning starts take the tuner's
parameters from rank 0 (environment variable ``PAIF_TRIAL_PARAMETERS``) and only rank 0 reports to NNI (and
marks the run folder ``FAILED``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nni  # noqa: E402

from strategies.darts import nni_metric, under_nni  # noqa: E402
from strategies.search import RUN_DIR_ENV, SearchConfig, check_search_memory, run_search  # noqa: E402
from trainer.config import load_config, parse_overrides, save_config  # noqa: E402
from trainer.errors import entry_point  # noqa: E402
from trainer.runs import launch_rank, setup_logging, shared_run_dir, tune_malloc, use_run_dir  # noqa: E402

__all__ = ["PARAMETER_KEYS", "parameters_to_overrides", "main"]

log = logging.getLogger("strategies.trial")

PARAMETERS_ENV = "PAIF_TRIAL_PARAMETERS"  # rank 0's tuner parameters, for the DDP processes Lightning starts

#: NNI search-space names -> SearchConfig keys.
PARAMETER_KEYS = {"w": "w", "w_arch": "w_arch", "eps": "attack.eps", "attack_steps": "attack.steps", "seed": "seed"}


def parameters_to_overrides(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flat config overrides from the tuner's parameters (``{"eps": 0.03}`` -> ``{"attack.eps": 0.03}``)."""
    return {PARAMETER_KEYS.get(k, k): v for k, v in (params or {}).items()}


@entry_point
def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = argparse.ArgumentParser(description="NNI trial: one robust DARTS search with the tuner's parameters")
    parser.add_argument("--config", default="configs/search.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied before the tuner's parameters")
    args = parser.parse_args(argv)

    child = os.environ.get("LOCAL_RANK", "0") != "0" and PARAMETERS_ENV in os.environ
    if child:  # a DDP process Lightning started: the tuner answered rank 0 already
        params = json.loads(os.environ[PARAMETERS_ENV])
    else:
        params = nni.get_next_parameter() if under_nni() else {}
        os.environ[PARAMETERS_ENV] = json.dumps(params)
    overrides = {**parse_overrides(args.overrides), **parameters_to_overrides(params)}
    output = os.environ.get("NNI_OUTPUT_DIR")
    cfg = load_config(SearchConfig, args.config, overrides)
    check_search_memory(cfg)  # a search that cannot fit fails before its run folder exists
    rank = launch_rank(cfg.devices)  # rank 0 alone registers the folder (marked FAILED if the trial fails)
    if output:
        run_dir = use_run_dir(Path(output) / "search", rank)
    else:
        run_dir = (use_run_dir(cfg.run_dir, rank) if cfg.run_dir else
                   shared_run_dir(cfg.run_root, "trial", cfg.devices, rank, RUN_DIR_ENV))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    cfg.run_dir = str(run_dir)
    cfg.progress_bar = False  # trial.log is a file: no live progress bar
    setup_logging(run_dir, filename="search.log" if rank == 0 else f"search.rank{rank}.log")
    if rank != 0:  # a data-parallel partner of rank 0: trains, reports nothing
        run_search(cfg, run_dir)
        return 0
    save_config(cfg, run_dir / "config.yaml")
    log.info("trial parameters %s -> overrides %s", params, overrides)
    result = run_search(cfg, run_dir)
    metric = nni_metric(result)
    if under_nni():
        nni.report_final_result(metric)
    print(json.dumps({"run_dir": str(run_dir), "default": metric["default"],
                      "architecture": result["architecture"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
