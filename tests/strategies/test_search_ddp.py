"""The search's supernet data-parallel: NNI 3.0 one-shot DARTS under Lightning DDP, 2 CPU processes (gloo).

``python strategies/search.py devices=2`` on this machine: Lightning starts the second process itself. The
ranks must draw different images at every architecture and weight step (and all of them once per epoch),
end with the same architecture parameters α and weights, and share one run folder that rank 0 writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from search_space.genotype import Genotype
from strategies.search import SearchConfig

REPO = Path(__file__).resolve().parents[2]

# Runs strategies/search.py's main; every rank records the images of each step and dumps its final state.
_RANK_SCRIPT = textwrap.dedent('''
    import gc, json, os, sys
    import torch
    from strategies import darts, search

    seen = []
    _step, _end = search.RobustSearchModule.training_step, darts.SearchRecorder.on_train_end

    def training_step(self, batch, batch_idx):
        seen.append([int(self.trainer.current_epoch), int(batch_idx), list(batch["name"])])
        return _step(self, batch, batch_idx)

    def on_train_end(self, trainer, pl_module):
        out = os.path.join(os.environ["DUMP_DIR"], f"rank{trainer.global_rank}")
        torch.save({k: v.detach() for k, v in pl_module.state_dict().items()}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"world": trainer.world_size, "steps": seen,
                       "probabilities": self.last_result["probabilities"]}, f)

    search.RobustSearchModule.training_step, darts.SearchRecorder.on_train_end = training_step, on_train_end
    rc = search.main(sys.argv[1:])
    gc.freeze()  # everything is written: skip the final cyclic GC of the interpreter (most of its exit time)
    sys.exit(rc)
''')


def test_devices_is_checked_when_the_config_loads():
    with pytest.raises(ValueError, match=r"devices: expected an integer >= 1 .*, got 0"):
        SearchConfig(devices=0)


@pytest.mark.slow
def test_supernet_on_two_processes_splits_data_and_agrees(tmp_path):
    from rgbt.synthetic import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, n_train=4, n_val=4, n_test=0, size=(32, 40), seed=0)
    script = tmp_path / "search_rank.py"
    script.write_text(_RANK_SCRIPT)
    runs = tmp_path / "runs"
    args = [f"data.root={root}", "data.crop=null", "data.batch_size=1", "space.channels=4",
            "space.candidates=[dense_k3_d1,dilconv_k3_d2,eca_k3]", "attack.name=fgsm", "epochs=1", "threads=1",
            "progress_bar=false", "log_every_n_steps=1", "device=cpu", "devices=2", f"run_root={runs}"]
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "NODE_RANK", "PAIF_SEARCH_RUN_DIR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), "--config", "configs/search.yaml", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    # every DARTS iteration: the arch step (even batch_idx) reads val images, the weight step train images
    for parity, split in ((0, "val"), (1, "train")):
        names = [[n for _e, b, ns in r["steps"] if b % 2 == parity for n in ns] for r in ranks]
        assert len(names[0]) == len(names[1]) == 2  # 4 images / (batch 1 x 2 ranks)
        assert not set(names[0]) & set(names[1]), f"both ranks read {set(names[0]) & set(names[1])}"
        assert sorted(names[0] + names[1]) == sorted(p.stem for p in (root / split / "ir").iterdir())

    # the same architecture parameters and weights on both ranks (BatchNorm running statistics are per rank)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    alphas = [k for k in s0 if k.endswith("_arch_alpha")]
    assert len(alphas) == 7  # ir/op1, ir/op2, vis/op1, vis/op2, rule, fused/op1, fused/op2
    buffers = {k for k in s0 if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    for k in s0.keys() - buffers:
        assert torch.equal(s0[k], s1[k]), f"ranks disagree on {k}"
    assert ranks[0]["probabilities"] == ranks[1]["probabilities"]

    # one run folder, written by rank 0; rank 1 only logs
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    assert {"search.log", "search.rank1.log", "config.yaml", "search_result.json", "genotype.json"} <= \
        {p.name for p in run_dir.iterdir()}
    result = json.loads((run_dir / "search_result.json").read_text())
    assert result["probabilities"] == ranks[1]["probabilities"]
    assert result["config"]["devices"] == 2 and "selection" in result
    assert Genotype.from_json(run_dir / "genotype.json").to_sample() == result["architecture"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
