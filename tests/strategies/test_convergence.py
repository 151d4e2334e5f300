"""strategies.convergence (statistics against references computed another way) and the converging search regime
on the real FusionSpace: α leaves uniform in a short search, a zero-lr control does not."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from strategies.convergence import (agreement, argmax_of, last_change_epoch, light_ops, light_share, param_counts,
                                    plot_alpha, slot_stats, stable_for, summary_stats)
from strategies.search import SearchConfig, run_search
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _entry(epoch: int, argmax: dict, arch: bool = True) -> dict:
    return {"epoch": epoch, "arch": arch, "argmax": argmax}


def test_slot_stats_match_scipy_style_references():
    dist = {"a": 0.7, "b": 0.2, "c": 0.1}
    st = slot_stats(dist)
    p = np.array([0.7, 0.2, 0.1])
    assert st["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert st["entropy_norm"] == pytest.approx(float(-(p * np.log(p)).sum() / np.log(3)))
    assert st["top"] == 0.7 and st["argmax"] == "a"
    assert st["max_dev"] == pytest.approx(0.7 - 1 / 3)
    uniform = slot_stats({k: 0.25 for k in "abcd"})
    assert uniform["entropy_norm"] == pytest.approx(1.0) and uniform["max_dev"] == pytest.approx(0.0)
    onehot = slot_stats({"a": 1.0, "b": 0.0})
    assert onehot["entropy"] == 0.0 and onehot["entropy_norm"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        slot_stats({})


def test_summary_and_argmax_per_label():
    probs = {"ir/op1": {"x": 0.2, "y": 0.8}, "rule": {"add": 0.6, "max": 0.4}}
    assert argmax_of(probs) == {"ir/op1": "y", "rule": "add"}
    assert set(summary_stats(probs)) == {"ir/op1", "rule"}


def test_last_change_and_stable_epochs():
    a, b = {"s": "x"}, {"s": "y"}
    history = [_entry(1, a, arch=False), _entry(2, a), _entry(3, b), _entry(4, b), _entry(5, b)]
    assert last_change_epoch(history) == 3
    assert stable_for(history) == 2  # epochs 4 and 5 equal their predecessors
    assert stable_for(history[:3]) == 0
    assert last_change_epoch([_entry(1, a), _entry(2, a)]) == 1  # never changed: the first epoch
    assert last_change_epoch([]) is None
    # warm-up epochs do not count as stable architecture epochs
    assert stable_for([_entry(1, a, False), _entry(2, a, False), _entry(3, a)]) == 0


def test_light_ops_are_cheaper_than_one_3x3_conv():
    ops = ["dense_k3_d1", "sepconv_k3", "dilconv_k3_d2", "eca_k3"]
    counts = param_counts(ops, 16)
    conv = torch.nn.Conv2d(16, 16, 3, bias=False)
    limit = sum(p.numel() for p in conv.parameters())
    assert light_ops(ops, 16) == [op for op in ops if counts[op] < limit]
    assert "sepconv_k3" in light_ops(ops, 16) and "dense_k3_d1" not in light_ops(ops, 16)
    with pytest.raises(ValueError, match="unknown op"):
        param_counts(["nope"], 16)
    arch = {"ir/op1": "sepconv_k3", "ir/op2": "dense_k3_d1", "rule": "add"}
    assert light_share(arch, ["sepconv_k3", "add"]) == (1, 2)  # the rule is not an op slot


def test_agreement_counts_equal_slots_and_needs_the_same_labels():
    a = {"ir/op1": "x", "ir/op2": "y", "rule": "add"}
    b = {"ir/op1": "x", "ir/op2": "z", "rule": "add"}
    assert agreement(a, b) == (2, 3, ["ir/op2"])
    with pytest.raises(ValueError, match="same labels"):
        agreement(a, {"ir/op1": "x"})


def test_plot_alpha_writes_a_png(tmp_path):
    history = [{"epoch": e, "arch": e > 1, "probabilities": {"s": {"x": 0.5 + 0.1 * e, "y": 0.5 - 0.1 * e}}}
               for e in (1, 2, 3)]
    path = plot_alpha(history, tmp_path / "alpha.png", light=["y"])
    assert path.stat().st_size > 1000 and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_alpha([], tmp_path / "x.png")


def test_regime_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(SearchConfig, "configs/search.yaml", ["epochs=2", "warmup_epochs=2"])
    with pytest.raises(ConfigError, match="strategy"):
        load_config(SearchConfig, "configs/search.yaml", ["strategy=enas"])
    with pytest.raises(ConfigError, match="stop_when_stable"):
        load_config(SearchConfig, "configs/search.yaml", ["stop_when_stable=0"])
    cfg = load_config(SearchConfig, "configs/search_converge.yaml", [])
    assert cfg.warmup_epochs >= 1 and cfg.epochs > cfg.warmup_epochs


# ------------------------------------------------------------------------------------- the real search space
TINY = [
    "data.crop=[32,40]", "data.batch_size=2", "space.channels=4", "space.steps=1",
    "space.candidates=[dense_k3_d1,sepconv_k3,eca_k3]", "space.rules=[add,max,spatial_attention]",
    "w=0", "w_arch=0", "attack.eps=0", "epochs=2", "warmup_epochs=1", "max_train_batches=4",
    "log_every_n_steps=1", "threads=1", "progress_bar=false", "selection.max_batches=1",
]


def _search(root, run_dir, arch_lr: float) -> dict:
    cfg = load_config(SearchConfig, "configs/search.yaml", [f"data.root={root}", *TINY, f"arch_lr={arch_lr}"])
    return run_search(cfg, run_dir)


@pytest.mark.slow
def test_alpha_leaves_uniform_and_a_zero_lr_control_does_not(synthetic_root, tmp_path):
    """2 epochs (1 warm-up) x 4 DARTS iterations: 4 architecture steps at arch_lr 0.3 versus 0 (~4 s CPU each)."""
    moved = _search(synthetic_root, tmp_path / "moved", 0.3)
    control = _search(synthetic_root, tmp_path / "control", 0.0)

    def max_dev(probs: dict) -> float:  # computed here from the raw probabilities, not from the recorder's stats
        return max(abs(p - 1 / len(d)) for d in probs.values() for p in d.values())

    threshold = 0.05
    assert max_dev(control["probabilities"]) < threshold / 10  # NNI's α start at randn * 1e-3
    assert max_dev(moved["probabilities"]) > threshold
    # the warm-up epoch does not move α in either run; the history keeps every epoch
    for res in (moved, control):
        hist = res["history"]
        assert [h["epoch"] for h in hist] == [1, 2] and [h["arch"] for h in hist] == [False, True]
        assert max_dev(hist[0]["probabilities"]) < threshold / 10
        for h in hist:  # recorded entropy = the entropy of the recorded probabilities
            for label, dist in h["probabilities"].items():
                ent = -sum(p * math.log(p) for p in dist.values())
                assert h["stats"][label]["entropy"] == pytest.approx(ent, rel=1e-6)
        conv = res["convergence"]
        assert conv["arch_epochs"] == 1 and conv["light_share"][1] == 3  # 3 op slots (+ the rule)
        assert conv["light_ops"] == ["sepconv_k3"]
        assert res["cost"]["cpu_minutes"] > 0
    assert moved["convergence"]["mean_entropy_norm"] < control["convergence"]["mean_entropy_norm"]
    # the per-slot curves are logged every epoch and drawn next to the result
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "moved" / "tensorboard").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events))
    tb.Reload()
    assert {"alpha/entropy/rule", "alpha/top/ir/op1", "alpha/mean_entropy_norm"} <= set(tb.Tags()["scalars"])
    assert len(tb.Scalars("alpha/top/rule")) == 2
    assert (tmp_path / "moved" / "alpha.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "moved" / "search_result.json").read_text())
    assert saved["history"][-1]["probabilities"] == moved["probabilities"]


# ------------------------------------------------------------------------------------- the toy space (fast)
def _toy(tmp_path, **settings):
    from nni.nas.evaluator.pytorch import DataLoader

    from strategies.darts import DartsSettings, EpochShuffleSampler, run_darts
    from strategies.search_module import RobustSearchModule
    from strategies_toy import ToyData, ToySpace, toy_attack_factory, toy_objective

    torch.manual_seed(0)
    tr, va = ToyData(8, seed=1), ToyData(8, seed=2)
    loaders = [DataLoader(d, batch_size=4, sampler=EpochShuffleSampler(len(d), i)) for i, d in enumerate((tr, va))]
    module = RobustSearchModule(toy_objective, toy_attack_factory(), w=0.5, w_arch=0.5, lr=1e-2)
    kw = {"log_every_n_steps": 1, "progress_bar": False, **settings}
    return run_darts(ToySpace(head_choice=True), module, *loaders, tmp_path, DartsSettings(**kw), {})


def test_early_stop_on_a_stable_argmax(tmp_path):
    """arch_lr 0: the argmax never changes, so the search stops once it was stable for 2 architecture epochs."""
    result = _toy(tmp_path, epochs=8, warmup_epochs=1, arch_lr=0.0, stop_when_stable=2)
    # epoch 1 warm-up, 2 first architecture epoch, 3 and 4 stable -> stop after epoch 4
    assert result["epoch"] == 4 and result["complete"]
    stopped = result["convergence"]["stopped_early"]
    assert stopped["epoch"] == 4 and "DARTS+" in stopped["reason"]
    assert result["convergence"]["stable_epochs"] == 2 and result["convergence"]["argmax_last_changed"] == 1


def test_gumbel_strategy_reports_the_softmax_of_alpha(tmp_path):
    """Under Gumbel sampling the recorded probabilities are softmax(α), not a fresh noisy sample."""
    result = _toy(tmp_path, epochs=2, arch_lr=0.05, strategy="gumbel", gumbel_temperature=(1.0, 0.5))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    alphas = [v for k, v in ckpt["state_dict"].items() if k.endswith("_arch_alpha")]
    assert sorted(a.numel() for a in alphas) == [2, 3]
    expected = sorted(torch.softmax(a, -1).tolist() for a in alphas)
    got = sorted(list(d.values()) for d in result["probabilities"].values())
    assert got == [pytest.approx(e, abs=1e-6) for e in expected]
    assert max(abs(p - 1 / len(d)) for d in result["probabilities"].values() for p in d.values()) > 0.01
    with pytest.raises(ValueError, match="strategy"):
        from strategies.darts import DartsSettings

        DartsSettings(strategy="enas")


def test_init_from_errors_name_the_setting(tmp_path):
    from strategies.search import segmenter_init

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="init_from=.*config.json"):
        segmenter_init(str(tmp_path / "empty"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="init_from=.*PAIF checkpoint"):
        segmenter_init(str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match="at most one source"):
        load_config(SearchConfig, "configs/search.yaml", ["init_from=x", "space.pretrained=y"])


def test_init_from_a_checkpoint_loads_its_segmenter(tmp_path):
    from search_space.pipeline import build_model
    from strategies.search import segmenter_init
    from trainer.checkpoint import save_checkpoint

    model = build_model("paif", segmenter="b0", num_classes=9)
    save_checkpoint(tmp_path / "start.pt", model, model.genotype, {"variant": "b0", "num_classes": 9}, {})
    seg_dir, state = segmenter_init(str(tmp_path / "start.pt"))
    assert seg_dir is None
    ref = model.segmenter.state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_a_pretrained_segmenter_trains_in_training_mode(tmp_path):
    """from_pretrained returns eval mode and Lightning keeps modes: the search's model must be put in training mode."""
    from search_space.segmenter import build_segmenter
    from strategies.search import build_search

    build_segmenter("b0", 9).model.save_pretrained(str(tmp_path / "seg"))
    cfg = load_config(SearchConfig, "configs/search.yaml", [f"init_from={tmp_path / 'seg'}", "space.channels=4",
                                                            "space.candidates=[sepconv_k3,eca_k3]", "w=0", "w_arch=0"])
    space, _, wrap = build_search(cfg)
    model = wrap(space)
    assert all(m.training for m in model.modules())


