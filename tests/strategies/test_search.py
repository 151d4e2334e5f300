"""The real search (FusionSpace + SegFormer + PGD) in-process, the CLI, resume, and the genotype export."""
from __future__ import annotations

import json

import pytest

from derive.export_genotype import main as export_main
from search_space.genotype import Genotype
from strategies import search as search_entry
from strategies.search import SearchConfig, run_search
from strategies.darts import nni_metric
from strategies.trial import parameters_to_overrides
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

TINY = [
    "data.crop=[32,40]", "data.batch_size=2", "space.channels=4",
    "space.candidates=[dense_k3_d1,dilconv_k3_d2,eca_k3]", "epochs=1", "max_train_batches=2",
    "log_every_n_steps=1", "threads=1", "progress_bar=false",
]


def tiny_config(root, *extra):
    return load_config(SearchConfig, "configs/search.yaml", [f"data.root={root}", *TINY, *extra])


def test_two_step_search_exports_a_valid_genotype(synthetic_root, tmp_path, capsys):
    cfg = tiny_config(synthetic_root)
    assert cfg.attack.name == "pgd" and cfg.attack.steps == 3  # the default attack is exercised
    result = run_search(cfg, tmp_path / "run")
    assert result["global_step"] == 4  # 2 DARTS iterations = 2 architecture + 2 weight steps
    labels = {"ir/op1", "ir/op2", "vis/op1", "vis/op2", "fused/op1", "fused/op2", "rule"}
    assert set(result["probabilities"]) == labels
    for dist in result["probabilities"].values():
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["arch_adv"] > 0 and result["metrics"]["weight_clean"] > 0
    # the selection metric: held-out (val: 2 scenes) adversarial loss, stored and reported as NNI's default
    sel = result["selection"]
    assert sel["metric"] == "heldout_adv_loss" and sel["mode"] == "min" and sel["images"] == 2
    assert sel["value"] > 0 and sel["clean_loss"] > 0 and sel["settings"]["eps"] == pytest.approx(8 / 255)
    assert json.loads((tmp_path / "run" / "search_result.json").read_text())["selection"] == sel
    assert nni_metric(result)["default"] == sel["value"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events))
    tb.Reload()
    assert {"prob/rule/add", "prob/ir/op1/eca_k3", "search/arch_loss"} <= set(tb.Tags()["scalars"])
    # search.py's own genotype equals the export's
    assert Genotype.from_json(tmp_path / "run" / "genotype.json").to_sample() == result["architecture"]
    out = tmp_path / "out.json"
    assert export_main(["--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    genotype = Genotype.from_json(out)
    genotype.validate()
    assert genotype.to_sample() == result["architecture"] and genotype.channels == 4
    assert (tmp_path / "out.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "ir/op1" in table and "*" in table


def test_cli_resume_continues_the_run(synthetic_root, tmp_path):
    run = tmp_path / "cli"
    args = ["--config", "configs/search.yaml", f"data.root={synthetic_root}", *TINY, "attack.name=fgsm",
            f"run_dir={run}", "max_train_batches=1"]
    assert search_entry.main(args) == 0
    first = json.loads((run / "search_result.json").read_text())
    assert first["epoch"] == 1 and first["complete"]
    assert (run / "config.yaml").is_file() and (run / "search.log").read_text()
    assert search_entry.main(["--resume", str(run), "epochs=2"]) == 0
    second = json.loads((run / "search_result.json").read_text())
    assert second["epoch"] == 2 and second["complete"] and second["global_step"] == 2 * first["global_step"]
    assert second["config"]["epochs"] == 2 and second["config"]["attack"]["name"] == "fgsm"


def test_unknown_config_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(SearchConfig, "configs/search.yaml", ["w_archh=1"])
    with pytest.raises(ConfigError, match="w_arch"):
        load_config(SearchConfig, "configs/search.yaml", ["w_arch=1.5"])


def test_trial_parameters_map_to_config_keys():
    overrides = parameters_to_overrides({"w": 0.2, "w_arch": 1, "eps": 0.01, "attack_steps": 2, "seed": 3, "lr": 0.1})
    cfg = load_config(SearchConfig, "configs/search.yaml", overrides)
    assert (cfg.w, cfg.w_arch, cfg.attack.eps, cfg.attack.steps, cfg.seed, cfg.lr) == (0.2, 1.0, 0.01, 2, 3, 0.1)


# ------------------------------------------------------------------ held-out part of the training split
def test_holdout_split_is_disjoint_deterministic_and_independent_of_listing_order():
    from strategies.search import holdout_split

    names = [f"{i:05d}D" for i in range(40)]
    weight, held = holdout_split(names, 0.25)
    assert set(weight).isdisjoint(held) and sorted(weight + held) == list(range(40))
    assert len(held) == 10  # round(0.25 · 40)
    assert holdout_split(names, 0.25) == (weight, held)  # deterministic
    rev = names[::-1]
    w_rev, h_rev = holdout_split(rev, 0.25)
    assert {rev[i] for i in h_rev} == {names[i] for i in held}  # by name, not by position
    # the hash rule, recomputed another way: the 10 names with the smallest sha256("salt:name")
    import hashlib

    smallest = sorted(names, key=lambda n: hashlib.sha256(f"paif-search-holdout:{n}".encode()).hexdigest())[:10]
    assert {names[i] for i in held} == set(smallest)
    assert holdout_split(names, 0.25, salt="other")[1] != held
    assert len(holdout_split(names[:2], 0.01)[1]) == 1 and len(holdout_split(names[:2], 0.99)[1]) == 1
    with pytest.raises(ValueError, match="at least 2 images"):
        holdout_split(names[:1], 0.5)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\), got 1.0"):
        holdout_split(names, 1.0)


def test_search_data_holds_out_part_of_the_training_split(synthetic_root):
    from rgbt.dataset import RGBTDataset
    from strategies.search import DataConfig, prepare_data

    cfg = DataConfig(root=str(synthetic_root), val_split="train", holdout_fraction=0.5, crop=None, batch_size=1)
    names = []
    for _ in range(2):  # twice: the same split every time
        train, held, labelled = prepare_data(cfg, seed=0)
        names.append(tuple({b for batch in loader for b in batch["name"]} for loader in (train, held)))
    (w_names, h_names), again = names
    assert again == (w_names, h_names) and labelled
    assert w_names.isdisjoint(h_names)
    assert w_names | h_names == set(RGBTDataset(synthetic_root, "train").names)  # 6 train scenes, 3 + 3
    assert len(h_names) == 3


@pytest.mark.parametrize("override", ["data.val_split=test", "data.val_split=test_night", "data.train_split=test"])
def test_search_refuses_to_select_on_a_test_split(override):
    with pytest.raises(ConfigError, match="expected a training or validation split, got 'test"):
        load_config(SearchConfig, "configs/search.yaml", [override])


def test_space_seg_scale_reaches_the_searched_model():
    """space.seg_scale=2: the supernet's FusionSegModel upsamples the segmenter input; a bad value fails at load."""
    from search_space.fusion_space import FusionSpace
    from strategies.darts import ResumableDARTS
    from strategies.search import build_search

    cfg = load_config(SearchConfig, "configs/search.yaml", [*TINY, "space.seg_scale=2"])
    space, _, wrap = build_search(cfg)
    assert isinstance(space, FusionSpace)
    assert wrap(ResumableDARTS().mutate_model(space)).seg_scale == 2
    assert load_config(SearchConfig, "configs/search.yaml", TINY).space.seg_scale == 1
    with pytest.raises(ConfigError, match=r"space.seg_scale: expected one of 1, 2, 4 .*got 3"):
        load_config(SearchConfig, "configs/search.yaml", ["space.seg_scale=3"])
