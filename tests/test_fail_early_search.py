"""The search keeps last.ckpt plus the best epochs only (keep_checkpoints), applies nan_policy to losses and gradient
norms, refuses --resume with settings that change the run, and reports a bad file inside the search in one line."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from strategies import search as search_entry
from strategies.darts import SELECT_METRIC, DartsSettings, EpochShuffleSampler, run_darts
from strategies.search_module import RobustSearchModule
from trainer.errors import FAILED_FILE
from trainer.finite import NonFiniteError

sys.path.insert(0, str(Path(__file__).parent / "strategies"))
from strategies_toy import ToyData, ToySpace, toy_attack_factory, toy_objective  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_search(run_dir, epochs=3, keep=1, nan_policy="stop", nan_max_skips=10, resume=None):
    from nni.nas.evaluator.pytorch import DataLoader

    torch.manual_seed(0)
    tr, va = ToyData(8, seed=1), ToyData(8, seed=2)
    loaders = [DataLoader(d, batch_size=4, sampler=EpochShuffleSampler(len(d), s)) for d, s in ((tr, 0), (va, 1))]
    module = RobustSearchModule(toy_objective, toy_attack_factory(), w=0.5, w_arch=0.5, lr=1e-2,
                                nan_policy=nan_policy, nan_max_skips=nan_max_skips)
    settings = DartsSettings(epochs=epochs, log_every_n_steps=1, progress_bar=False, keep_checkpoints=keep)
    result = run_darts(ToySpace(), module, *loaders, run_dir, settings, {"w": 0.5}, resume=resume)
    return result, module


def _epoch_metric(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events))
    tb.Reload()
    return [e.value for e in tb.Scalars(SELECT_METRIC)]


@pytest.mark.parametrize("keep", [0, 1, 2, -1])
def test_search_keeps_last_and_the_best_epochs_only(tmp_path, keep):
    toy_search(tmp_path, epochs=3, keep=keep)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    metric = _epoch_metric(tmp_path)  # one value per epoch, from TensorBoard (written beside the checkpoints)
    assert len(metric) == 3
    ranked = list(np.argsort(metric, kind="stable"))
    best = ranked if keep == -1 else ranked[:keep]
    assert files == sorted(["last.ckpt"] + [f"best-epoch{e:03d}.ckpt" for e in best])


def test_search_resumes_from_last_ckpt_with_fewer_checkpoints_kept(tmp_path):
    toy_search(tmp_path, epochs=1, keep=1)
    result, _ = toy_search(tmp_path, epochs=2, keep=1, resume=tmp_path / "checkpoints" / "last.ckpt")
    assert result["epoch"] == 2
    assert len(list((tmp_path / "checkpoints").glob("best-epoch*.ckpt"))) == 1


def _nan_on(calls: set[int], grad: bool = False):
    """robust_step with its n-th call (0-based) returning a NaN loss, or a finite loss with NaN gradients."""
    original = RobustSearchModule.robust_step
    count = [0]

    def step(self, batch, architecture):
        loss, parts = original(self, batch, architecture)
        n, count[0] = count[0], count[0] + 1
        if n in calls:
            if grad:  # d sqrt(x)/dx at 0 is inf, times 0: NaN gradients on every weight, a finite loss
                loss = loss + 0.0 * torch.sqrt(0.0 * sum(p.sum() for p in self.model.parameters()))
            else:
                loss = loss * float("nan")
        return loss, parts

    return step


def test_search_stops_at_a_non_finite_gradient_norm(tmp_path, monkeypatch):
    monkeypatch.setattr(RobustSearchModule, "robust_step", _nan_on({1}, grad=True))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm nan at search weight step \(epoch 0, batch 1\)"):
        toy_search(tmp_path, epochs=1)


def test_skip_policy_skips_the_step_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(RobustSearchModule, "robust_step", _nan_on({1, 2}, grad=False))
    result, module = toy_search(tmp_path, epochs=2, nan_policy="skip")
    assert module.guard.skipped == 2 and module.guard.in_a_row == 0
    assert result["epoch"] == 2
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())
    assert state["paif_nan_guard"] == {"in_a_row": 0, "skipped": 2}


def test_skip_policy_stops_after_n_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(RobustSearchModule, "robust_step", _nan_on(set(range(100)), grad=True))
    with pytest.raises(NonFiniteError, match=r"3 steps in a row skipped \(nan_policy=skip, nan_max_skips=3\); the last: "
                                             r"non-finite gradient norm nan at search arch step \(epoch 0, batch 2\)"):
        toy_search(tmp_path, epochs=1, nan_policy="skip", nan_max_skips=3)


def test_a_skipped_step_leaves_weights_and_adam_moments_unchanged():
    """guard_gradients drops the gradients, and Adam skips parameters without one."""
    module = RobustSearchModule(toy_objective, None, w=0.0, w_arch=0.0, nan_policy="skip")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()  # one real step: moments exist
    before, moments = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    module._step_ok = False  # the loss of this step was NaN
    p.grad = torch.full((3,), float("nan"))
    module.guard_gradients([p], architecture=False)
    opt.step()
    assert p.grad is None and torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in moments.items())


# ------------------------------------------------------------------------------------- the real entry point
TINY = ["data.crop=[32,40]", "data.batch_size=2", "space.channels=4", "space.candidates=[dense_k3_d1,eca_k3]",
        "epochs=1", "max_train_batches=1", "threads=1", "progress_bar=false", "attack.name=fgsm",
        "selection.max_batches=1"]


@pytest.fixture
def bad_val_label(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    label = sorted((root / "val" / "Segmentation_labels").iterdir())[-1]
    arr = np.array(Image.open(label))
    arr[0, 0] = 12
    Image.fromarray(arr).save(label)
    return root, label


def test_a_bad_file_is_reported_before_the_search(bad_val_label, tmp_path, capsys):
    root, label = bad_val_label
    run_dir = tmp_path / "run"
    args = ["--config", "configs/search.yaml", f"data.root={root}", *TINY, f"run_dir={run_dir}"]
    assert search_entry.main(args) == 2
    err = capsys.readouterr().err
    assert f"{label}: expected label values in 0..8 or 255 (ignore), got [12]" in err
    assert "data.check=false or --skip-data-check skips this check" in err
    assert not run_dir.exists()  # created by this command, holding only config/log/versions: removed


@pytest.mark.slow
def test_a_data_error_inside_the_search_is_one_line(bad_val_label, tmp_path, capsys):
    """With the check skipped, the bad label stops the search when the held-out loader reaches it: still one line."""
    root, label = bad_val_label
    run_dir = tmp_path / "run"
    args = ["--config", "configs/search.yaml", f"data.root={root}", *TINY, f"run_dir={run_dir}", "--skip-data-check",
            "data.val_split=val", "max_train_batches=null", "data.batch_size=1"]
    assert search_entry.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {label}: expected label values in 0..8 or 255 (ignore), got [12] in 1 pixels; " \
                      "fix the label map"
    assert (run_dir / FAILED_FILE).read_text().startswith(f"{label}: expected label values")


@pytest.mark.slow
def test_resume_refuses_a_setting_that_changes_the_search(synthetic_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert search_entry.main(["--config", "configs/search.yaml", f"data.root={synthetic_root}", *TINY,
                              f"run_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert search_entry.main(["--resume", str(run_dir), "epochs=2", "data.batch_size=4", "attack.eps=0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume {run_dir}: attack.eps: was 0.03137254901960784, got 0.01; "
                          "data.batch_size: was 2, got 4; a resumed run must keep the settings it was started with")
    assert "epochs" not in err.split("(only")[0]  # more epochs is allowed (RESUME_SAFE)
    assert not (run_dir / FAILED_FILE).exists()  # refused before the run folder is touched: the run is intact
    assert search_entry.main(["--resume", str(run_dir), "epochs=2"]) == 0
