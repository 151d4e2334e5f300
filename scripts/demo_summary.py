"""What a `make demo` run should show, from its own numbers: ``python scripts/demo_summary.py RUN_DIR``.

Writes ``RUN_DIR/summary.md`` (and prints it): the stage times against the 10-minute budget, clean and attacked
mIoU against the demo's 40 % clean target, the classes it finds and misses, its fused images' SSIM and Qabf against
the plain max rule ``max(IR, Y)`` on the same test images (``trainer.experiment.max_rule_fusion_metrics``), and
which pictures to open and what to look for in them. Every verdict is computed from the run's files (``stage_times.txt``, ``warmstart.json``, ``eval/report.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.experiment import max_rule_fusion_metrics  # noqa: E402

#: the demo's targets (issue "models that actually segment"): clean mIoU and wall time on a 2-core CPU
TARGET_CLEAN_MIOU = 0.40
TARGET_SECONDS = 600


def stage_times(path: Path) -> dict[str, int]:
    """``stage_times.txt`` (``name seconds s`` per line) as a dict; missing file: empty."""
    times: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                times[parts[0]] = int(parts[1])
    return times


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def summarize(run: Path) -> str:
    """The summary text of one demo run folder."""
    report = json.loads((run / "eval" / "report.json").read_text())
    seg = report["clean"]["segmentation"]
    fusion = report["clean"].get("fusion") or {}
    data, split, limit = Path(report["data"]["root"]), report["data"]["split"], report["data"]["num_images"]
    times = stage_times(run / "stage_times.txt")
    total = times.get("total", sum(v for k, v in times.items() if k != "total") or None)
    warm = json.loads((run / "warmstart.json").read_text()) if (run / "warmstart.json").is_file() else {}

    lines = ["# What this demo run shows", ""]
    verdict = "met" if total is not None and total <= TARGET_SECONDS else "NOT met"
    lines.append(f"* **Time**: {total if total is not None else 'n/a'} s in all "
                 f"({', '.join(f'{k} {v} s' for k, v in times.items() if k != 'total')}); "
                 f"target <= {TARGET_SECONDS} s on 2 cores: {verdict}.")
    clean = seg["miou"]
    verdict = "met" if clean >= TARGET_CLEAN_MIOU else "NOT met"
    lines.append(f"* **Clean mIoU** {_pct(clean)} (8 object classes {_pct(seg['miou_objects'])}) on "
                 f"{limit} {split} images; target >= {_pct(TARGET_CLEAN_MIOU)}: {verdict}. The segmenter "
                 f"alone, pretrained on max-rule images, held {_pct(warm.get('segmenter_val_miou'))} on the val "
                 "split; the AAT retraining trades some clean accuracy for robustness.")
    attacked = [f"`{name}` {_pct(t['segmentation']['miou'])}" for name, t in report.get("threats", {}).items()
                if isinstance((t.get("segmentation") or {}).get("miou"), float)]
    if attacked:
        lines.append(f"* **Under attack** (L∞ 8/255 on both images unless the name says otherwise): "
                     f"{', '.join(attacked)}. `strong` is the strongest threat model here; its number is the one "
                     "to quote as robustness.")
    iou = {k: v for k, v in seg["iou"].items() if k != "unlabeled" and v is not None and v == v}
    found = sorted((k for k, v in iou.items() if v >= 0.3), key=lambda k: -iou[k])
    missed = sorted(k for k, v in iou.items() if v < 0.1)
    found_text = ", ".join(f"{k} {100 * iou[k]:.0f}" for k in found) or "none"
    missed_text = f"{', '.join(missed)} (thin or rare classes need longer training)" if missed else "none"
    lines.append(f"* **Classes**: found (IoU >= 30 %): {found_text}; mostly missed (< 10 %): {missed_text}.")
    if fusion:
        ref = max_rule_fusion_metrics(data, split, limit)
        cmp = []
        for key in ("SSIM", "Qabf"):
            ok = fusion[key] >= ref[key]
            cmp.append(f"{key} {fusion[key]:.3f} vs {ref[key]:.3f} ({'at least' if ok else 'below'} the max rule)")
        lines.append("* **Fused images** against the plain max rule `max(IR, Y)` on the same images: "
                     f"{'; '.join(cmp)}.")
    grids = report.get("pictures", {}).get("grids", {})
    lines += ["", "## Where to look", ""]
    if "paif" in grids:
        lines.append(f"* `eval/{grids['paif']}`: per row infrared, visible, **fused**, prediction, ground truth. In "
                     "night scenes (names ending in N) people and cars should stand out bright in the fused image, "
                     "taken from the infrared camera, although the visible image is dark; in day scenes (D) the "
                     "colour cones come from the visible image. The prediction should outline cars and people.")
    if "strong" in grids:
        lines.append(f"* `eval/{grids['strong']}`: the same under `strong`; the last column shows where the attack "
                     "spent its budget. Attacked predictions lose the small objects first.")
    if report.get("pictures", {}).get("curves"):
        lines.append(f"* `eval/{report['pictures']['curves']}`: mIoU against the attack budget ε; it should fall "
                     "smoothly, not in a cliff at small ε.")
    lines.append("* `eval/report.md`: every number, per class, with the gradient-masking checks.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/demo_summary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a demo run folder (runs/demo/demo-<time>/)")
    args = p.parse_args(argv)
    if not (args.run / "eval" / "report.json").is_file():
        print(f"error: {args.run}: expected eval/report.json (a finished demo run)", file=sys.stderr)
        return 2
    text = summarize(args.run)
    (args.run / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
