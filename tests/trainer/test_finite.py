"""The finiteness guards (trainer/finite.py) in the checkpoint writer, the retrain loop, the AAT pretext stage and
the search step: a diverged run stops with an error naming the step, and never writes a non-finite checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from strategies.search_module import RobustSearchModule
from trainer import retrain
from trainer.aat import reptile_meta_step
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.finite import NonFiniteError, check_loss, nonfinite_tensors
from trainer.module import RetrainModule

NAN = float("nan")


def test_check_loss_names_the_step_parts_and_last_checkpoint():
    check_loss(torch.tensor(1.5), {"seg": 1.0}, "training step 3")  # finite: no error
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan at training step 3 \(loss parts: seg=nan, "
                                             r"fusion=0\.5\); last good checkpoint: runs/x/last\.pt"):
        check_loss(torch.tensor(NAN), {"seg": NAN, "fusion": 0.5}, "training step 3", "runs/x/last.pt")
    with pytest.raises(NonFiniteError, match="non-finite gradient norm inf .* no checkpoint written yet"):
        check_loss(math.inf, {}, "step 0", what="gradient norm")


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = nn.Linear(2, 2)
    assert nonfinite_tensors(model.state_dict()) == []
    with torch.no_grad():
        model.bias[0] = math.inf
    assert nonfinite_tensors(model.state_dict()) == ["bias"]
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*x\.pt: 1 of 2 tensors .* \(bias\)"):
        save_checkpoint(tmp_path / "x.pt", model, {"channels": 8}, {"variant": "b0", "num_classes": 9}, {})
    assert not (tmp_path / "x.pt").exists()


def test_pretext_stops_at_a_nan_loss():
    model = nn.Linear(2, 1)

    def objective(m, batch, eps):
        loss = m(batch).sum() * (NAN if eps > 0.02 else 1.0)
        return loss, float(loss.detach())

    with pytest.raises(NonFiniteError, match="AAT pretext meta-iteration 0, task eps 8.0/255, inner step 0"):
        reptile_meta_step(model, [2 / 255, 8 / 255], objective, lambda it, k, i: torch.ones(1, 2))


def test_search_step_stops_at_a_nan_loss():
    module = RobustSearchModule(lambda out, batch: (out, {}), None, w=0.0, w_arch=0.0)
    module.robust_step = lambda batch, architecture: (torch.tensor(NAN), {"clean": torch.tensor(NAN)})
    with pytest.raises(NonFiniteError, match=r"search weight step \(epoch 0, batch 1\) \(loss parts: clean=nan\)"):
        module.training_step({"ir": torch.zeros(1, 1, 2, 2)}, 1)


# --------------------------------------------------------------------------------------------- retrain
def _tiny(root: Path, runs: Path, *extra: str) -> list[str]:
    return ["--genotype", "paif", "mode=clean", f"data.root={root}", "data.crop=[32,40]", "data.batch_size=2",
            "data.val_batch_size=2", "channels=8", "progress_bar=false", "val.attack_steps=1", "val.num_images=0",
            "num_threads=1", f"runs_root={runs}", "optim.warmup_steps=0", "max_steps=3", *extra]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _assert_no_nonfinite_checkpoint(runs: Path) -> None:
    (run_dir,) = runs.iterdir()
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            assert nonfinite_tensors(load_checkpoint(run_dir / name)["state_dict"]) == [], name


@pytest.mark.parametrize("val_every, found", [(0, "loss nan at training step 1"), (1, "logits in the validation")],
                         ids=["train-loss", "validation"])
def test_retrain_with_a_huge_lr_stops_with_a_clear_error(synthetic_root, tmp_path, capsys, val_every, found):
    runs = tmp_path / "runs"
    assert retrain.main(_tiny(synthetic_root, runs, "optim.lr=1e30", f"val.every_n_steps={val_every}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's log lines
    assert err.startswith(f"error: non-finite {found}") and "step 1" in err and "lower optim.lr" in err
    _assert_no_nonfinite_checkpoint(runs)


def test_retrain_nan_after_a_checkpoint_names_it(synthetic_root, tmp_path, capsys, monkeypatch):
    robust_loss = RetrainModule.robust_loss

    def inject(self, batch, eps, generator=None):
        loss, logs = robust_loss(self, batch, eps, generator)
        if self.global_step == 2:
            logs["seg"] = torch.tensor(NAN)
            loss = loss * NAN
        return loss, logs

    monkeypatch.setattr(RetrainModule, "robust_loss", inject)
    runs = tmp_path / "runs"
    assert retrain.main(_tiny(synthetic_root, runs, "save_every_steps=1", "val.every_n_steps=1")) == 2
    err = capsys.readouterr().err
    assert "non-finite loss nan at training step 2" in err and "seg=nan" in err
    (run_dir,) = runs.iterdir()
    assert f"last good checkpoint: {run_dir / 'last.pt'}" in err  # written by the validation after step 2
    assert load_checkpoint(run_dir / "last.pt")["state"]["global_step"] == 2
    _assert_no_nonfinite_checkpoint(runs)
