"""The issue-13 table from evaluation reports: per checkpoint, each attack of `strong` alone, `strong-v1`, `strong`,
the masking checks and the time.

    python docs/strong_eval/table.py NAME=runs/.../report.json [NAME=...]

Each report must come from ``trainer/evaluate.py --threat strong-v1`` (``strong`` is always added on labelled
data). Prints a markdown table; mIoU in %.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(name: str, report: dict) -> list[str]:
    threats = report["threats"]
    strong, v1 = threats["strong"], threats.get("strong-v1")
    if v1 is None:
        raise SystemExit(f"{name}: the report has no `strong-v1` (evaluate with --threat strong-v1)")
    checks = ", ".join(f"{c['check']} {c['status']} ({c['fired_images']}/{c['images']})"
                       for c in report.get("masking", {}).get("checks", []))
    members = strong["members"]
    best_single = min(members.values())
    cells = [name, f"{100 * report['clean']['segmentation']['miou']:.1f}",
             *(f"{100 * members[k]:.1f}" for k in members),
             f"{100 * v1['segmentation']['miou']:.1f}", f"{100 * strong['white_box_miou']:.1f}",
             f"{100 * strong['segmentation']['miou']:.1f}",
             f"{100 * (v1['segmentation']['miou'] - strong['segmentation']['miou']):+.1f}",
             "yes" if strong["white_box_miou"] <= best_single + 1e-12 else "NO",
             checks, f"{v1['seconds'] / 60:.1f}", f"{strong['seconds'] / 60:.1f}",
             f"{strong['cost']['forward']} + {strong['cost']['backward']}"]
    return ["| " + " | ".join(cells) + " |"], list(members)


def main(argv: list[str]) -> None:
    lines, header = [], None
    for arg in argv:
        name, _, path = arg.partition("=")
        out, members = rows(name, json.loads(Path(path).read_text()))
        header = header or members
        lines += out
    head = ["checkpoint", "clean", *header, "`strong-v1`", "`strong` white-box", "`strong` (+ black-box/transfer)",
            "v1 − new", "new ≤ every member", "masking checks (fired/images)", "v1 min", "new min",
            "new passes/img (fwd + bwd)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
