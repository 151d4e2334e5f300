"""Multi-node retraining: two "nodes" as two processes on this machine (gloo, MASTER_ADDR=127.0.0.1).

Each process is what one machine runs under Lightning's own launcher (``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; ``devices=1 num_nodes=2``): the ranks must see different images, end every run with
identical weights and share one run folder, and a run stopped on purpose must resume where it stopped. Each
node runs the stopped command and then the ``--resume`` command, one after the other in the same process
(a new Trainer, model and module loaded from ``resume.ckpt``; starting Python again would double the test's
time, mostly imports); README "Scaling out" reports a resume in fresh processes under torchrun.
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

from strategies.nni_local import free_port
from trainer import retrain
from trainer.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]

# One node: runs trainer/retrain.py's main once per command line (the lines are separated by "--then"); every
# rank records the images of each step and dumps its final weights into <DUMP_DIR>/<run index>/.
_NODE_SCRIPT = textwrap.dedent('''
    import gc, json, os, sys
    import torch
    from trainer import retrain

    seen, run = [], [0]
    _step, _end = retrain.RetrainModule.training_step, retrain.RetrainModule.on_train_end

    def training_step(self, batch, batch_idx):
        seen.append([int(self.global_step), list(batch["name"])])
        return _step(self, batch, batch_idx)

    def on_train_end(self):
        _end(self)
        out = os.path.join(os.environ["DUMP_DIR"], str(run[0]), f"rank{self.global_rank}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        torch.save({"params": {k: v.detach() for k, v in self.model.named_parameters()},
                    "buffers": dict(self.model.named_buffers())}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"rank": self.global_rank, "world": self.trainer.world_size, "steps": seen}, f)

    retrain.RetrainModule.training_step, retrain.RetrainModule.on_train_end = training_step, on_train_end
    argv, commands = sys.argv[1:], [[]]
    for a in argv:
        commands.append([]) if a == "--then" else commands[-1].append(a)
    for i, command in enumerate(commands):
        run[0], seen[:] = i, []
        rc = retrain.main(command)
        if rc:
            sys.exit(rc)
    gc.freeze()  # everything is written: skip the final cyclic GC of the interpreter (most of its exit time)
''')


def _tiny(root: Path, *extra: str) -> list[str]:
    """32x40 crops, batch 1 per rank, fusion width 8, 1-step attacks, no validation split (speed)."""
    return [
        f"data.root={root}", "data.crop=[32,40]", "data.batch_size=1", "data.val_split=", "channels=8",
        "progress_bar=false", "attack.steps=1", "aat.meta_iters=0",
        "num_threads=1", "log_every_steps=1", "save_every_steps=100", "optim.warmup_steps=2", "accelerator=cpu",
        "devices=1", "num_nodes=2", *extra,
    ]


def _two_nodes(script: Path, dump: Path, *commands: list[str], timeout: float = 240) -> list[list[dict]]:
    """Start node 0 and node 1 (one process each) running ``commands``; each command's record per rank."""
    dump.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [a for i, c in enumerate(commands) for a in ([] if i == 0 else ["--then"]) + c]
    procs = []
    for node in (0, 1):
        env = {**os.environ, "DUMP_DIR": str(dump), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"}
        for key in ("LOCAL_RANK", "RANK", "GROUP_RANK", "PAIF_RETRAIN_RUN_DIR"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (rc, _out, err) in enumerate(outs):
        assert rc == 0, f"node {node} exited {rc}:\n{err[-4000:]}"
    return [[json.loads((dump / str(i) / f"rank{r}.json").read_text()) for r in (0, 1)] for i in range(len(commands))]


def _weights(dump: Path) -> tuple[dict, dict]:
    """Each rank's final parameters (BatchNorm running statistics are left out: DDP broadcasts rank 0's
    buffers at the start of every forward, so between forwards a rank holds its own batch's update)."""
    return tuple(torch.load(dump / f"rank{r}.pt", weights_only=True)["params"] for r in (0, 1))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} disagree on {k}"


@pytest.mark.slow
def test_two_nodes_different_data_same_weights_and_resume(synthetic_root, tmp_path):
    script = tmp_path / "node.py"
    script.write_text(_NODE_SCRIPT)
    run_dir = tmp_path / "shared" / "retrain-2nodes"
    train_names = sorted(p.stem for p in (synthetic_root / "train" / "ir").iterdir())
    assert len(train_names) == 6  # 3 steps per epoch at batch 1 x 2 ranks
    dump = tmp_path / "dump"
    # stopped on purpose after 2 of 4 steps (the schedule still spans 4), then resumed on both nodes
    first, second = _two_nodes(
        script, dump, ["--genotype", "paif", *_tiny(synthetic_root, f"run_dir={run_dir}", "max_steps=4",
                                                   "stop_at_step=2")],
        ["--genotype", "paif", "--resume", str(run_dir), *_tiny(synthetic_root)])

    assert [r["rank"] for r in first] == [0, 1] and {r["world"] for r in first + second} == {2}
    for step in range(2):  # the two nodes train on different images at every step
        (s0, names0), (s1, names1) = first[0]["steps"][step], first[1]["steps"][step]
        assert s0 == s1 == step
        assert not set(names0) & set(names1), f"step {step}: both ranks saw {set(names0) & set(names1)}"
    stopped = _weights(dump / "0")
    _assert_same(*stopped, "ranks after the stopped run")

    assert [[s for s, _ in r["steps"]] for r in second] == [[2, 3], [2, 3]], "the resumed run starts at step 2"
    # epoch 0 = steps 0-2: across both runs and both ranks every training image exactly once
    epoch0 = [n for r in first for _, names in r["steps"] for n in names]
    epoch0 += [n for r in second for s, names in r["steps"] if s == 2 for n in names]
    assert sorted(epoch0) == train_names
    w0, w1 = _weights(dump / "1")
    _assert_same(w0, w1, "ranks after the resumed run")
    last = load_checkpoint(run_dir / "last.pt")
    assert last["state"]["global_step"] == 4
    rank0 = torch.load(dump / "1" / "rank0.pt", weights_only=True)
    _assert_same({**rank0["params"], **rank0["buffers"]}, last["state_dict"], "rank 0 and last.pt")
    assert not all(torch.equal(w0[k], v) for k, v in stopped[0].items()), "steps 3-4 trained"
    # one shared folder: rank 0 wrote the run files, rank 1 only its log
    assert sorted(p.name for p in run_dir.glob("run*.log")) == ["run.log", "run.rank1.log"]
    assert "resuming from" in (run_dir / "run.log").read_text()
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["retrain-2nodes"]


def test_several_nodes_need_a_shared_run_dir(synthetic_root, tmp_path, monkeypatch, capsys):
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    try:
        rc = retrain.main(["--genotype", "paif", *_tiny(synthetic_root, f"runs_root={tmp_path / 'runs'}")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 2
    err = capsys.readouterr().err
    assert "run_dir: expected one folder that all 2 processes share (num_nodes=2)" in err
    assert not (tmp_path / "runs").exists()


def test_num_nodes_is_checked_when_the_config_loads(synthetic_root, tmp_path, capsys):
    assert retrain.main(["--genotype", "paif", *_tiny(synthetic_root, "num_nodes=0")]) == 2
    assert "num_nodes: expected an integer >= 1, got 0" in capsys.readouterr().err
