"""search_space.convert_reference: the published PAIF state-dict layout (reference TSV) converts strictly.

Independent references here: the TSV (keys, shapes, dtypes listed from the published model), transcriptions of
the published MiT block / SegFormer head / colour conversion / normalisation math, and transformers' own
4.x -> 5.x key renaming table for the older layout.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from search_space import convert_reference as cr
from rgbt.color import rgb_to_y
from search_space.genotype import GENOTYPES, build_fusion_net
from search_space.pipeline import build_model

TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "paif_published_state_dict.tsv"
if not TSV.is_file():  # the worktree may live elsewhere; the shared folder is a sibling of the checkouts
    TSV = Path("/work/shared/reference/paif_published_state_dict.tsv")
pytestmark = pytest.mark.skipif(not TSV.is_file(), reason=f"reference layout {TSV} not available")


def tsv_layout(section: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the ``## mit_b0`` or ``## mit_b3`` section of the reference TSV."""
    out, current = {}, None
    for line in TSV.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].split(":")[0]
        elif current == section and line.strip():
            key, shape, dtype = line.split("\t")
            dims = tuple(int(d) for d in re.findall(r"\d+", shape))
            out[key] = (dims, getattr(torch, dtype))
    return out


def random_published(section: str = "mit_b0", seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A published-layout state dict with random values (positive BN variances, integer counters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in tsv_layout(section).items():
        if device == "meta":
            sd[key] = torch.empty(shape, dtype=dtype, device="meta")
        elif not dtype.is_floating_point:
            sd[key] = torch.tensor(7, dtype=dtype).expand(shape).clone()
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 4
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def published_model(variant: str = "b0", device: str | None = None):
    with torch.device(device or "cpu"):
        return build_model(GENOTYPES["paif"], segmenter=variant, num_classes=9, decoder_hidden_size=256,
                           **cr.PUBLISHED_OPTIONS).eval()


def rules_for(variant: str, target) -> list[cr.Rule]:
    return cr.fusion_rules() + cr.segmenter_rules(cr._depths(variant), cr.segformer_layout(target))


@pytest.fixture(scope="module")
def b0() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(published random b0 state dict, our model with it converted and loaded strictly)."""
    published = random_published("mit_b0")
    model = published_model("b0")
    converted = cr.convert_state_dict(published, model.state_dict(), rules_for("b0", model.state_dict()))
    model.load_state_dict(converted, strict=True)
    return published, model


# ------------------------------------------------------------------------------------------------ layout
def test_b0_every_tensor_lands_unchanged(b0) -> None:
    published, model = b0
    ours = model.state_dict()
    rules = rules_for("b0", ours)
    assert {r.src for r in rules} | set(cr.DROPPED) == set(published)
    for rule in rules:
        parts = published[rule.src].chunk(len(rule.dst)) if len(rule.dst) > 1 else (published[rule.src],)
        for dst, part in zip(rule.dst, parts):
            assert torch.equal(ours[dst], part), (rule.src, dst)
    values = sum(t.numel() for t in ours.values()) + sum(published[k].numel() for k in cr.DROPPED)
    assert values == sum(t.numel() for t in published.values()) == 3_979_276
    assert sum(p.numel() for p in model.fusion.parameters()) == 259_872 - 1  # less the dead PReLU
    assert cr.detect_variant(published) == ("b0", 9, 256)


def test_named_spot_checks(b0) -> None:
    """A few mappings spelled out by hand (kv rows, c1..c4 order, stems and decomposition by modality)."""
    published, model = b0
    ours = model.state_dict()
    kv = published["denoise_net.encoder.block2.1.attn.kv.weight"]  # stage 2: C = 64
    blk = "segmenter.model.segformer.stages.1.blocks.1.attention"
    assert torch.equal(ours[f"{blk}.k_proj.weight"], kv[:64]) and torch.equal(ours[f"{blk}.v_proj.weight"], kv[64:])
    for s in range(4):
        assert torch.equal(ours[f"segmenter.model.decode_head.linear_projections.{s}.proj.weight"],
                           published[f"denoise_net.decoder.linear_c{s + 1}.proj.weight"])
    assert torch.equal(ours["fusion.stem_ir.conv.weight"], published["enhance_net.stem_1.0.weight"])
    assert torch.equal(ours["fusion.decomp_vis.reduce.weight"], published["enhance_net.decompation.conv1x1_hf.weight"])
    assert torch.equal(ours["fusion.head.act.weight"], published["enhance_net.stem_out.2.weight"])


def test_b3_key_coverage_by_shape() -> None:
    """MiT-b3 (the released checkpoints), on the meta device: every key and shape, no values allocated."""
    published = random_published("mit_b3", device="meta")
    assert cr.detect_variant(published) == ("b3", 9, 256)
    target = published_model("b3", device="meta").state_dict()
    converted = cr.convert_state_dict(published, target, rules_for("b3", target))
    assert list(converted) == list(target)
    assert all(converted[k].shape == target[k].shape and converted[k].dtype == target[k].dtype for k in target)
    values = sum(t.numel() for t in converted.values()) + sum(published[k].numel() for k in cr.DROPPED)
    assert values == sum(t.numel() for t in published.values()) == 44_865_388


# transformers' own 4.x -> 5.x SegFormer renaming (conversion_mapping.py), applied backwards
_V5_TO_V4 = [
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm", r"segformer.encoder.layer_norm.\1"),
    (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
    (r"attention\.v_proj", "attention.self.value"), (r"attention\.o_proj", "attention.output.dense"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"),
    (r"layernorm_before", "layer_norm_1"), (r"layernorm_after", "layer_norm_2"),
    (r"decode_head\.linear_projections", "decode_head.linear_c"),
]


def test_transformers4_layout_is_covered() -> None:
    target = published_model("b0", device="meta").state_dict()
    if cr.segformer_layout(target) != "transformers>=5":
        pytest.skip("installed transformers uses the 4.x names already")
    old = {}
    for key, value in target.items():
        for pattern, repl in _V5_TO_V4:
            key = re.sub(pattern, repl, key)
        old[key] = value
    assert cr.segformer_layout(old) == "transformers<5"
    converted = cr.convert_state_dict(random_published("mit_b0", device="meta"), old, rules_for("b0", old))
    assert set(converted) == set(old)


# ------------------------------------------------------------------------------------------------ input
def test_module_prefix_and_wrappers() -> None:
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    for wrapped in (sd, prefixed, {"state_dict": prefixed, "epoch": 3}, {"model": {"state_dict": prefixed}}):
        assert dict(cr.unwrap_state_dict(wrapped)) == sd
    with pytest.raises(cr.ConversionError, match="expected a state dict of tensors"):
        cr.unwrap_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(cr.ConversionError, match="both with and without"):
        cr.unwrap_state_dict({"a.weight": torch.ones(1), "module.a.weight": torch.ones(1)})


def _convert_b0(published):
    target = published_model("b0", device="meta").state_dict()
    return cr.convert_state_dict(published, target, rules_for("b0", target))


def test_missing_key_is_named() -> None:
    published = random_published("mit_b0", device="meta")
    del published["denoise_net.encoder.block2.1.attn.kv.weight"]
    with pytest.raises(cr.ConversionError,
                       match=r"missing key 'denoise_net\.encoder\.block2\.1\.attn\.kv\.weight' \(expected shape "
                             r"\(128, 64\)"):
        _convert_b0(published)


def test_extra_key_is_named_unless_ignored() -> None:
    published = random_published("mit_b0", device="meta")
    published["enhance_net._criterion.sobel"] = torch.empty(1, 1, 3, 3, device="meta")
    with pytest.raises(cr.ConversionError, match=r"unexpected key 'enhance_net\._criterion\.sobel'"):
        _convert_b0(published)
    target = published_model("b0", device="meta").state_dict()
    assert len(cr.convert_state_dict(published, target, rules_for("b0", target), ("enhance_net._criterion",))) \
        == len(target)


def test_wrong_shape_is_named() -> None:
    published = random_published("mit_b0", device="meta")
    published["enhance_net.stem_out.0.weight"] = torch.empty(16, 32, 5, 5, device="meta")
    with pytest.raises(cr.ConversionError, match=r"key 'enhance_net\.stem_out\.0\.weight': expected shape "
                                                 r"\(16, 32, 3, 3\) \(for fusion\.head\.conv1\.weight\), got "
                                                 r"\(16, 32, 5, 5\)"):
        _convert_b0(published)


def test_dropped_keys_are_optional() -> None:
    published = random_published("mit_b0", device="meta")
    for key in cr.DROPPED:
        del published[key]
    assert len(_convert_b0(published)) == 252


def test_unknown_encoder_is_refused() -> None:
    published = random_published("mit_b0", device="meta")
    published["denoise_net.encoder.patch_embed1.proj.weight"] = torch.empty(48, 3, 7, 7, device="meta")
    with pytest.raises(cr.ConversionError, match=r"got widths \[48, 64, 160, 256\]"):
        cr.detect_variant(published)


# ------------------------------------------------------------------------------------------------ numerics
def _ln(x: torch.Tensor, sd: dict, key: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _published_block(x: torch.Tensor, h: int, w: int, sd: dict, key: str, heads: int, sr: int) -> torch.Tensor:
    """The published MiT ``Block`` (norm1 → attention with q / kv / sr → proj; norm2 → Mix-FFN), from its math."""
    b, n, c = x.shape
    y = _ln(x, sd, f"{key}.norm1", 1e-6)
    q = F.linear(y, sd[f"{key}.attn.q.weight"], sd[f"{key}.attn.q.bias"]).reshape(b, n, heads, c // heads)
    q = q.permute(0, 2, 1, 3)
    if sr > 1:
        z = F.conv2d(y.permute(0, 2, 1).reshape(b, c, h, w), sd[f"{key}.attn.sr.weight"], sd[f"{key}.attn.sr.bias"],
                     stride=sr)
        y = _ln(z.reshape(b, c, -1).permute(0, 2, 1), sd, f"{key}.attn.norm", 1e-5)
    kv = F.linear(y, sd[f"{key}.attn.kv.weight"], sd[f"{key}.attn.kv.bias"])
    kv = kv.reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ kv[0].transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
    o = (attn @ kv[1]).transpose(1, 2).reshape(b, n, c)
    x = x + F.linear(o, sd[f"{key}.attn.proj.weight"], sd[f"{key}.attn.proj.bias"])
    y = F.linear(_ln(x, sd, f"{key}.norm2", 1e-6), sd[f"{key}.mlp.fc1.weight"], sd[f"{key}.mlp.fc1.bias"])
    hid = y.shape[-1]
    y = F.conv2d(y.transpose(1, 2).reshape(b, hid, h, w), sd[f"{key}.mlp.dwconv.dwconv.weight"],
                 sd[f"{key}.mlp.dwconv.dwconv.bias"], padding=1, groups=hid).flatten(2).transpose(1, 2)
    y = F.linear(F.gelu(y), sd[f"{key}.mlp.fc2.weight"], sd[f"{key}.mlp.fc2.bias"])
    return x + y


@pytest.mark.parametrize("stage", [1, 3])  # stage 2: 2 heads + sequence reduction 4; stage 4: 8 heads, none
def test_kv_split_reproduces_published_block(b0, stage: int) -> None:
    published, model = b0
    c, heads, sr = (32, 64, 160, 256)[stage], (1, 2, 5, 8)[stage], (8, 4, 2, 1)[stage]
    h, w = 8, 12
    x = torch.randn(2, h * w, c, generator=torch.Generator().manual_seed(stage))
    expected = _published_block(x, h, w, published, f"denoise_net.encoder.block{stage + 1}.0", heads, sr)
    block = model.segmenter.model.segformer.stages[stage].blocks[0]
    with torch.no_grad():
        got = block(x, h, w)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_reproduces_published_head(b0) -> None:
    """SegFormerHead math: linear_c1..4 per stage, upsample, concat (c4, c3, c2, c1), conv + BN + ReLU, pred."""
    published, model = b0
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, c, 16 // 2 ** i, 20 // 2 ** i, generator=g) for i, c in enumerate((32, 64, 160, 256))]
    d = "denoise_net.decoder"
    up = []
    for i, f in enumerate(feats):
        e = F.linear(f.flatten(2).transpose(1, 2), published[f"{d}.linear_c{i + 1}.proj.weight"],
                     published[f"{d}.linear_c{i + 1}.proj.bias"]).transpose(1, 2).reshape(2, -1, *f.shape[2:])
        up.append(F.interpolate(e, size=feats[0].shape[2:], mode="bilinear", align_corners=False))
    x = F.conv2d(torch.cat(up[::-1], 1), published[f"{d}.linear_fuse.0.weight"])
    x = F.batch_norm(x, published[f"{d}.linear_fuse.1.running_mean"], published[f"{d}.linear_fuse.1.running_var"],
                     published[f"{d}.linear_fuse.1.weight"], published[f"{d}.linear_fuse.1.bias"], False, 0.0, 1e-5)
    expected = F.conv2d(F.relu(x), published[f"{d}.linear_pred.weight"], published[f"{d}.linear_pred.bias"])
    with torch.no_grad():
        got = model.segmenter.model.decode_head(feats)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _published_pipeline_input(fusion: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Network_MM_Searched.forward up to the segmenter input: RGB2YCrCb, fusion, YCrCb2RGB, where-clamp,
    whole-batch min-max, ×255, per-channel ImageNet standardisation (channels Y, Cr, Cb as published)."""
    r, g, b = vis.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr_, cb = (r - y) * 0.713 + 0.5, (b - y) * 0.564 + 0.5
    fused = fusion(ir, y[:, None])
    ycrcb = torch.cat((fused, cr_[:, None], cb[:, None]), 1)
    flat = ycrcb.permute(0, 2, 3, 1).reshape(-1, 3) + torch.tensor([0.0, -0.5, -0.5])
    mat = torch.tensor([[1.0, 1.0, 1.0], [1.403, -0.714, 0.0], [0.0, -0.344, 1.773]])
    rgb = (flat @ mat).reshape(vis.shape[0], vis.shape[2], vis.shape[3], 3).permute(0, 3, 1, 2)
    rgb = torch.where(rgb > 1, torch.ones_like(rgb), rgb)
    rgb = torch.where(rgb < 0, torch.zeros_like(rgb), rgb)
    x = (rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    return torch.stack([(x[:, i] - mean[i]) / std[i] for i in range(3)], 1)


def test_published_forward_options_reproduce_the_published_pipeline(b0) -> None:
    """seg_norm / color / fusion_output 'published' on a batch of 2 equal a transcription of the published
    forward; per-image normalisation differs, and under the published one an image depends on its batch."""
    _, model = b0
    g = torch.Generator().manual_seed(2)
    ir, vis = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    vis[1] *= 0.3  # a dark second image: the batch statistics differ from each image's own
    with torch.no_grad():
        out = model(ir, vis)
        x = _published_pipeline_input(model.fusion, ir, vis)
        expected = F.interpolate(model.segmenter(x), size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)
        unit = build_fusion_net(GENOTYPES["paif"]).eval()  # ours: (tanh + 1) / 2
        unit.load_state_dict(model.fusion.state_dict())
        torch.testing.assert_close(out.fused_y, 2 * unit(ir, rgb_to_y(vis)) - 1, atol=1e-5, rtol=0)  # raw tanh
        alone = model(ir[1:], vis[1:]).logits
        assert (alone - out.logits[1:]).abs().max() > 1e-3
        per_image = build_model(GENOTYPES["paif"], segmenter="b0", decoder_hidden_size=256,
                                **dict(cr.PUBLISHED_OPTIONS, seg_norm="per_image")).eval()
        per_image.load_state_dict(model.state_dict())
        assert (per_image(ir, vis).logits - out.logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_a_checkpoint_that_load_model_reproduces(tmp_path, b0, capsys) -> None:
    from trainer.checkpoint import load_model

    published, model = b0
    src = tmp_path / "paif_published.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in published.items()}, "epoch": 10}, src)
    out = tmp_path / "converted.pt"
    assert cr.main([str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MiT-b0" in printed and "enhance_net.decompation.chain2" in printed and "dropped" in printed
    loaded, meta = load_model(out)
    assert meta["model"] == cr.PUBLISHED_OPTIONS
    assert meta["segmenter"] == {"variant": "b0", "num_classes": 9, "decoder_hidden_size": 256}
    assert meta["genotype"]["ir"] == list(GENOTYPES["paif"].ir)
    assert meta["train_cfg"]["dropped"] == sorted(cr.DROPPED)
    ir, vis = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ir, vis).logits, model(ir, vis).logits)


def test_cli_error_names_the_key(tmp_path, capsys) -> None:
    published = random_published("mit_b0")
    del published["enhance_net.spa.spatial.conv.weight"]
    src = tmp_path / "broken.pth"
    torch.save(published, src)
    assert cr.main([str(src), "--out", str(tmp_path / "x.pt")]) == 2
    assert "missing key 'enhance_net.spa.spatial.conv.weight'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
