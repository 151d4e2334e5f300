"""NNI DARTS wiring, robust objective and resume, on the constructed toy space (fast, CPU)."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from nni.nas.evaluator.pytorch import DataLoader
from nni.nas.strategy import DARTS

from strategies.darts import RESULT_NAME, DartsSettings, EpochShuffleSampler, run_darts
from strategies.objective import robust_loss
from trainer.robust_objective import convex_weights
from strategies.search_module import RobustSearchModule, is_architecture_step
from strategies_toy import ToyData, ToySpace, toy_attack_factory, toy_objective

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def loaders(n_train: int = 8, n_val: int = 8, batch: int = 4, seed: int = 0):
    tr, va = ToyData(n_train, seed=1), ToyData(n_val, seed=2)
    return (DataLoader(tr, batch_size=batch, sampler=EpochShuffleSampler(len(tr), seed)),
            DataLoader(va, batch_size=batch, sampler=EpochShuffleSampler(len(va), seed + 1)))


class ZeroAlpha(pl.Callback):
    """Start from exactly uniform architecture probabilities."""

    def on_train_start(self, trainer, pl_module):
        for p in pl_module.arch_parameters():
            p.data.zero_()


class Recorder(pl.Callback):
    def __init__(self):
        self.calls = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(sorted(batch))


def toy_search(tmp_path, w=0.5, w_arch=0.5, epochs=1, callbacks=(), resume=None, arch_lr=3e-4, seed=0,
               deterministic=False, batches=None, head_choice=False):
    torch.manual_seed(seed)
    tr, va = loaders(seed=seed)
    module = RobustSearchModule(toy_objective, toy_attack_factory(), w=w, w_arch=w_arch, lr=1e-2)
    settings = DartsSettings(epochs=epochs, arch_lr=arch_lr, log_every_n_steps=1, progress_bar=False, seed=seed,
                             deterministic=deterministic, max_train_batches=batches)
    return run_darts(ToySpace(head_choice=head_choice), module, tr, va, tmp_path, settings, {"w": w, "w_arch": w_arch},
                     resume=resume, callbacks=callbacks)


def test_darts_drives_arch_and_weight_steps_in_turn(tmp_path, monkeypatch):
    """NNI calls training_step(val_batch, 2k) then training_step(train_batch, 2k+1) on a {train, val} loader."""
    seen = []
    original = RobustSearchModule.training_step

    def spy(self, batch, batch_idx):
        seen.append((batch_idx, batch["name"][0] in {str(i) for i in range(8)}, self.trainer.current_epoch))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RobustSearchModule, "training_step", spy)
    rec = Recorder()
    result = toy_search(tmp_path, callbacks=[rec])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [is_architecture_step(i) for i, _, _ in seen] == [True, False, True, False]
    assert rec.calls[0] == ["train", "val"]
    saved = json.loads((tmp_path / RESULT_NAME).read_text())
    assert saved["probabilities"] == result["probabilities"]
    assert set(saved["probabilities"]["toy/op1"]) == {"identity", "fragile"}
    assert saved["architecture"]["toy/op1"] in {"identity", "fragile"}
    assert saved["complete"] and saved["epoch"] == 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["paif_search_config"] == {"w": 0.5, "w_arch": 0.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_attack_does_not_disturb_the_supernet():
    """BN statistics, .grad and the training mode survive the attack inside robust_loss."""
    torch.manual_seed(0)
    space = ToySpace()
    space.head = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    supernet = DARTS().mutate_model(space)
    supernet.train()
    batch = next(iter(loaders()[0]))
    for p in supernet.parameters():
        p.grad = torch.full_like(p, 0.25)
    attack = toy_attack_factory()(supernet)

    def noisy_attack(ir, vis, label):
        supernet.eval()
        supernet(ir, vis)  # eval forward: BN stats untouched, but a careless attack could also run train mode
        supernet.train()
        supernet(ir + 0.1, vis)  # a train-mode forward updates BN running stats
        return attack(ir, vis, label)

    bn = supernet.head[0]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    robust_loss(supernet, toy_objective, batch, noisy_attack, *convex_weights(1.0))
    # only the objective's own (adversarial, w=1) forward pass updates the BN statistics
    assert supernet.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in supernet.parameters())
    assert int(bn.num_batches_tracked) == before[2] + 1


def test_w_arch_changes_architecture_gradients():
    """With w_arch = 0 and w_arch = 1 the α gradients of the same batch differ."""
    batch = next(iter(loaders()[1]))
    grads = {}
    for w_arch in (0.0, 1.0):
        torch.manual_seed(0)
        supernet = DARTS().mutate_model(ToySpace())
        module = RobustSearchModule(toy_objective, toy_attack_factory(), w=0.5, w_arch=w_arch)
        module.set_model(supernet)
        torch.manual_seed(1)
        loss, _ = module.robust_step(batch, architecture=True)
        alpha = [p for n, p in supernet.named_parameters() if n.endswith("_arch_alpha")]
        (g,) = torch.autograd.grad(loss, alpha)
        grads[w_arch] = g
    assert not torch.allclose(grads[0.0], grads[1.0], atol=1e-6)
    # the clean objective cannot tell the ops apart on clean images: its α gradient is (numerically) zero
    assert grads[0.0].abs().max() < 1e-6 < grads[1.0].abs().max()


@pytest.mark.parametrize("w_arch", [0.0, 1.0])
def test_robust_objective_avoids_fragile_op(tmp_path, w_arch):
    result = toy_search(tmp_path, w=0.5, w_arch=w_arch, epochs=3, arch_lr=0.05, callbacks=[ZeroAlpha()])
    p = result["probabilities"]["toy/op1"]
    if w_arch == 0.0:
        assert p["fragile"] == pytest.approx(0.5, abs=1e-6)  # clean objective: no preference
    else:
        assert p["fragile"] < 0.4 and result["architecture"]["toy/op1"] == "identity"


class Crash(pl.Callback):
    def __init__(self, at_epoch):
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated kill")


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(epochs=3, deterministic=True, seed=3, head_choice=True, arch_lr=0.01)
    full = toy_search(tmp_path / "full", **kw)
    with pytest.raises(RuntimeError, match="simulated kill"):
        toy_search(tmp_path / "killed", callbacks=[Crash(2)], **kw)
    partial = json.loads((tmp_path / "killed" / RESULT_NAME).read_text())
    assert partial["epoch"] == 2 and not partial["complete"]
    resumed = toy_search(tmp_path / "killed", resume=tmp_path / "killed" / "checkpoints" / "last.ckpt", **kw)
    a = json.loads((tmp_path / "full" / RESULT_NAME).read_text())
    b = json.loads((tmp_path / "killed" / RESULT_NAME).read_text())
    cost_a, cost_b = a.pop("cost"), b.pop("cost")  # times differ; everything else (the history too) is equal
    assert cost_a["earlier_processes_cpu_minutes"] == 0 < cost_b["earlier_processes_cpu_minutes"]
    assert cost_b["search_cpu_minutes"] > cost_b["earlier_processes_cpu_minutes"]
    assert a == b
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert resumed["probabilities"] == full["probabilities"]
    assert a["epoch"] == 3 and a["global_step"] == b["global_step"]
    assert set(a["probabilities"]) == {"toy/op1", "toy/head"}
    assert a["probabilities"] != partial["probabilities"]  # the resumed epoch did train


def test_architecture_parameters_have_a_stable_order():
    """NNI returns list(set(α)); ResumableDARTS keeps module order so a restored Adam state fits."""
    from strategies.darts import ResumableDARTS

    for _ in range(3):
        strategy = ResumableDARTS()
        supernet = strategy.mutate_model(ToySpace(head_choice=True))
        module = RobustSearchModule(toy_objective, None, w=0.0, w_arch=0.0)
        oneshot = strategy.configure_oneshot_module(module)
        module.set_model(supernet)
        assert [p.numel() for p in oneshot.arch_parameters()] == [2, 3]
