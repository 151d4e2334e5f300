"""Clean mIoU and fused-image quality of checkpoints on a held-out split, against the plain max rule.

    python scripts/clean_probe.py --data runs/experiment/data --split val CKPT [CKPT ...]

One line per checkpoint: clean mIoU (9 classes, published convention) and over the 8 object classes, the mean
absolute difference between the fused RGB image and the max-rule image ``max(IR, Y)`` (with the visible chroma:
the images ``trainer.warmstart`` pretrains the segmenter on), and SSIM / Qabf of the fused luminance next to those
of the max rule on the same images. No attack: a quick diagnostic for recipes (use the val split, never test, to
choose anything).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe(checkpoint: str, data: str, split: str, batch_size: int = 8) -> dict[str, float]:
    """``{"miou", "miou_objects", "gap_max_rule", "SSIM", "Qabf", "SSIM_max_rule", "Qabf_max_rule"}``."""
    import torch
    from torch.utils.data import DataLoader

    from rgbt.color import rgb_to_y
    from rgbt.dataset import RGBTDataset
    from trainer.checkpoint import load_model
    from trainer.experiment import max_rule_fusion_metrics
    from trainer.metrics import ConfusionMatrix, FusionMetrics
    from trainer.warmstart import max_rule_rgb

    model, _ = load_model(checkpoint)
    model.eval()
    cm, fused_m = ConfusionMatrix(), FusionMetrics()
    gap, n = 0.0, 0
    with torch.no_grad():
        for b in DataLoader(RGBTDataset(data, split, require_labels=True), batch_size=batch_size):
            out = model(b["ir"], b["vis"])
            cm.update(out.logits, b["label"])
            fused_m.update(out.fused_y, b["ir"], rgb_to_y(b["vis"]))
            gap += float((out.fused_rgb - max_rule_rgb(b["ir"], b["vis"])).abs().mean()) * len(b["ir"])
            n += len(b["ir"])
    seg, fused, ref = cm.compute(), fused_m.compute(), max_rule_fusion_metrics(Path(data), split)
    return {"miou": seg["miou"], "miou_objects": seg["miou_objects"], "gap_max_rule": gap / max(n, 1),
            "SSIM": fused["SSIM"], "Qabf": fused["Qabf"], "SSIM_max_rule": ref["SSIM"], "Qabf_max_rule": ref["Qabf"]}


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*is found to be not a nn.Module.*")  # NNI 3.0 on torch 2.13

    p = argparse.ArgumentParser(prog="python scripts/clean_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for ckpt in args.checkpoints:
        r = probe(ckpt, args.data, args.split)
        print(f"{ckpt}: {args.split} clean mIoU {100 * r['miou']:.1f} (objects {100 * r['miou_objects']:.1f}); "
              f"|fused - max rule| {r['gap_max_rule']:.4f}; SSIM {r['SSIM']:.3f} (max rule {r['SSIM_max_rule']:.3f}), "
              f"Qabf {r['Qabf']:.3f} (max rule {r['Qabf_max_rule']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
