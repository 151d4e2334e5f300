"""Settings of search, evaluate and warm start are checked when the config is loaded, with the same checks (and so the
same messages) as retrain's; the entry points answer a bad one with one line, exit code 2 and no run folder."""
from __future__ import annotations

import pytest

from strategies import search as search_entry
from strategies.search import SearchConfig
from trainer import evaluate as evaluate_entry
from trainer.config import ConfigError, load_config
from trainer.evaluate import EvaluateConfig
from trainer.module import RetrainConfig
from trainer.warmstart import WarmStartConfig


def _error(cls, overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


@pytest.mark.parametrize("override, message", [
    ("lr=-1", "lr: expected a number > 0 (e.g. 5e-4), got -1.0"),
    ("arch_lr=-1", "arch_lr: expected a number >= 0"),
    ("weight_decay=-1", "weight_decay: expected a number >= 0, got -1.0"),
    ("grad_clip=-1", "grad_clip: expected null (off) or a number > 0, got -1.0"),
    ("epochs=0", "epochs: expected an integer >= 1, got 0"),
    ("max_train_batches=0", "max_train_batches: expected null (the whole split) or an integer >= 1, got 0"),
    ("w_arch=2", "w_arch: expected a weight in [0, 1], got 2.0"),
    ("space.channels=100000", "space.channels: expected at most max_channels=1024, got 100000; "
                              "set max_channels=100000"),
    ("space.channels=7", "space.channels: expected an even integer >= 2, got 7"),
    ("space.candidates=[dense_k3_d1,bogus_op]", "space.candidates: expected names in search_space.ops.OPS"),
    ("space.rules=[avg]", "space.rules: expected names among"),
    ("space.segmenter=b9", "space.segmenter: expected one of ['b0', 'b1', 'b2', 'b3', 'b4', 'b5'], got 'b9'"),
    ("space.steps=0", "space.steps: expected an integer >= 1"),
    ("attack.eps=2", "attack.eps: expected a budget in [0, 1] pixel units (8/255 = 0.0314), got 2.0"),
    ("data.batch_size=0", "data.batch_size: expected an integer >= 1, got 0"),
    ("data.crop=[0,40]", "data.crop: expected null or [height, width] with positive sizes, got [0, 40]"),
    ("data.layout=kitti", "data.layout: expected one of ['auto', 'msrs', 'mfnet', 'pairs'], got 'kitti'"),
    ("keep_checkpoints=-2", "keep_checkpoints: expected an integer >= -1"),
    ("nan_policy=ignore", "nan_policy: expected one of ['stop', 'skip'], got 'ignore'"),
    ("nan_max_skips=0", "nan_max_skips: expected an integer >= 1"),
])
def test_bad_search_setting_fails_at_load(override, message):
    assert message in _error(SearchConfig, [override], "configs/search.yaml")


def test_search_width_guard_can_be_raised():
    cfg = load_config(SearchConfig, "configs/search.yaml", ["space.channels=2048", "max_channels=2048"])
    assert cfg.space.channels == 2048


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size: expected an integer >= 1, got 0"),
    ("limit=-1", "limit: expected an integer >= 0, got -1"),
    ("steps=-2", "steps: expected an integer >= 0, got -2"),
    ("eps_sweep=[0, 300]", "eps_sweep: expected values in 0..255 (units of 1/255), got [300.0]"),
    ("resize=[8, 8]", "resize: expected [] or [H, W] with both >= 16, got [8, 8]"),
    ("threats=[nosuch]", "unknown threat model 'nosuch'"),
    ("per_modality=[a2rnet]", "per_modality: expected names among the evaluated threats ['paif', 'strong']"),
    ("masking.threat=a2rnet", "masking.threat: expected one of the evaluated threats"),
    ("masking.queries=0", "masking.queries: expected an integer >= 1, got 0"),
    ("masking.transfer_threat=nosuch", "masking.transfer_threat: unknown threat model 'nosuch'"),
    ("device=gpu7", "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu7'"),
    ("miou_convention=nan", "miou_convention: expected one of ('published', 'present'), got 'nan'"),
])
def test_bad_evaluate_setting_fails_at_load(override, message):
    assert message in _error(EvaluateConfig, [override])


@pytest.mark.parametrize("override, message", [
    ("seg.lr=-1", "seg.lr: expected a number > 0 (e.g. 5e-4), got -1.0"),
    ("fusion.lr=0", "fusion.lr: expected a number > 0"),
    ("channels=100000", "channels: expected at most max_channels=1024, got 100000"),
    ("fusion.crop=[0, 8]", "fusion.crop: expected null or [height, width] with positive sizes"),
])
def test_bad_warm_start_setting_fails_at_load(override, message):
    assert message in _error(WarmStartConfig, [override])


@pytest.mark.parametrize("cls, key, path", [(RetrainConfig, "optim.lr", None), (SearchConfig, "lr", "configs/search.yaml"),
                                            (WarmStartConfig, "seg.lr", None)])
def test_one_check_one_message_across_entry_points(cls, key, path):
    """The same shared check (trainer.config.check_lr) words a bad learning rate the same way everywhere."""
    assert f"{key}: expected a number > 0 (e.g. 5e-4), got -1.0" in _error(cls, [f"{key}=-1"], path)


@pytest.mark.parametrize("cls, override, path", [
    (RetrainConfig, "nan_policy=ignore", None), (SearchConfig, "nan_policy=ignore", "configs/search.yaml")])
def test_nan_policy_is_checked_by_the_shared_check(cls, override, path):
    assert "nan_policy: expected one of ['stop', 'skip'], got 'ignore'" in _error(cls, [override], path)


def test_search_entry_point_refuses_a_bad_setting_before_any_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "search"
    assert search_entry.main(["--config", "configs/search.yaml", "lr=-1", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lr: expected a number > 0" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_evaluate_entry_point_refuses_a_bad_setting_before_any_run_folder(tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_entry.main(["--checkpoint", "x.pt", "--data", "d", "--out", str(out), "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: expected an integer >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
