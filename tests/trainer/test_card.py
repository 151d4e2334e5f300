"""Model cards in checkpoints: content hash, `info` (also for checkpoints without a card), recorded evaluations,
the safetensors export and loading it back."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.card import content_hash, evaluation_entry, full_card, render
from trainer.checkpoint import (
    SAFETENSORS_KEY, CheckpointError, info, init_checkpoint, load_checkpoint, load_model, main,
    record_evaluation,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("card") / "rand.pt", channels=8, seed=0)


def _copy(src, tmp_path, name="c.pt"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def _reference_hash(state_dict):
    """The documented hash, written out independently: name|dtype|shape| then the raw bytes, names sorted."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        a = state_dict[name].numpy()
        h.update(f"{name}|{state_dict[name].dtype}|{tuple(a.shape)}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def test_content_hash_matches_an_independent_computation_and_sees_one_changed_value(ckpt):
    sd = load_checkpoint(ckpt)["state_dict"]
    assert content_hash(sd) == _reference_hash(sd)
    assert content_hash(dict(reversed(list(sd.items())))) == content_hash(sd)  # order of the dict is irrelevant
    changed = dict(sd)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    changed[key] = sd[key].clone()
    changed[key].view(-1)[0] += 1e-3
    assert content_hash(changed) != content_hash(sd)


def test_new_checkpoint_card_and_info_text(ckpt, capsys):
    card = info(ckpt)
    stored = load_checkpoint(ckpt)["card"]
    assert stored["content_hash"] == card["content_hash"] and card["hash_ok"] is True
    assert card["training"]["mode"] == "init" and card["missing"] == []
    assert card["parameters"]["fusion"] == sum(v.numel() for k, v in load_checkpoint(ckpt)["state_dict"].items()
                                               if k.startswith("fusion.") and "running_" not in k
                                               and "num_batches" not in k)
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    for needle in ("content hash     sha256:", "(matches the weights)", "fusion genotype  ir: dense_k3_d1",
                   "SegFormer MiT-b0, 9 classes", "mode             init", "Library versions", "torch"):
        assert needle in text
    assert main(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["content_hash"] == card["content_hash"]


def test_old_checkpoint_without_card_still_loads_and_info_says_what_is_missing(ckpt, tmp_path, capsys):
    old = tmp_path / "old.pt"
    raw = torch.load(ckpt, weights_only=True)
    raw.pop("card")
    raw["train_cfg"] = {"mode": "at", "data": {"root": "data/synthetic", "train_split": "train"},
                        "attack": {"kind": "pgd", "steps": 3, "at_eps": 8 / 255}}
    torch.save(raw, old)
    model, _ = load_model(old)  # loads as before
    assert sum(p.numel() for p in model.fusion.parameters()) > 0
    card = info(old)
    assert card["hash_ok"] is None and card["card_version"] is None
    assert card["training"]["mode"] == "at" and "PGD-3 at eps 8/255" in card["training"]["summary"]
    assert card["data"] == {"root": "data/synthetic", "train_split": "train"}
    assert main(["info", str(old)]) == 0
    text = capsys.readouterr().out
    assert "not recorded     model card (the checkpoint was written before cards existed)" in text
    assert "(computed now; no hash was stored)" in text
    raw["train_cfg"] = {"note": "x"}
    torch.save(raw, old)
    card = info(old)
    assert card["training"] is None and "training mode and recipe" in " ".join(card["missing"])


def test_changed_weights_are_reported_as_not_matching_the_card(ckpt, tmp_path, capsys):
    raw = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][key] = raw["state_dict"][key] + 1.0
    torch.save(raw, tmp_path / "edited.pt")
    assert info(tmp_path / "edited.pt")["hash_ok"] is False
    main(["info", str(tmp_path / "edited.pt")])
    assert "DOES NOT MATCH the stored sha256:" in capsys.readouterr().out


def _report(labelled: bool) -> dict:
    seg = {"miou": 0.222, "miou_objects": 0.141}
    fusion = {"EN": 6.5, "SD": 30.0}
    threat = {"eps_255": 8.0, "segmentation": {"miou": 0.171, "miou_objects": 0.1}, "fused_psnr": 31.5}
    return {"created": "2025-01-01 10:00:00", "config": {"steps": 0, "resize": []}, "miou_convention": "published",
            "data": {"root": "data/x", "split": "test", "num_images": 16, "labelled": labelled},
            "clean": {"segmentation": seg if labelled else None, "fusion": fusion},
            "threats": {"paif" if labelled else "paif-fusion": threat}}


def test_record_evaluation_appends_keeps_weights_and_renders(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    before = load_checkpoint(path)
    record_evaluation(path, evaluation_entry(_report(True), "r1/report.json"))
    record_evaluation(path, evaluation_entry(_report(False)))
    after = load_checkpoint(path)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    evals = after["card"]["evaluations"]
    assert [e["labelled"] for e in evals] == [True, False]
    assert evals[0]["clean"]["miou"] == 0.222 and evals[0]["threats"]["paif"] == {"eps_255": 8.0, "miou": 0.171,
                                                                                    "miou_objects": 0.1}
    assert evals[1]["threats"]["paif-fusion"]["fused_psnr"] == 31.5
    text = render(full_card({**after, "path": str(path)}))
    assert "Evaluations (2)" in text and "clean mIoU 22.2 %; paif (eps 8/255) 17.1 %" in text
    assert "paif-fusion (eps 8/255) fused PSNR 31.5 dB" in text
    assert info(path)["hash_ok"] is True  # the hash covers the weights only


def test_record_evaluation_gives_an_old_checkpoint_a_card(ckpt, tmp_path):
    raw = torch.load(ckpt, weights_only=True)
    raw.pop("card")
    torch.save(raw, tmp_path / "old.pt")
    record_evaluation(tmp_path / "old.pt", evaluation_entry(_report(True)))
    card = load_checkpoint(tmp_path / "old.pt")["card"]
    assert len(card["evaluations"]) == 1 and card["content_hash"] == content_hash(raw["state_dict"])


def test_safetensors_export_round_trip(ckpt, tmp_path, capsys):
    from safetensors.torch import load_file, safe_open

    out = tmp_path / "model.safetensors"
    assert main(["export", str(ckpt), "--safetensors", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ref = load_checkpoint(ckpt)["state_dict"]
    got = load_file(str(out))  # readable without this project
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()[SAFETENSORS_KEY])
    assert meta["card"]["content_hash"] == content_hash(ref) and "state" not in meta
    # and it rebuilds the same model here
    a, _ = load_model(ckpt)
    b, _ = load_model(out)
    ir, vis = torch.rand(1, 1, 32, 40), torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(a(ir, vis).logits, b(ir, vis).logits)
    assert info(out)["hash_ok"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # atomic: no temporary file left


def test_foreign_or_broken_safetensors_are_refused_with_a_reason(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="metadata key 'paif'"):
        load_checkpoint(tmp_path / "bare.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "bare.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="recorded in .pt checkpoints only"):
        record_evaluation(tmp_path / "bare.safetensors", {})


def _pairs_folder(root, names=("a", "b")):
    rng = np.random.default_rng(0)
    for name in names:
        for sub, shape in (("vi", (32, 40, 3)), ("ir", (32, 40))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / sub / f"{name}.png")
    return root


@pytest.mark.slow
def test_evaluate_appends_its_run_to_the_card(ckpt, tmp_path, capsys):
    """trainer/evaluate.py on unlabelled pairs (label-free threat, 1 step) records itself in the checkpoint."""
    from trainer.evaluate import main as evaluate_main

    path = _copy(ckpt, tmp_path)
    data = _pairs_folder(tmp_path / "pairs")
    argv = ["--checkpoint", str(path), "--data", str(data), "--threat", "paif", "--steps", "1", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "eval"), "--eps-sweep", "per_modality=[]"]
    assert evaluate_main(argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    (entry,) = load_checkpoint(path)["card"]["evaluations"]
    assert entry["report"] == str(tmp_path / "eval" / "report.json") and entry["quick_check"] is True
    assert entry["images"] == 2 and entry["labelled"] is False
    assert entry["clean"]["fusion"] == pytest.approx(report["clean"]["fusion"])
    assert entry["threats"]["paif-fusion"]["fused_psnr"] == pytest.approx(report["threats"]["paif-fusion"]["fused_psnr"])
    capsys.readouterr()
    assert evaluate_main(argv[:-1] + ["per_modality=[]", "record_in_checkpoint=false"]) == 0
    assert len(load_checkpoint(path)["card"]["evaluations"]) == 1  # opted out: file untouched