def test_convergence_cli_prints_the_history_and_the_agreement(tmp_path, capsys):
    from strategies.convergence import main

    def run(name: str, arch: dict) -> str:
        probs = {label: {op: (0.7 if op == choice else 0.3) for op in ("x", "y")} for label, choice in arch.items()}
        hist = [{"epoch": 1, "arch": False, "argmax": {"s1": "x", "s2": "x"}, "probabilities": probs,
                 "stats": summary_stats({k: {"x": 0.5, "y": 0.5} for k in arch})},
                {"epoch": 2, "arch": True, "argmax": arch, "probabilities": probs, "stats": summary_stats(probs)}]
        (tmp_path / name).mkdir()
        (tmp_path / name / "search_result.json").write_text(json.dumps(
            {"epoch": 2, "epochs": 2, "history": hist, "architecture": arch, "cost": {"cpu_minutes": 1.5},
             "convergence": {"argmax_last_changed": 2, "light_ops": ["y"]}}))
        return str(tmp_path / name)

    a, b = run("a", {"s1": "x", "s2": "y"}), run("b", {"s1": "x", "s2": "x"})
    assert main([a, b]) == 0
    out = capsys.readouterr().out
    assert "| 1 | warm-up | 1.000 | 0.500–0.500 | 0.000 | – | 0/2 |" in out
    # entropy of (0.7, 0.3) / log 2 = 0.881; one slot changed its argmax; one light op (y) chosen
    assert "| 2 | yes | 0.881 | 0.700–0.700 | 0.200 | 1 | 1/2 |" in out
    assert "agreement: 1 of 2 slots (differ: s2)" in out
    assert main([str(tmp_path / "none")]) == 2 and "does not exist" in capsys.readouterr().err
