"""One robust loss for search and retraining (trainer.robust_objective): shared object, clean fusion targets,
training-mode attacks with buffers restored, the (1-w, w) and (1, λ) weightings."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import strategies.objective as search_objective
import strategies.search_module as search_module
import trainer.module as retrain_module
from rgbt.color import rgb_to_y
from strategies.objective import AttackConfig, build_attack_factory
from strategies.search_module import RobustSearchModule
from trainer import robust_objective
from trainer.losses import TaskLoss, fusion_loss
from trainer.module import RetrainConfig, RetrainModule
from trainer.robust_objective import convex_weights, robust_loss, task_objective

H = W = 16


class Out(NamedTuple):
    fused_y: torch.Tensor
    logits: torch.Tensor


class Tiny(nn.Module):
    """BN -> (fused_y = sigmoid(conv), logits = 1x1 conv); records its ``training`` flag at every forward."""

    def __init__(self, constant_fused: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fuse = nn.Conv2d(4, 1, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)
        self.fused_bias = nn.Parameter(torch.full((1, 1, H, W), 0.3))
        self.constant_fused = constant_fused
        self.modes: list[bool] = []

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> Out:
        self.modes.append(self.training)
        x = self.bn(torch.cat([ir, vis], 1))
        if self.constant_fused:  # fused output independent of the inputs
            fused = self.fused_bias.expand(ir.shape[0], 1, H, W)
        else:
            fused = torch.sigmoid(self.fuse(x))
        return Out(fused, self.head(x))


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ir": torch.rand(2, 1, H, W, generator=g), "vis": torch.rand(2, 3, H, W, generator=g),
            "label": torch.randint(0, 3, (2, H, W), generator=g)}


def _shift_attack(d_ir: float = 0.2, d_vis: float = -0.15):
    """A fixed 'attack': shift both images (clamped), no model call."""
    return lambda ir, vis, label: ((ir + d_ir).clamp(0, 1), (vis + d_vis).clamp(0, 1))


def test_search_and_retraining_import_the_same_function():
    assert search_objective.robust_loss is robust_objective.robust_loss
    assert search_module.robust_loss is robust_objective.robust_loss
    assert retrain_module.robust_loss is robust_objective.robust_loss
    assert search_objective.task_objective is robust_objective.task_objective
    assert not hasattr(search_objective, "supernet_state_guard")  # the duplicate is gone


def _spy(monkeypatch, module):
    calls = []

    def spy(model, objective, batch, attack, clean_weight, adv_weight):
        calls.append((clean_weight, adv_weight, attack is not None))
        return robust_objective.robust_loss(model, objective, batch, attack, clean_weight, adv_weight)

    monkeypatch.setattr(module, "robust_loss", spy)
    return calls


def test_both_stages_call_the_shared_loss_with_their_weights(monkeypatch, tmp_path):
    torch.manual_seed(0)
    search_calls = _spy(monkeypatch, search_module)
    sm = RobustSearchModule(task_objective(TaskLoss()), build_attack_factory(AttackConfig(steps=1)),
                            w=0.25, w_arch=1.0)
    sm.set_model(Tiny())
    sm.robust_step(_batch(), architecture=False)
    sm.robust_step(_batch(), architecture=True)
    assert search_calls == [(0.75, 0.25, True), (0.0, 1.0, True)]

    retrain_calls = _spy(monkeypatch, retrain_module)
    cfg = RetrainConfig(mode="at")
    cfg.attack.steps, cfg.attack.adv_weight = 1, 0.7
    rm = RetrainModule(Tiny(), None, cfg, tmp_path, train_set=[_batch()])
    rm.robust_loss(_batch(), 8 / 255, torch.Generator().manual_seed(0))
    rm.robust_loss(_batch(), None)
    assert retrain_calls == [(1.0, 0.7, True), (1.0, 0.0, False)]


def test_weights_combine_the_parts():
    torch.manual_seed(0)
    model, batch, obj = Tiny(), _batch(), task_objective(TaskLoss())
    for w in (0.0, 0.3, 1.0):
        out = robust_loss(model, obj, batch, _shift_attack() if w > 0 else None, *convex_weights(w))
        expect = (1 - w) * out.parts.get("clean", 0.0) + w * out.parts.get("adv", 0.0)
        torch.testing.assert_close(out.loss.detach(), torch.as_tensor(expect, dtype=out.loss.dtype))
        assert ("clean" in out.parts) == (w < 1) and ("adv" in out.parts) == (w > 0)
    out = robust_loss(model, obj, batch, _shift_attack(), 1.0, 0.7)  # retraining's (1, λ)
    torch.testing.assert_close(out.loss.detach(), out.parts["clean"] + 0.7 * out.parts["adv"])


def test_adversarial_fusion_term_uses_the_clean_sources():
    torch.manual_seed(0)
    model, batch, attack = Tiny(), _batch(), _shift_attack()
    out = robust_loss(model, task_objective(TaskLoss()), batch, attack, 0.5, 0.5)
    ir_adv, vis_adv = attack(batch["ir"], batch["vis"], None)
    with torch.no_grad():
        fused_adv = model(ir_adv, vis_adv).fused_y
    clean_target, _ = fusion_loss(batch["ir"], rgb_to_y(batch["vis"]), fused_adv)
    attacked_target, _ = fusion_loss(ir_adv, rgb_to_y(vis_adv), fused_adv)
    torch.testing.assert_close(out.parts["adv_fusion"], clean_target, rtol=1e-5, atol=1e-6)
    assert abs(float(attacked_target - clean_target)) > 1e-3  # the test can tell the two targets apart


def test_perturbation_that_leaves_the_output_unchanged_leaves_the_fusion_term_unchanged():
    """Fused output independent of the inputs: δ moves only what a wrong loss would use as targets."""
    model, batch = Tiny(constant_fused=True), _batch()
    out = robust_loss(model, task_objective(TaskLoss()), batch, _shift_attack(0.3, 0.3), 0.5, 0.5)
    torch.testing.assert_close(out.parts["adv_fusion"], out.parts["clean_fusion"], rtol=0, atol=0)


def _bn_state(model: Tiny) -> tuple[torch.Tensor, torch.Tensor, int]:
    return model.bn.running_mean.clone(), model.bn.running_var.clone(), int(model.bn.num_batches_tracked)


@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_attack_runs_in_training_mode_and_restores_buffers(stage, tmp_path):
    """Both stages attack the model in its training mode; only the two loss forwards touch BN statistics."""
    torch.manual_seed(0)
    model = Tiny().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    batch = _batch()
    mean0, _, n0 = _bn_state(model)
    if stage == "search":
        sm = RobustSearchModule(task_objective(TaskLoss()), build_attack_factory(AttackConfig(steps=2)), w=0.5)
        sm.set_model(model)
        assert sm.attack().model_mode == robust_objective.TRAIN_ATTACK_MODE
        sm.robust_step(batch, architecture=False)
    else:
        cfg = RetrainConfig(mode="at")
        cfg.attack.steps = 2
        rm = RetrainModule(model, None, cfg, tmp_path, train_set=[batch])
        assert rm.make_attack(8 / 255, None).model_mode == robust_objective.TRAIN_ATTACK_MODE
        rm.robust_loss(batch, 8 / 255, torch.Generator().manual_seed(0))
    # attack (random start, 2 steps) + clean + adversarial forward passes, all in training mode
    assert len(model.modes) >= 4 and all(model.modes)
    assert model.training
    assert int(model.bn.num_batches_tracked) == n0 + 2  # the attack's forwards were rolled back
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert not torch.equal(model.bn.running_mean, mean0)  # the loss forwards did update them


def test_robust_loss_errors():
    model, batch, obj = Tiny(), _batch(), task_objective(TaskLoss())
    with pytest.raises(ValueError, match="expected an attack for adv_weight=0.5"):
        robust_loss(model, obj, batch, None, 0.5, 0.5)
    with pytest.raises(ValueError, match="expected weights >= 0"):
        robust_loss(model, obj, batch, _shift_attack(), -1.0, 1.0)
    with pytest.raises(ValueError, match="not both 0"):
        robust_loss(model, obj, batch, None, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"expected w in \[0, 1\], got 1.5"):
        convex_weights(1.5)
    with pytest.raises(ValueError, match="attack.model_mode"):
        AttackConfig(model_mode="train")


def test_retraining_loss_takes_the_configured_fusion_weights(tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.losses import FUSION_WEIGHTS

    torch.manual_seed(0)
    batch = _batch()
    cfg = load_config(RetrainConfig, None, ["mode=clean", "fusion_weights.ssim=5", "fusion_weights.gradient=0"])
    model = Tiny()
    loss, logs = RetrainModule(model, None, cfg, tmp_path, train_set=[batch]).robust_loss(batch, None)
    out = model(batch["ir"], batch["vis"])  # same batch statistics (BatchNorm in training mode)
    weights = {"intensity": 1.0, "gradient": 0.0, "ssim": 5.0}
    fusion, _ = fusion_loss(batch["ir"], rgb_to_y(batch["vis"]), out.fused_y, weights)
    ce = torch.nn.functional.cross_entropy(out.logits, batch["label"])
    torch.testing.assert_close(logs["fusion"], fusion.detach())
    torch.testing.assert_close(loss.detach(), (0.1 * fusion + 4.0 * ce).detach())
    default = RetrainModule(Tiny(), None, RetrainConfig(), tmp_path, train_set=[batch])
    assert default.task_loss.fusion_weights == FUSION_WEIGHTS
    with pytest.raises(ConfigError, match=r"fusion_weights.ssim: expected a finite number >= 0, got -1.0"):
        load_config(RetrainConfig, None, ["fusion_weights.ssim=-1"])
