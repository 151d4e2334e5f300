"""Tests of trainer.checkpoint: round trip, weights_only loading and every error case."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from search_space.genotype import GENOTYPES
from search_space.pipeline import build_model
from trainer.checkpoint import (
    FORMAT_VERSION, CheckpointError, init_checkpoint, load_checkpoint, load_model, main, save_checkpoint,
)

SEG = {"variant": "b0", "num_classes": 9}




@dataclasses.dataclass
class _TrainCfg:
    lr: float = 1e-3
    crop: tuple[int, int] = (32, 40)
    name: str = "unit"


@pytest.fixture(scope="module")
def genotype():
    return dataclasses.replace(GENOTYPES["paif"], channels=8)


@pytest.fixture(scope="module")
def model(genotype):
    torch.manual_seed(0)
    return build_model(genotype, segmenter="b0", num_classes=9, pretrained=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, genotype):
    """A checkpoint with a training state (SGD momentum buffers after one step)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    params = list(model.fusion.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        p.grad = None
    state = {"epoch": 3, "step": 120, "best_miou": 0.25, "optimizer": opt.state_dict()}
    save_checkpoint(path, model, genotype, SEG, _TrainCfg(), state=state)
    return path, state


def _rewrite(src, dst, edit):
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_round_trip_weights_and_meta(saved, model, genotype):
    path, state = saved
    loaded, meta = load_model(path)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not loaded.training
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["genotype"] == genotype.to_dict()
    assert meta["segmenter"] == SEG
    assert meta["train_cfg"] == {"lr": 1e-3, "crop": [32, 40], "name": "unit"}
    assert meta["versions"]["torch"] == str(torch.__version__)
    assert meta["state"]["epoch"] == 3 and meta["state"]["step"] == 120 and meta["state"]["best_miou"] == 0.25
    opt_ref, opt_got = state["optimizer"], meta["state"]["optimizer"]
    assert opt_got["param_groups"][0]["momentum"] == 0.9
    for k, v in opt_ref["state"].items():
        assert torch.equal(opt_got["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert "state_dict" not in meta


def test_loaded_model_computes_the_same_output(saved, model):
    loaded, _ = load_model(saved[0])
    model.eval()
    ir, vis = torch.rand(1, 1, 32, 40), torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        a, b = model(ir, vis), loaded(ir, vis)
    assert torch.allclose(a.logits, b.logits) and torch.allclose(a.fused_y, b.fused_y)


def test_plain_torch_load_with_weights_only(saved):
    ckpt = torch.load(saved[0], weights_only=True)
    assert ckpt["format"] == "paif-checkpoint"
    assert isinstance(ckpt["genotype"]["ir"], list)
    assert load_checkpoint(saved[0])["state"]["epoch"] == 3


def test_atomic_save_leaves_no_temporary_file(saved):
    assert [p.name for p in saved[0].parent.iterdir()] == ["model.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist: expected a \.pt file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_torch_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt is not a checkpoint: expected a \.pt file written by "
                                              r"save_checkpoint, got 24 bytes that are not a torch\.save file"):
        load_checkpoint(bad)


def test_truncated_file(tmp_path, saved):
    data = saved[0].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(cut)


def test_other_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"format": "paif-checkpoint", "cfg": _TrainCfg()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors and plain types"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], {"conv.weight": torch.zeros(1)}])
def test_not_a_paif_checkpoint(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="expected a PAIF checkpoint"):
        load_checkpoint(path)


def test_wrong_format_version(tmp_path, saved):
    path = _rewrite(saved[0], tmp_path / "v99.pt", lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match=f"expected format version {FORMAT_VERSION}, got 99"):
        load_checkpoint(path)


def test_missing_keys(tmp_path, saved):
    path = _rewrite(saved[0], tmp_path / "nogeno.pt", lambda c: c.pop("genotype"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['genotype'\]"):
        load_checkpoint(path)


def test_invalid_genotype(tmp_path, saved):
    path = _rewrite(saved[0], tmp_path / "badgeno.pt", lambda c: c["genotype"].update(rule="no_such_rule"))
    with pytest.raises(CheckpointError, match="invalid genotype"):
        load_model(path)


def test_weights_not_matching_genotype_name_the_keys(tmp_path, saved):
    # same file, but the genotype claims 16 channels: every fusion conv has the wrong shape
    path = _rewrite(saved[0], tmp_path / "c16.pt", lambda c: c["genotype"].update(channels=16))
    with pytest.raises(CheckpointError, match=r"weights do not match.*shape mismatch: fusion\.\S+ \(model \(16"):
        load_model(path)


def test_missing_and_unexpected_weights_are_named(tmp_path, saved):
    sd_keys = list(torch.load(saved[0], weights_only=True)["state_dict"])
    gone = sd_keys[0]

    def edit(c):
        c["state_dict"].pop(gone)
        c["state_dict"]["extra.weight"] = torch.zeros(1)

    path = _rewrite(saved[0], tmp_path / "keys.pt", edit)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert f"missing in checkpoint: {gone}" in msg and "not in model: extra.weight" in msg


def test_save_refuses_objects_that_weights_only_cannot_load(tmp_path, model, genotype):
    with pytest.raises(CheckpointError, match=r"state\.obj: expected tensors or plain Python types .*got object"):
        save_checkpoint(tmp_path / "x.pt", model, genotype, SEG, {}, state={"obj": object()})
    with pytest.raises(CheckpointError, match="expected keys 'variant' and 'num_classes'"):
        save_checkpoint(tmp_path / "x.pt", model, genotype, {"variant": "b0"}, {})
    assert not (tmp_path / "x.pt").exists()


def test_cli_init_and_info(tmp_path, capsys):
    out = tmp_path / "rand.pt"
    assert main(["--init", "--genotype", "paif", "--channels", "8", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["genotype"]["channels"] == 8 and first["segmenter"] == SEG
    assert main(["--info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == first["tensors"]
    assert main(["--info", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err  # errors go to stderr (trainer.errors.entry_point)


def test_init_checkpoint_is_seeded(tmp_path):
    a = load_checkpoint(init_checkpoint(tmp_path / "a.pt", channels=8, seed=1))["state_dict"]
    b = load_checkpoint(init_checkpoint(tmp_path / "b.pt", channels=8, seed=1))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_options_are_recorded_and_rebuilt(tmp_path, model, genotype):
    """``model`` options (seg_norm, color, mit_norm_eps) round-trip; a file without them loads with defaults."""
    from search_space.pipeline import MODEL_OPTIONS

    pub = build_model(genotype, segmenter="b0", seg_norm="published", color="published", mit_norm_eps=1e-6)
    pub.load_state_dict(model.state_dict())
    path = save_checkpoint(tmp_path / "pub.pt", pub, genotype, SEG, {})
    assert torch.load(path, weights_only=True)["model"]["seg_norm"] == "published"
    loaded, meta = load_model(path)
    assert loaded.seg_norm == "published" and loaded.color == "published"
    assert meta["model"] == pub.build_options
    ir, vis = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ir, vis).logits, pub.eval()(ir, vis).logits)
    old = _rewrite(path, tmp_path / "old.pt", lambda c: c.pop("model"))
    assert load_model(old)[1]["model"] == MODEL_OPTIONS
    bad = _rewrite(path, tmp_path / "bad.pt", lambda c: c["model"].update(gamma=2))
    with pytest.raises(CheckpointError, match=r"unknown model option\(s\) \['gamma'\]"):
        load_model(bad)
    bad = _rewrite(path, tmp_path / "bad2.pt", lambda c: c["model"].update(seg_norm="batch"))
    with pytest.raises(CheckpointError, match="expected seg_norm"):
        load_model(bad)


def test_seg_scale_round_trips_and_old_files_load_at_scale_1(tmp_path, model, genotype):
    """A seg_scale=2 model rebuilt from its checkpoint (``load_model``: what evaluate, export_onnx and fuse use) has
    seg_scale 2 and the original's logits; a file written before seg_scale existed loads at 1."""
    m2 = build_model(genotype, segmenter="b0", seg_scale=2)
    m2.load_state_dict(model.state_dict())
    path = save_checkpoint(tmp_path / "s2.pt", m2, genotype, SEG, {})
    assert torch.load(path, weights_only=True)["model"]["seg_scale"] == 2
    loaded, meta = load_model(path)
    assert loaded.seg_scale == 2 and meta["model"]["seg_scale"] == 2
    ir, vis = torch.rand(1, 1, 32, 40), torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(loaded(ir, vis).logits, m2.eval()(ir, vis).logits)
    old = _rewrite(path, tmp_path / "old.pt", lambda c: c["model"].pop("seg_scale"))
    rebuilt, meta = load_model(old)
    assert rebuilt.seg_scale == 1 and meta["model"]["seg_scale"] == 1
    bad = _rewrite(path, tmp_path / "bad.pt", lambda c: c["model"].update(seg_scale=3))
    with pytest.raises(CheckpointError, match=r"bad.pt: cannot build the model .*seg_scale: expected one of 1, 2, 4"):
        load_model(bad)
