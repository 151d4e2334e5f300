"""ONNX export round trip: one export per part, run by onnxruntime at several sizes and batch sizes on random and
real pairs, against the PyTorch model (its usual eager path, not the export path)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rgbt.dataset import RGBTDataset
from search_space.decompose import plain_ops, uses_plain_ops
from trainer.card import content_hash
from trainer.checkpoint import init_checkpoint, load_checkpoint, load_model, resolve_genotype, save_checkpoint
from trainer.export_onnx import export_onnx, main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
REAL_RGBT = REPO.parent / "shared" / "data" / "real_rgbt"

needs_real = pytest.mark.skipif(not REAL_RGBT.is_dir(), reason=f"real RGB-T pairs not found at {REAL_RGBT} "
                                "(expected ../shared/data/real_rgbt next to the clone)")
TOL = 1e-4  # fp32


def _lively_checkpoint(base: Path) -> Path:
    """A random tiny checkpoint whose fused image is not almost constant.

    Freshly initialised, the fusion head outputs (tanh(z) + 1) / 2 with |z| tiny: on a real pair the fused RGB has a
    standard deviation of ~0.02, and the segmenter's per-image standardisation multiplies fp32 rounding (1e-7) by
    1 / std, so the logits of any two correct implementations differ by ~1e-4. A trained net is not that flat; here
    the head's last conv is scaled by 30 (fused std ~0.1), which the real-pair test checks.
    """
    raw = init_checkpoint(base / "init.pt", channels=8, seed=0)
    model, meta = load_model(raw)
    with torch.no_grad():
        model.fusion.head.conv2.weight.mul_(30.0)
    return save_checkpoint(base / "rand.pt", model, resolve_genotype(meta["genotype"]), meta["segmenter"],
                           meta["train_cfg"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("onnx")
    ckpt = _lively_checkpoint(base)
    paths = {part: base / f"{part}.onnx" for part in ("full", "fusion")}
    for part, path in paths.items():
        export_onnx(ckpt, path, part=part)
    model, _ = load_model(ckpt)
    return ckpt, paths, model


def _session(path: Path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _compare(session, model, ir: torch.Tensor, vis: torch.Tensor) -> dict[str, float]:
    names = [o.name for o in session.get_outputs()]
    with torch.no_grad():
        ref = model(ir, vis)
    got = dict(zip(names, session.run(names, {"ir": ir.numpy(), "vis": vis.numpy()})))
    diffs = {"fused_rgb": float(np.abs(got["fused_rgb"] - ref.fused_rgb.numpy()).max())}
    if "logits" in got:
        assert got["logits"].shape == tuple(ref.logits.shape)
        diffs["logits"] = float(np.abs(got["logits"] - ref.logits.numpy()).max())
    assert got["fused_rgb"].shape == tuple(ref.fused_rgb.shape)
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("part", ["full", "fusion"])
def test_random_inputs_at_two_sizes_from_one_export(setup, part):
    _, paths, model = setup
    session = _session(paths[part])
    gen = torch.Generator().manual_seed(1)
    for b, h, w in ((1, 64, 96), (3, 45, 71)):  # a multiple of 32 and an odd size; batch 1 and 3
        ir, vis = torch.rand(b, 1, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
        diffs = _compare(session, model, ir, vis)
        assert set(diffs) == ({"fused_rgb", "logits"} if part == "full" else {"fused_rgb"})
        assert max(diffs.values()) <= TOL, (b, h, w, diffs)


@pytest.mark.slow
@needs_real
def test_real_pairs_of_two_sizes(setup):
    _, paths, model = setup
    session = _session(paths["full"])
    ds = RGBTDataset(REAL_RGBT, split=None)
    sizes = set()
    for name in ("RoadScene_SF_085", "RoadScene_FLIR_05064"):
        item = ds[ds.names.index(name)]
        sizes.add(tuple(item["ir"].shape[-2:]))
        with torch.no_grad():
            assert model.fuse(item["ir"][None], item["vis"][None])[1].std() > 0.05  # see _lively_checkpoint
        diffs = _compare(session, model, item["ir"][None], item["vis"][None])
        assert max(diffs.values()) <= TOL, (name, diffs)
    assert len(sizes) == 2


@pytest.mark.slow
def test_names_dynamic_axes_metadata_and_standard_ops(setup):
    ckpt, paths, _ = setup
    full = onnx.load(str(paths["full"]))
    assert [i.name for i in full.graph.input] == ["ir", "vis"]
    assert [o.name for o in full.graph.output] == ["fused_rgb", "logits"]
    for value in list(full.graph.input) + list(full.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert [dims[i].dim_param for i in (0, 2, 3)] == ["batch", "height", "width"], value.name
    assert full.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    assert full.graph.output[1].type.tensor_type.shape.dim[1].dim_value == 9
    props = {p.key: p.value for p in full.metadata_props}
    assert {"ir", "vis", "fused_rgb", "logits", "paif"} <= set(props)
    assert "range [0.0, 1.0]" in props["ir"] and "RGB" in props["vis"] and "unbounded" in props["logits"]
    info = json.loads(props["paif"])
    assert info["inputs"]["ir"]["range"] == [0.0, 1.0] and info["outputs"]["fused_rgb"]["range"] == [0.0, 1.0]
    assert info["content_hash"] == content_hash(load_checkpoint(ckpt)["state_dict"])
    assert info["classes"][1] == "car" and info["part"] == "full"
    # the decomposition went through plain torch ops: only standard ONNX operators, no PythonOp / ATen fallbacks
    assert {n.domain for n in full.graph.node} <= {"", "ai.onnx"}
    assert not {n.op_type for n in full.graph.node} & {"PythonOp", "ATen"}
    fusion = onnx.load(str(paths["fusion"]))
    assert [o.name for o in fusion.graph.output] == ["fused_rgb"]
    assert len(fusion.graph.node) < len(full.graph.node) / 2  # no segmenter in the fusion part
    assert {p.key for p in fusion.metadata_props} == {"ir", "vis", "fused_rgb", "paif"}


def test_plain_ops_context_is_explicit_and_nests():
    assert not uses_plain_ops()
    with plain_ops():
        with plain_ops():
            assert uses_plain_ops()
        assert uses_plain_ops()
    assert not uses_plain_ops()


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("this is not a checkpoint")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} is not a checkpoint") and "torch.save" in err
    assert not (tmp_path / "m.onnx").exists()


def test_seg_scale_2_exports_with_dynamic_sizes(tmp_path):
    """A seg_scale=2 checkpoint exports (the option travels through the checkpoint) and onnxruntime matches the
    rebuilt PyTorch model at a multiple of 16 and at an odd size (upsampling, padding and crop all dynamic)."""
    from search_space.pipeline import build_model

    rand = load_model(_lively_checkpoint(tmp_path))[0]
    m2 = build_model(rand.genotype, seg_scale=2)
    m2.load_state_dict(rand.state_dict())
    ckpt = save_checkpoint(tmp_path / "s2.pt", m2, rand.genotype, {"variant": "b0", "num_classes": 9}, {})
    export_onnx(ckpt, tmp_path / "s2.onnx", part="full")
    model = load_model(ckpt)[0]
    assert model.seg_scale == 2
    info = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "s2.onnx")).metadata_props}["paif"])
    assert info["model_options"]["seg_scale"] == 2
    session = _session(tmp_path / "s2.onnx")
    gen = torch.Generator().manual_seed(2)
    for b, h, w in ((1, 32, 48), (2, 45, 71)):
        ir, vis = torch.rand(b, 1, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
        diffs = _compare(session, model, ir, vis)
        assert max(diffs.values()) <= TOL, (b, h, w, diffs)
