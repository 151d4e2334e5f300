"""trainer.warmstart: max-rule images, data fingerprints, the cached pretrained segmenter and start checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rgbt.color import rgb_to_y
from trainer import warmstart
from trainer.config import load_config
from trainer.warmstart import WarmStartConfig, data_fingerprint, max_rule_rgb, warm_start


def test_max_rule_rgb_luminance_is_the_max() -> None:
    """On grey visible images (no chroma, so no clamping) the luminance of the result is max(IR, Y)."""
    torch.manual_seed(0)
    ir = torch.rand(2, 1, 9, 11)
    grey = torch.rand(2, 1, 9, 11)
    out = max_rule_rgb(ir, grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(rgb_to_y(out), torch.maximum(ir, grey), atol=1e-5, rtol=0)
    assert out.shape == (2, 3, 9, 11) and out.min() >= 0 and out.max() <= 1


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from rgbt.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ws") / "data"
    generate_dataset(root, n_train=4, n_val=2, n_test=2, size=(32, 48), seed=0)
    return root


def test_fingerprint_follows_the_bytes(tiny_data, tmp_path) -> None:
    from rgbt.dataset import RGBTDataset

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    assert data_fingerprint(RGBTDataset(tiny_data, "train")) == data_fingerprint(RGBTDataset(copy, "train"))
    ir = sorted((copy / "train" / "ir").glob("*.png"))[0]
    shutil.copy(sorted((copy / "train" / "ir").glob("*.png"))[1], ir)  # same name, other pixels
    assert data_fingerprint(RGBTDataset(tiny_data, "train")) != data_fingerprint(RGBTDataset(copy, "train"))


def _cfg(data, cache, **extra) -> WarmStartConfig:
    overrides = {"data": str(data), "cache": str(cache), "channels": 4, "seg.steps": 2, "seg.batch_size": 2,
                 "fusion.steps": 2, "fusion.batch_size": 2, "fusion.crop": [24, 32], "progress_bar": False,
                 **extra}
    return load_config(WarmStartConfig, None, overrides)


def test_warm_start_is_cached_and_loads(tiny_data, tmp_path, monkeypatch) -> None:
    from trainer.checkpoint import load_model

    torch.set_num_threads(1)
    assert warm_start(_cfg(tiny_data, tmp_path), compute=False) is None  # nothing cached: no fusion warm-up
    assert not list(tmp_path.glob("segformer-*")) and not list(tmp_path.glob("fusion-*"))  # and nothing computed
    info = warm_start(_cfg(tiny_data, tmp_path))
    assert warm_start(_cfg(tiny_data, tmp_path), compute=False) == info
    report = json.loads((tmp_path / info["segmenter_dir"].split("/")[-1] / "pretrain.json").read_text())
    assert set(report["val"]) >= {"miou", "miou_objects"} and len(report["loss_every_50"]) == 2
    model, meta = load_model(info["start"])
    assert meta["genotype"]["channels"] == 4 and model.fusion is not None

    # a second call with the same data and recipe reuses both stages
    def boom(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(warmstart, "pretrain_segmenter", boom)
    monkeypatch.setattr(warmstart, "warm_fusion", boom)
    assert warm_start(_cfg(tiny_data, tmp_path)) == info
    # another fusion recipe reuses the segmenter but makes a new start point
    monkeypatch.undo()
    monkeypatch.setattr(warmstart, "pretrain_segmenter", boom)
    other = warm_start(_cfg(tiny_data, tmp_path, **{"fusion.steps": 1}))
    assert other["segmenter_dir"] == info["segmenter_dir"] and other["start"] != info["start"]


def test_test_split_is_refused(tiny_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="must not see the test split"):
        _cfg(tiny_data, tmp_path, val_split="test")


def test_max_rule_warm_up_fits_the_max_rule_and_the_fusion_loss_target_does_not(tiny_data) -> None:
    """target=max_rule pulls the fused luminance towards max(IR, Y) (the segmenter's pretraining images); the
    reference-free fusion loss optimises something else, so after the same steps it stays further away."""
    from rgbt.dataset import RGBTDataset
    from trainer.checkpoint import resolve_genotype

    torch.set_num_threads(1)
    data = RGBTDataset(tiny_data, "train")
    item = data[0]
    ir, y = item["ir"][None], rgb_to_y(item["vis"][None])

    def gap(target: str, steps: int) -> float:
        cfg = load_config(WarmStartConfig, None, {"data": str(tiny_data), "channels": 4, "fusion.steps": steps,
                                                  "fusion.batch_size": 2, "fusion.crop": [24, 32],
                                                  "fusion.target": target, "fusion.lr": 3e-3,
                                                  "progress_bar": False})
        train = RGBTDataset(tiny_data, "train", crop=(24, 32), flip=True, seed=0)
        net, losses = warmstart.warm_fusion(cfg, resolve_genotype("paif", channels=4), train)
        assert len(losses) == steps
        with torch.no_grad():
            return float((net.eval()(ir, y) - torch.maximum(ir, y)).abs().mean())

    before, fitted, fusion = gap("max_rule", 0), gap("max_rule", 150), gap("fusion_loss", 150)
    assert fitted < 0.8 * before, (before, fitted)  # measured: 0.065 -> 0.047
    assert fusion > 2 * fitted, (fitted, fusion)  # measured: 0.18 (the fusion loss moves away from the max rule)


def test_unknown_fusion_target_is_refused(tiny_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="fusion.target: expected one of max_rule, fusion_loss"):
        _cfg(tiny_data, tmp_path, **{"fusion.target": "mean"})


def test_segmenter_only_pretrains_what_the_full_warm_start_then_reuses(tiny_data, tmp_path, monkeypatch, capsys) -> None:
    """--segmenter-only (the demo runs it beside the search) writes the segmenter only; the full warm start with the
    same data and seg.* recipe finds it cached and adds the start checkpoint."""
    torch.set_num_threads(1)
    args = ["--data", str(tiny_data), "--cache", str(tmp_path), "channels=4", "seg.steps=2", "seg.batch_size=2",
            "progress_bar=false"]
    assert warmstart.main([*args, "--segmenter-only"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["start"] is None and list(tmp_path.glob("start-*")) == []
    assert (tmp_path / printed["segmenter_dir"].split("/")[-1] / "config.json").is_file()

    def boom(*a, **k):
        raise AssertionError("the segmenter was pretrained again")

    monkeypatch.setattr(warmstart, "pretrain_segmenter", boom)
    assert warmstart.main([*args, "fusion.steps=1", "fusion.batch_size=2", "fusion.crop=[24,32]"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["segmenter_dir"] == printed["segmenter_dir"] and full["start"].endswith(".pt")


def test_segmenter_key_at_scale_1_is_the_key_of_caches_written_before_seg_scale(tiny_data, tmp_path) -> None:
    """seg.scale=1 (the default) leaves the cache key as it was computed before the setting existed (written out
    here: the seg.* recipe without ``scale``), so existing segformer-<hash>/ entries still hit; 2 and 4 are other
    entries."""
    cfg = _cfg(tiny_data, tmp_path)
    s = cfg.seg
    before = warmstart._key(warmstart.RECIPE_VERSION, "train-fp", cfg.segmenter, cfg.num_classes, cfg.seed,
                            {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "weight_decay": s.weight_decay,
                             "warmup_steps": s.warmup_steps}, "val-fp")
    assert s.scale == 1 and warmstart.segmenter_key(cfg, "train-fp", "val-fp") == before
    keys = {scale: warmstart.segmenter_key(_cfg(tiny_data, tmp_path, **{"seg.scale": scale}), "train-fp", "val-fp")
            for scale in (1, 2, 4)}
    assert keys[1] == before and len(set(keys.values())) == 3
    with pytest.raises(ValueError, match=r"seg.scale: expected one of 1, 2, 4 .*got 3"):
        _cfg(tiny_data, tmp_path, **{"seg.scale": 3})


def test_seg_scale_2_pretrains_and_starts_on_upsampled_images(tiny_data, tmp_path, monkeypatch) -> None:
    """seg.scale=2: pretraining and its held-out evaluation call the segmenter through pipeline.segment at scale 2 (it
    receives 32x48 images as 64x96), and the start checkpoint is a seg_scale=2 model."""
    import search_space.pipeline as pipeline
    from trainer.checkpoint import load_model

    torch.set_num_threads(1)
    seen: list[tuple[int, tuple[int, ...]]] = []
    original = pipeline.segment

    def recording(segmenter, x, seg_scale=1):
        hook = segmenter.register_forward_hook(lambda m, args, out: seen.append((seg_scale, tuple(args[0].shape))))
        try:
            return original(segmenter, x, seg_scale)
        finally:
            hook.remove()

    monkeypatch.setattr(pipeline, "segment", recording)
    info = warm_start(_cfg(tiny_data, tmp_path, **{"seg.scale": 2}))
    assert seen == [(2, (2, 3, 64, 96))] * 2 + [(2, (1, 3, 64, 96))] * 2  # 2 training steps, 2 held-out images
    report = json.loads((tmp_path / info["segmenter_dir"].split("/")[-1] / "pretrain.json").read_text())
    assert report["recipe"]["scale"] == 2
    model, meta = load_model(info["start"])
    assert model.seg_scale == 2 and meta["model"]["seg_scale"] == 2


def test_decoder_width_reaches_the_start_and_every_retraining_from_it(tiny_data, tmp_path) -> None:
    """seg.decoder_hidden_size: the pretrained segmenter's head has that width, the start checkpoint records it (so
    load_model rebuilds it), retrain.py builds its network from the start with it, and a checkpoint of that network
    records it again; the default width leaves the cache key unchanged, another width is another entry."""
    from search_space.segmenter import custom_head_width
    from trainer import retrain
    from trainer.checkpoint import load_model, resolve_genotype
    from trainer.module import RetrainConfig

    torch.set_num_threads(1)
    info = warm_start(_cfg(tiny_data, tmp_path, **{"seg.decoder_hidden_size": 16}))
    config = json.loads((tmp_path / info["segmenter_dir"].split("/")[-1] / "config.json").read_text())
    assert config["decoder_hidden_size"] == 16
    model, meta = load_model(info["start"])
    assert meta["segmenter"] == {"variant": "b0", "num_classes": 9, "decoder_hidden_size": 16}
    head = model.segmenter.model.decode_head
    assert head.linear_fuse.weight.shape[:2] == (16, 64)  # 4 stages x 16 channels in, 16 out

    cfg = load_config(RetrainConfig, None, ["channels=4", f"init_from={info['start']}"])
    net = retrain.build_network(cfg, resolve_genotype("paif", channels=4))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert custom_head_width(net.segmenter, "b0") == 16
    plain = load_config(RetrainConfig, None, ["channels=4"])  # no start: the variant's head, recorded as before
    assert custom_head_width(retrain.build_network(plain, resolve_genotype("paif", channels=4)).segmenter, "b0") is None

    default = warmstart.segmenter_key(_cfg(tiny_data, tmp_path), "fp", "val")
    assert warmstart.segmenter_key(_cfg(tiny_data, tmp_path, **{"seg.decoder_hidden_size": None}), "fp", "val") \
        == default != warmstart.segmenter_key(_cfg(tiny_data, tmp_path, **{"seg.decoder_hidden_size": 16}), "fp", "val")
    with pytest.raises(ValueError, match=r"seg.decoder_hidden_size: expected null or an integer >= 1, got 0"):
        _cfg(tiny_data, tmp_path, **{"seg.decoder_hidden_size": 0})


def test_fusion_only_fits_what_the_full_warm_start_then_reuses(tiny_data, tmp_path, monkeypatch, capsys) -> None:
    """--fusion-only (the demo runs it while the segmenter is still being pretrained) writes the fusion fit only; the
    full warm start finds it cached, and its start holds the same weights as a warm start computed in one go."""
    torch.set_num_threads(1)
    args = ["--data", str(tiny_data), "channels=4", "seg.steps=2", "seg.batch_size=2", "fusion.steps=3",
            "fusion.batch_size=2", "fusion.crop=[24,32]", "progress_bar=false"]
    split = tmp_path / "split"
    assert warmstart.main([*args, "--cache", str(split), "--fusion-only"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fusion"].startswith(str(split / "fusion-")) and printed["segmenter_done"] is False
    assert list(split.glob("start-*")) == [] and list(split.glob("segformer-*")) == []

    def boom(*a, **k):
        raise AssertionError("the fusion net was fitted again")

    monkeypatch.setattr(warmstart, "warm_fusion", boom)
    assert warmstart.main([*args, "--cache", str(split)]) == 0
    joined = json.loads(capsys.readouterr().out)
    start = joined["start"]
    assert joined["segmenter_dir"] == printed["segmenter_dir"]  # the folder --beside-segmenter waits for
    monkeypatch.undo()
    assert warmstart.main([*args, "--cache", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out)["start"]
    assert warmstart.start_weights_sha256(start) == warmstart.start_weights_sha256(whole)


def test_beside_segmenter_fits_on_one_thread_until_the_segmenter_is_cached(tiny_data, tmp_path, monkeypatch) -> None:
    """With beside_segmenter the fit runs on one torch thread while this recipe's segmenter is missing from the cache
    and on num_threads from the first check after it appears (every THREAD_CHECK_EVERY steps)."""
    cfg = _cfg(tiny_data, tmp_path, **{"fusion.steps": 25, "num_threads": 2})
    _, _, _, seg_key = warmstart._segmenter_data(cfg)
    done = tmp_path / f"segformer-{seg_key}" / "pretrain.json"
    seen: list[int] = []
    step = warmstart._step

    def spy(opt, loss, i, stage, lr_key):
        seen.append(torch.get_num_threads())
        if i == 4:  # the other process finishes its pretraining here
            done.parent.mkdir(parents=True)
            done.write_text("{}")
        return step(opt, loss, i, stage, lr_key)

    monkeypatch.setattr(warmstart, "_step", spy)
    try:
        out = warmstart.fusion_only(cfg, beside_segmenter=True)
    finally:
        torch.set_num_threads(1)
    assert seen == [1] * 10 + [2] * 15 and out["segmenter_done"] is True
    assert warmstart.THREAD_CHECK_EVERY == 10


def test_beside_segmenter_alone_fits_waits_for_the_other_process_and_writes_the_start(tiny_data, tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    """--beside-segmenter without --fusion-only (the demo's one stage-4 call): the fit, then a wait until the other
    process's segmenter is cached (never pretraining it here), then the start: the same weights as a warm start
    computed in one go; with no segmenter coming, a clear error after --segmenter-wait and no start written."""
    torch.set_num_threads(1)
    args = ["--data", str(tiny_data), "channels=4", "seg.steps=2", "seg.batch_size=2", "fusion.steps=3",
            "fusion.batch_size=2", "fusion.crop=[24,32]", "progress_bar=false"]
    whole = tmp_path / "whole"
    assert warmstart.main([*args, "--cache", str(whole)]) == 0
    expected = json.loads(capsys.readouterr().out)["start"]
    seg_dir = next(whole.glob("segformer-*"))

    beside = tmp_path / "beside"
    waits: list[float] = []

    def other_process_finishes(seconds: float) -> None:  # by the second poll the other process has written it
        waits.append(seconds)
        if len(waits) == 2:
            shutil.copytree(seg_dir, beside / seg_dir.name)

    monkeypatch.setattr(warmstart.time, "sleep", other_process_finishes)
    monkeypatch.setattr(warmstart, "pretrain_segmenter", lambda *a, **k: pytest.fail("pretrained here"))
    assert warmstart.main([*args, "--cache", str(beside), "--beside-segmenter"]) == 0
    start = json.loads(capsys.readouterr().out)["start"]
    assert len(waits) == 2 and start.startswith(str(beside / "start-"))
    assert warmstart.start_weights_sha256(start) == warmstart.start_weights_sha256(expected)

    alone = tmp_path / "alone"
    monkeypatch.undo()
    monkeypatch.setattr(warmstart.time, "sleep", lambda seconds: None)
    assert warmstart.main([*args, "--cache", str(alone), "--beside-segmenter", "--segmenter-wait", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "was not in the cache after 0.05 s" in err and "--segmenter-only" in err
    assert list(alone.glob("start-*")) == [] and list(alone.glob("segformer-*")) == []


@pytest.mark.parametrize("flags, message", [
    (["--beside-segmenter", "--segmenter-only"], "--beside-segmenter: expected without --segmenter-only"),
    (["--fusion-only", "--segmenter-only"], "expected at most one of them"),
    (["--beside-segmenter", "--segmenter-wait", "0"], "--segmenter-wait: expected a number of seconds > 0, got 0"),
])
def test_stage_flags_are_checked(tiny_data, tmp_path, capsys, flags, message) -> None:
    assert warmstart.main(["--data", str(tiny_data), "--cache", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_clip_grad_norm_scales_the_step_and_keeps_the_default_key(tiny_data, tmp_path) -> None:
    """seg.clip_grad_norm: the update is the one of the gradient scaled to that global norm (SGD, checked by hand);
    null (the default) leaves the cache key as before; bad values are refused by name."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    v = torch.nn.Parameter(torch.randn(3))
    before = (w.detach().clone(), v.detach().clone())
    loss = (w ** 2).sum() * 3 + (v ** 3).sum()
    grads = torch.autograd.grad(loss, (w, v), retain_graph=True)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 0.5
    warmstart._step(torch.optim.SGD([w, v], lr=0.1), loss, 0, "test", "lr", clip_grad_norm=0.5)
    for p, b, g in zip((w, v), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g * (0.5 / norm), atol=1e-6, rtol=0)

    default = warmstart.segmenter_key(_cfg(tiny_data, tmp_path), "fp", "val")
    assert warmstart.segmenter_key(_cfg(tiny_data, tmp_path, **{"seg.clip_grad_norm": None}), "fp", "val") == default
    assert warmstart.segmenter_key(_cfg(tiny_data, tmp_path, **{"seg.clip_grad_norm": 1.0}), "fp", "val") != default
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"seg.clip_grad_norm: expected null or a number > 0, got"):
            _cfg(tiny_data, tmp_path, **{"seg.clip_grad_norm": bad})
    with pytest.raises(ValueError, match=r"seg.clip_grad_norm: expected float \| None, got True"):
        _cfg(tiny_data, tmp_path, **{"seg.clip_grad_norm": True})
