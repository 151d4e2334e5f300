"""retrain.py mode=fusion: the fusion net alone on unlabelled pairs (reference-free loss, optional label-free
attack), a recorded held-out split, the nine fusion metrics in validation, and a checkpoint that says so."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from search_space.pipeline import build_model
from trainer.checkpoint import info, load_checkpoint, resolve_genotype
from trainer.config import ConfigError, load_config
from trainer.metrics import FUSION_METRIC_NAMES
from trainer.module import FUSION_MONITORS, RetrainConfig
from trainer.retrain import holdout_indices, main
from trainer.runs import seed_everything

NAMES = [f"p{i}" for i in range(6)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Six unlabelled 32x40 pairs (flat vi/ + ir/), smooth random scenes."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for name in NAMES:
        base = rng.random((8, 10))
        big = np.kron(base, np.ones((4, 4)))
        for sub, img in (("vi", np.stack([big, big[::-1], big[:, ::-1]], -1)), ("ir", 1 - big)):
            (root / sub).mkdir(exist_ok=True)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / sub / f"{name}.png")
    return root


@pytest.mark.slow
def test_fusion_mode_trains_only_the_fusion_net_on_unlabelled_pairs(pairs, tmp_path, capsys):
    argv = ["--genotype", "paif", "mode=fusion", "channels=8", f"data.root={pairs}", "data.holdout_fraction=0.34",
            "data.batch_size=2", "max_steps=3", "val.attack_steps=1", "attack.steps=1", "attack.fusion_eps=0.0314",
            "optim.warmup_steps=0", "optim.lr=0.01", f"runs_root={tmp_path}", "progress_bar=false", "save_every_steps=3"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / summary["run_dir"].split("/")[-1]
    assert summary["mode"] == "fusion" and summary["monitor"] == "val/fusion_loss_adv" and summary["global_step"] == 3
    assert summary["best_score"] > 0  # a loss, in the monitor's own units
    # the split: recorded, disjoint, complete, the file-name-hash choice
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["held_out"]) == NAMES and not set(split["train"]) & set(split["held_out"])
    train_idx, held_idx = holdout_indices(NAMES, 0.34, 0)
    assert split["held_out"] == [NAMES[i] for i in held_idx] and len(held_idx) == 2
    # only the fusion net moved; the segmenter is exactly its seeded initialisation
    last = load_checkpoint(run / "last.pt")
    seed_everything(0)
    init = build_model(resolve_genotype("paif", channels=8)).state_dict()
    sd = last["state_dict"]
    assert all(torch.equal(sd[k], init[k]) for k in sd if k.startswith("segmenter."))
    assert any(not torch.equal(sd[k], init[k]) for k in sd if k.startswith("fusion.") and sd[k].is_floating_point())
    # validation: fusion loss clean / attacked and the nine fusion metrics, in the checkpoint's state and card
    metrics = last["state"]["metrics"]
    assert set(FUSION_MONITORS) <= set(metrics)
    assert {f"val/fusion/{k}" for k in FUSION_METRIC_NAMES} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    card = info(run / "best.pt")
    assert card["training"]["mode"] == "fusion" and "segmenter is NOT trained" in card["training"]["summary"]
    assert "label-free fusion attack PGD-1" in card["training"]["summary"]
    assert card["data"]["labels_used"] is False and "2 held-out files" in card["data"]["val"]
    assert "lambda_seg" not in card["training"]["recipe"]


def test_fusion_mode_config_checks():
    cfg = load_config(RetrainConfig, None, {"mode": "fusion"})
    assert cfg.monitor == "val/fusion_loss"  # the segmentation default has no meaning without labels
    assert load_config(RetrainConfig, None, {"mode": "fusion", "attack.fusion_eps": 0.03}).monitor == \
        "val/fusion_loss_adv"
    with pytest.raises(ConfigError, match=r"monitor: expected one of \['val/miou'.*; mode clean"):
        load_config(RetrainConfig, None, {"mode": "clean", "monitor": "val/fusion_loss"})
    with pytest.raises(ConfigError, match=r"attack.fusion_eps: expected a budget in \[0, 1\]"):
        load_config(RetrainConfig, None, {"mode": "fusion", "attack.fusion_eps": 3})
    with pytest.raises(ConfigError, match=r"data.holdout_fraction: expected a fraction in \[0, 1\)"):
        load_config(RetrainConfig, None, {"data.holdout_fraction": 1.0})


def test_holdout_is_a_pure_function_of_names_fraction_and_seed():
    names = [f"img{i:03d}" for i in range(60)]
    a = holdout_indices(names, 0.2, 0)
    assert a == holdout_indices(list(reversed(names))[::-1], 0.2, 0)
    assert len(a[1]) == 12 and sorted(a[0] + a[1]) == list(range(60))
    assert holdout_indices(names, 0.2, 1)[1] != a[1]  # another seed, another held-out part
