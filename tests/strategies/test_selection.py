"""strategies.selection: the held-out adversarial task loss that ranks finished searches."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from robustness.attacks import PGD
from strategies.darts import nni_metric
from strategies.selection import SelectionConfig, heldout_adv_loss
from trainer.losses import TaskLoss

H = W = 16


class Out(NamedTuple):
    fused_y: torch.Tensor
    logits: torch.Tensor


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fuse = nn.Conv2d(4, 1, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, ir, vis):
        x = self.bn(torch.cat([ir, vis], 1))
        return Out(torch.sigmoid(self.fuse(x)), self.head(x))


def _batches(sizes=(2, 1)):
    g = torch.Generator().manual_seed(0)
    return [{"ir": torch.rand(n, 1, H, W, generator=g), "vis": torch.rand(n, 3, H, W, generator=g),
             "label": torch.randint(0, 3, (n, H, W), generator=g)} for n in sizes]


def test_value_is_the_image_weighted_mean_of_the_attacked_task_loss():
    torch.manual_seed(0)
    model = Tiny().train()
    batches = _batches()
    cfg = SelectionConfig(eps=4 / 255, steps=2, lambda_fusion=0.5, lambda_seg=2.0, seed=3)
    bn_before = model.bn.running_mean.clone()
    got = heldout_adv_loss(model, batches, cfg)
    # reference: the same attack and loss, called directly, in eval mode
    ref_model = Tiny()
    ref_model.load_state_dict(model.state_dict())
    ref_model.eval()
    loss = TaskLoss(0.5, 2.0)
    total = 0.0
    for b in batches:
        ir_a, vis_a = PGD(ref_model, eps=4 / 255, alpha=2.5 * 4 / 255 / 2, steps=2, seed=3)(b["ir"], b["vis"], b["label"])
        with torch.no_grad():
            total += float(loss(ref_model(ir_a, vis_a), b["ir"], b["vis"], b["label"])[0]) * b["ir"].shape[0]
    assert got["value"] == pytest.approx(total / 3, rel=1e-6)
    assert got["images"] == 3 and got["metric"] == "heldout_adv_loss" and got["mode"] == "min"
    assert got["value"] > got["clean_loss"]  # the attack raises the loss
    assert heldout_adv_loss(model, batches, cfg)["value"] == got["value"]  # deterministic
    assert model.training and torch.equal(model.bn.running_mean, bn_before)  # model left as found
    assert heldout_adv_loss(model, batches, SelectionConfig(max_batches=1))["images"] == 2


def test_label_free_data_uses_the_fusion_attack():
    model = Tiny()
    batches = [{k: v for k, v in b.items() if k != "label"} for b in _batches()]
    got = heldout_adv_loss(model, batches, SelectionConfig(), has_labels=False)
    assert got["value"] > 0 and got["images"] == 3


def test_errors_and_nni_default():
    with pytest.raises(ValueError, match="at least one held-out batch"):
        heldout_adv_loss(Tiny(), [], SelectionConfig())
    with pytest.raises(ValueError, match="expected eps > 0"):
        SelectionConfig(eps=0.0)
    result = {"metrics": {"arch_loss": 5.0, "arch_adv": 3.0}, "probabilities": {"a": {"x": 1.0}}}
    assert nni_metric(result)["default"] == 3.0  # per epoch: progress only
    assert nni_metric({**result, "selection": {"value": 1.25}})["default"] == 1.25  # final: the selection metric
