"""The data check before a run (trainer/datacheck.py): all bad files of all splits in one error, valid samples cached
by file size and modification time (a rerun reads nothing), a progress bar, and the opt-outs of every entry point."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Subset

from rgbt.dataset import RGBTDataset
from rgbt.io import DataError
from strategies import search as search_entry
from trainer import evaluate as evaluate_entry
from trainer import retrain
from trainer.datacheck import CACHE_ENV, cache_dir, check_datasets


@pytest.fixture
def data(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture
def reads(monkeypatch):
    """The names of the samples RGBTDataset.load_arrays decodes."""
    seen: list[str] = []
    original = RGBTDataset.load_arrays

    def load_arrays(self, index):
        seen.append(f"{self.split}/{self.names[index]}")
        return original(self, index)

    monkeypatch.setattr(RGBTDataset, "load_arrays", load_arrays)
    return seen


def _splits(root):
    return [RGBTDataset(root, "train"), RGBTDataset(root, "val")]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _label_12(path):
    arr = np.array(Image.open(path))
    arr[0, 0] = 12
    Image.fromarray(arr).save(path)


def test_a_rerun_on_unchanged_data_reads_nothing(data, tmp_path, reads):
    cache = tmp_path / "cache"
    check_datasets(_splits(data), progress=False, cache=cache)
    assert len(reads) == 8  # 6 train + 2 val samples decoded once
    reads.clear()
    check_datasets(_splits(data), progress=False, cache=cache)
    assert reads == []
    # a changed file (new modification time) is read again, alone
    ir = sorted((data / "train" / "ir").iterdir())[2]
    os.utime(ir, ns=(ir.stat().st_atime_ns, ir.stat().st_mtime_ns + 10**9))
    check_datasets(_splits(data), progress=False, cache=cache)
    assert reads == [f"train/{ir.stem}"]


def test_all_bad_files_are_listed_at_once_and_only_they_are_read_again(data, synthetic_root, tmp_path, reads):
    cache = tmp_path / "cache"
    ir = sorted((data / "train" / "ir").iterdir())[-1]
    label_train = sorted((data / "train" / "Segmentation_labels").iterdir())[0]
    label_val = sorted((data / "val" / "Segmentation_labels").iterdir())[1]
    _truncate(ir)
    _label_12(label_train)
    _label_12(label_val)
    with pytest.raises(DataError) as info:
        check_datasets(_splits(data), progress=False, cache=cache, opt_out="data.check=false skips it")
    text = str(info.value)
    assert f"{data} (split 'train'): 2 bad sample(s):" in text and f"{data} (split 'val'): 1 bad sample(s):" in text
    assert f"{ir}: unreadable or truncated image" in text
    for label in (label_train, label_val):
        assert f"{label}: expected label values in 0..8 or 255 (ignore), got [12]" in text
    assert text.endswith("fix or remove these files (data.check=false skips it)")
    reads.clear()
    with pytest.raises(DataError):
        check_datasets(_splits(data), progress=False, cache=cache)
    assert sorted(reads) == sorted([f"train/{ir.stem}", f"train/{label_train.stem}", f"val/{label_val.stem}"])
    # fixed (the untouched files of the session's dataset): those three are read once more and the check passes
    for path in (ir, label_train, label_val):
        shutil.copy(synthetic_root / path.relative_to(data), path)
    reads.clear()
    check_datasets(_splits(data), progress=False, cache=cache)
    assert len(reads) == 3


def test_a_subset_checks_only_its_samples(data, tmp_path, reads):
    _truncate(sorted((data / "train" / "ir").iterdir())[-1])
    train = RGBTDataset(data, "train")
    check_datasets([Subset(train, range(3))], progress=False, cache=tmp_path / "cache")
    assert reads == [f"train/{n}" for n in train.names[:3]]


def test_progress_bar_and_an_unwritable_cache(data, tmp_path, capsys, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check_datasets(_splits(data), progress=True, cache=blocker / "cache")  # cannot be written: the check still runs
    assert "data check data train" in capsys.readouterr().err  # the tqdm bar
    assert "could not write the cache" in caplog.text


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path / "data-check"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "paif" / "data-check"


# --------------------------------------------------------------------------------------------- entry points
def test_skip_data_check_flags(data, tmp_path, monkeypatch):
    cfg, *_ = retrain.resolve_inputs(retrain.parse_args(["--genotype", "paif", "--skip-data-check"]))
    assert cfg.data.check is False
    _, flags = evaluate_entry.parse_args(["--checkpoint", "c.pt", "--data", "d", "--skip-data-check"])
    assert flags["data_check"] is False
    seen = {}

    def run_search(cfg, run_dir, resume=None):
        seen["cfg"] = cfg
        return {"architecture": {}}

    monkeypatch.setattr(search_entry, "run_search", run_search)
    monkeypatch.setattr(search_entry, "setup_logging", lambda *a, **k: None)
    assert search_entry.main(["--config", "configs/search.yaml", f"run_dir={tmp_path / 'run'}",
                              "--skip-data-check"]) == 0
    assert seen["cfg"].data.check is False


def test_evaluate_checks_the_split_before_any_attack(data, tmp_path, capsys, monkeypatch):
    from trainer.checkpoint import init_checkpoint

    ckpt = init_checkpoint(tmp_path / "c.pt", "paif", channels=4)
    bad = sorted((data / "test" / "vi").iterdir())[-1]
    _truncate(bad)
    monkeypatch.setattr(evaluate_entry, "build_threats", lambda *a, **k: pytest.fail("the data check must run first"))
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "eval"), "--no-progress"]
    assert evaluate_entry.main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}: unreadable or truncated image" in err and "data_check=false or --skip-data-check" in err
    assert not (tmp_path / "eval").exists()  # created by this command, nothing but its config and log: removed
