"""Bad retrain settings fail when the config is loaded, before data or model are built ("expected …, got …")."""
from __future__ import annotations

import json

import pytest

from trainer import retrain
from trainer.config import ConfigError, load_config
from trainer.module import RetrainConfig


@pytest.mark.parametrize("override, message", [
    ("max_steps=-1", "max_steps: expected an integer >= 0"),
    ("epochs=-1", "epochs: expected an integer >= 1, got -1"),
    ("epochs=0", "epochs: expected an integer >= 1, got 0"),
    ("optim.lr=-1", "optim.lr: expected a number > 0 (e.g. 5e-4), got -1.0"),
    ("optim.lr=0", "optim.lr: expected a number > 0"),
    ("optim.lr=.nan", "optim.lr: expected a number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: expected a number >= 0, got -0.1"),
    ("attack.at_eps=-0.03", "attack.at_eps: expected a budget in [0, 1]"),
    ("val.attack_eps=-0.03", "val.attack_eps: expected a budget in [0, 1]"),
    ("monitor=val/bogus", "monitor: expected one of ['val/miou', 'val/miou_adv', 'val/pixel_acc', "
                          "'val/pixel_acc_adv'], got 'val/bogus'"),
    ("channels=100000", "channels: expected at most max_channels=1024, got 100000; set max_channels=100000"),
    ("channels=7", "channels: expected an even integer >= 2, got 7"),
    ("inputs=thermal", "inputs: expected one of ['both', 'ir', 'vis'], got 'thermal'"),
    ("seg_scale=3", "seg_scale: expected one of 1, 2, 4 (the segmenter's input upsampling factor), got 3"),
    ("seg_scale=0", "seg_scale: expected one of 1, 2, 4"),
])
def test_bad_setting_fails_at_load_time(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RetrainConfig, None, [override])
    assert message in str(info.value)


def test_seg_scale_reaches_the_model_and_the_card():
    from trainer.card import training_from_config
    from trainer.checkpoint import resolve_genotype
    from trainer.config import config_to_dict

    cfg = load_config(RetrainConfig, None, ["seg_scale=2", "channels=4"])
    model = retrain.build_network(cfg, resolve_genotype("paif", channels=4))
    assert model.seg_scale == 2 and model.build_options["seg_scale"] == 2
    assert training_from_config(config_to_dict(cfg))["recipe"]["seg_scale"] == 2
    assert load_config(RetrainConfig, None, []).seg_scale == 1


def test_max_channels_can_be_raised():
    assert load_config(RetrainConfig, None, ["channels=2048", "max_channels=2048"]).channels == 2048


def test_entry_point_reports_a_bad_setting_in_one_line_before_any_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert retrain.main(["--genotype", "paif", "optim.lr=-1", f"runs_root={runs}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.lr: expected" in err and len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_too_wide_genotype_file_fails_before_building(tmp_path, capsys):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"version": 1, "ir": ["dense_k3_d1", "dense_k3_d1"], "vis": ["dense_k3_d1",
                    "dense_k3_d1"], "fused": ["eca_k3", "eca_k3"], "rule": "spatial_attention", "channels": 100000}))
    assert retrain.main(["--genotype", str(path), f"runs_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "channels: expected at most max_channels=1024, got 100000" in err and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- data check
@pytest.fixture
def bad_root(synthetic_root, tmp_path):
    """The synthetic set with a truncated IR image (the last training sample) and a label value 12 (val)."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    ir = sorted((root / "train" / "ir").iterdir())[-1]
    ir.write_bytes(ir.read_bytes()[: ir.stat().st_size // 2])
    label = sorted((root / "val" / "Segmentation_labels").iterdir())[0]
    arr = np.array(Image.open(label))
    arr[0, 0] = 12
    Image.fromarray(arr).save(label)
    return root, ir, label


def test_bad_files_are_all_listed_before_step_1(bad_root, tmp_path, capsys, monkeypatch):
    root, ir, label = bad_root
    monkeypatch.setattr(retrain, "build_network", lambda *a: pytest.fail("the data check must run first"))
    runs = tmp_path / "runs"
    assert retrain.main(["--genotype", "paif", f"data.root={root}", f"runs_root={runs}"]) == 2
    err = capsys.readouterr().err
    assert ir.name in err and "train" in err and label.name in err and "12" in err and "data.check=false" in err
    assert not runs.exists()


def test_data_check_can_be_switched_off(bad_root, tmp_path, monkeypatch):
    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached

    monkeypatch.setattr(retrain, "build_network", reached)
    with pytest.raises(Reached):
        retrain.run(retrain.parse_args(["--genotype", "paif", f"data.root={bad_root[0]}", "data.check=false",
                                        f"runs_root={tmp_path / 'runs'}"]))
