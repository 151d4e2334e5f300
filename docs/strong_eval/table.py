"""The issue-13 table from evaluation reports: per checkpoint, each attack of `strong` alone, `strong-v1`,
`strong-v2`, `strong`, the masking checks and the time.

    python docs/strong_eval/table.py NAME=NEW/report.json[,OLD/report.json] [NAME=...]

``NEW`` is a ``trainer/evaluate.py`` report (``strong`` is always added on labelled data). ``strong-v1`` and
``strong-v2`` are taken from it when it evaluated them (``--threat strong-v1 --threat strong-v2``), else from
``OLD``: a report of the same checkpoint and data made before ``strong`` was strengthened, whose ``strong`` was
today's ``strong-v2`` (recognised by its 25-step APGD members). Every attack is seeded, so the same checkpoint
gives the same numbers in either report. Prints a markdown table; mIoU in %.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _is_v2(threat: dict) -> bool:
    return any(name.startswith("apgd-") and name.endswith("-25") for name in threat.get("members", {})) and not any(
        name.endswith("-100") for name in threat.get("members", {}))


def older(name: str, new: dict, old: dict | None) -> tuple[dict, dict]:
    """(strong-v1, strong-v2) of a checkpoint: from the new report if it has them, else from the old one."""
    found = {}
    for key in ("strong-v1", "strong-v2"):
        for report in (new, old or {}):
            threats = report.get("threats", {})
            if key in threats:
                found[key] = threats[key]
                break
            if key == "strong-v2" and "strong" in threats and _is_v2(threats["strong"]):
                found[key] = threats["strong"]
                break
        else:
            raise SystemExit(f"{name}: no `{key}` in the report(s); evaluate with --threat {key} or give the "
                             f"report made before `strong` was strengthened")
    return found["strong-v1"], found["strong-v2"]


def rows(name: str, report: dict, old: dict | None = None) -> tuple[list[str], list[str]]:
    threats = report["threats"]
    strong = threats["strong"]
    v1, v2 = older(name, report, old)
    checks = ", ".join(f"{c['check']} {c['status']} ({c['fired_images']}/{c['images']})"
                       for c in (report.get("masking") or {}).get("checks", []))
    members = strong["members"]
    best_single = min(members.values())
    new = strong["segmentation"]["miou"]
    cells = [name, f"{100 * report['clean']['segmentation']['miou']:.1f}",
             *(f"{100 * members[k]:.1f}" for k in members),
             f"{100 * v1['segmentation']['miou']:.1f}", f"{100 * v2['segmentation']['miou']:.1f}",
             f"{100 * strong.get('white_box_miou', new):.1f}", f"{100 * new:.1f}",
             f"{100 * (new - v1['segmentation']['miou']):+.1f}", f"{100 * (new - v2['segmentation']['miou']):+.1f}",
             "yes" if strong.get("white_box_miou", new) <= best_single + 1e-12 else "NO",
             checks, f"{strong['seconds'] / 60:.1f}", f"{strong['cost']['forward']} + {strong['cost']['backward']}"]
    return ["| " + " | ".join(cells) + " |"], list(members)


def main(argv: list[str]) -> None:
    lines, header = [], None
    for arg in argv:
        name, _, paths = arg.partition("=")
        new_path, _, old_path = paths.partition(",")
        old = json.loads(Path(old_path).read_text()) if old_path else None
        out, members = rows(name, json.loads(Path(new_path).read_text()), old)
        header = header or members
        lines += out
    head = ["checkpoint", "clean", *header, "`strong-v1`", "`strong-v2`", "`strong` white-box",
            "`strong` (+ black-box/transfer)", "new − v1", "new − v2", "new ≤ every member",
            "masking checks (fired/images)", "new min", "new passes/img (fwd + bwd)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
