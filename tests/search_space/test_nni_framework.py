"""``search_space`` turns NNI's framework shortcuts off, so that a process which only builds or runs a network does
not import Lightning; a user's own ``NNI_FRAMEWORK`` wins; ``bench/import_cost.py`` measures the difference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, nni_framework: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NNI_FRAMEWORK"}
    if nni_framework is not None:
        env["NNI_FRAMEWORK"] = nni_framework
    env["PYTHONWARNINGS"] = "ignore"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_BUILD = """
import json, sys
import derive.export_genotype, trainer.evaluate
from nni.common.framework import get_default_framework
from search_space import build_fusion_net, get_genotype
import torch
net = build_fusion_net(get_genotype("paif"))
out = net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
print(json.dumps({"framework": get_default_framework(), "lightning": "pytorch_lightning" in sys.modules,
                  "shape": list(out.shape)}))
"""


def test_building_and_running_a_network_imports_no_lightning() -> None:
    got = _run(_BUILD)
    assert got == {"framework": "none", "lightning": False, "shape": [1, 1, 16, 16]}


def test_a_users_nni_framework_is_kept() -> None:
    got = _run(_BUILD, nni_framework="pytorch")
    # NNI's own behaviour with its default: the shortcut imports the Lightning evaluator
    assert got == {"framework": "pytorch", "lightning": True, "shape": [1, 1, 16, 16]}


def test_the_search_imports_lightning_by_full_name_after_search_space() -> None:
    """Imported after ``search_space`` (shortcuts off), the search modules still find NNI's Lightning evaluator and
    the DARTS strategy."""
    got = _run("import json, sys, search_space, strategies.darts as d\n"
               "print(json.dumps({'lightning': 'pytorch_lightning' in sys.modules, "
               "'darts': d.DARTS.__module__, 'evaluator': d.Lightning.__module__}))")
    assert got == {"lightning": True, "darts": "nni.nas.oneshot.pytorch.strategy",
                   "evaluator": "nni.nas.evaluator.pytorch.lightning"}


def test_import_cost_bench_quick() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "import_cost.py"), "--quick", "--modules",
                          "search_space"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout)["modules"]["search_space"]
    assert row["lightning_nni_default"] is True and row["lightning_ours"] is False
    assert row["ours_s"] > 0 and row["nni_default_s"] > 0 and row["ratio"] == round(row["ours_s"] / row["nni_default_s"], 3)
