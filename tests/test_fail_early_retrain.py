"""Retraining: nan_policy=skip (skipped steps leave the weights alone, N in a row stop the run), --resume refuses
settings that change the run, a full disk and a checkpoint of random bytes end in one line with exit code 2."""
from __future__ import annotations

import errno
import math
import re

import pytest
import torch
from torch import nn

from trainer import retrain
from trainer.aat import reptile_meta_step
from trainer.checkpoint import load_checkpoint
from trainer.errors import FAILED_FILE
from trainer.finite import NonFiniteError, StepGuard, nonfinite_tensors
from trainer.module import RetrainModule

NAN = float("nan")


def _tiny(root, runs, *extra: str) -> list[str]:
    return ["--genotype", "paif", "mode=clean", f"data.root={root}", "data.crop=[32,40]", "data.batch_size=2",
            "data.val_batch_size=2", "channels=8", "progress_bar=false", "val.attack_steps=1", "val.num_images=0",
            "num_threads=1", f"runs_root={runs}", "optim.warmup_steps=0", "max_steps=3", *extra]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_step_guard_counts_skips_and_stops_after_n_in_a_row():
    guard = StepGuard("skip", max_skips=2)
    assert guard.check(torch.tensor(1.0), {}, "step 0")
    assert not guard.check(torch.tensor(NAN), {"seg": NAN}, "step 1")
    guard.good_step()
    assert not guard.check(math.inf, {}, "step 2", what="gradient norm")
    assert guard.state_dict() == {"in_a_row": 1, "skipped": 2}
    with pytest.raises(NonFiniteError, match=r"2 steps in a row skipped \(nan_policy=skip, nan_max_skips=2\); the "
                                             r"last: non-finite loss nan at step 3"):
        guard.check(NAN, {}, "step 3")
    with pytest.raises(NonFiniteError, match="non-finite loss nan at step 0"):
        StepGuard("stop").check(NAN, {}, "step 0")


def test_pretext_skips_a_non_finite_inner_step():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    calls = [0]

    def objective(m, batch, eps):
        calls[0] += 1
        loss = (m(batch) ** 2).sum() * (NAN if calls[0] == 2 else 1.0)  # task 0, inner step 1
        return loss, float(loss.detach())

    guard = StepGuard("skip", max_skips=3)
    losses = reptile_meta_step(model, [2 / 255, 8 / 255], objective, lambda it, k, i: torch.ones(1, 2),
                               inner_steps=2, guard=guard)
    assert guard.skipped == 1 and all(math.isfinite(x) for x in losses)
    assert nonfinite_tensors(model.state_dict()) == []


class _StepRecorder:
    """Wraps AdamW.step: whether each optimiser step changed any weight."""

    def __init__(self, monkeypatch):
        self.changed: list[bool] = []
        original = torch.optim.AdamW.step

        def step(opt, *args, **kwargs):
            params = [p for g in opt.param_groups for p in g["params"]]
            before = [p.detach().clone() for p in params]
            out = original(opt, *args, **kwargs)
            self.changed.append(any(not torch.equal(b, p.detach()) for b, p in zip(before, params)))
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _inject_nan(monkeypatch, steps: set[int]) -> None:
    robust_loss = RetrainModule.robust_loss

    def inject(self, batch, eps, generator=None):
        loss, logs = robust_loss(self, batch, eps, generator)
        if self.global_step in steps:
            loss = loss * NAN
        return loss, logs

    monkeypatch.setattr(RetrainModule, "robust_loss", inject)


@pytest.mark.slow
def test_skip_policy_skips_the_step_and_finishes(synthetic_root, tmp_path, monkeypatch, capsys):
    _inject_nan(monkeypatch, {1})
    recorder = _StepRecorder(monkeypatch)
    runs = tmp_path / "runs"
    assert retrain.main(_tiny(synthetic_root, runs, "nan_policy=skip", "save_every_steps=1")) == 0
    assert recorder.changed == [True, False, True]  # step 1 left every weight (and AdamW moment) as it was
    (run_dir,) = runs.iterdir()
    assert nonfinite_tensors(load_checkpoint(run_dir / "last.pt")["state_dict"]) == []
    state = torch.load(run_dir / "resume.ckpt", map_location="cpu", weights_only=True)
    assert state["paif"]["nan_guard"] == {"in_a_row": 0, "skipped": 1} and state["global_step"] == 3
    assert "skipped training step 1: non-finite loss (1 in a row, 1 in all; nan_policy=skip)" in \
        (run_dir / "run.log").read_text()


@pytest.mark.slow
def test_skip_policy_stops_after_n_in_a_row(synthetic_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = _tiny(synthetic_root, runs, "optim.lr=1e30", "nan_policy=skip", "nan_max_skips=2", "max_steps=5")
    assert retrain.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 2 steps in a row skipped (nan_policy=skip, nan_max_skips=2); the last: non-finite")
    (run_dir,) = runs.iterdir()
    assert (run_dir / FAILED_FILE).read_text().startswith("2 steps in a row skipped")


@pytest.mark.slow
def test_resume_refuses_a_setting_that_changes_the_run(synthetic_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert retrain.main(_tiny(synthetic_root, runs, "stop_at_step=1", "save_every_steps=1")) == 0
    (run_dir,) = runs.iterdir()
    capsys.readouterr()
    assert retrain.main(["--resume", str(run_dir), "data.batch_size=1", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume {run_dir}: data.batch_size: was 2, got 1; optim.lr: was 0.0005, got 0.1; "
                          "a resumed run must keep the settings it was started with (only ")
    assert len(err.splitlines()) == 1 and not (run_dir / FAILED_FILE).exists()
    # settings that only change how the run is watched may change
    assert retrain.main(["--resume", str(run_dir), "log_every_steps=1", "nan_policy=skip", "--skip-data-check"]) == 0
    assert torch.load(run_dir / "resume.ckpt", weights_only=True)["global_step"] == 3


def test_resume_from_random_bytes_is_not_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resume.ckpt").write_bytes(bytes(range(7, 256)) * 16)
    assert retrain.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {run_dir / 'resume.ckpt'} is not a checkpoint: expected a resume.ckpt written by "
                   f"trainer/retrain.py, got 3984 bytes that are not a torch.save file (it begins with 07 08 09 0a); "
                   "check the path\n")


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_marks_the_run(synthetic_root, tmp_path, capsys, monkeypatch):
    import trainer.runs as runs_module

    save = runs_module.torch.save

    def full_disk(obj, f):
        if isinstance(obj, dict) and obj.get("format") == "paif-checkpoint":  # best.pt / last.pt
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f)

    monkeypatch.setattr(runs_module.torch, "save", full_disk)
    runs = tmp_path / "runs"
    assert retrain.main(_tiny(synthetic_root, runs, "max_steps=1")) == 2
    (run_dir,) = runs.iterdir()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(f"error: no space left on device: {re.escape(str(run_dir))}/(best|last).pt \\(ENOSPC\\); the disk "
                        "is full; free space or choose an output folder on another disk", err), err
    assert (run_dir / FAILED_FILE).read_text().startswith("no space left on device")
    assert not list(run_dir.glob("*.pt")) and not list(run_dir.glob(".*.tmp"))  # no partial file
