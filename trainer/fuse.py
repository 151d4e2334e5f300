"""Fuse a folder of your own infrared–visible image pairs with a trained PAIF checkpoint.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023. The fused image is the checkpoint's fused luminance with the visible image's
chroma (``search_space.pipeline.FusionSegModel.fuse``), at the pair's own size (no crop, no resize).

Usage::

    python trainer/fuse.py --checkpoint CKPT --data DIR --out OUT            # MSRS, MFNet or flat vi/ + ir/ folder
    python trainer/fuse.py --checkpoint CKPT --ir IR_DIR --vis VIS_DIR --out OUT
    python trainer/fuse.py --checkpoint CKPT --data ../shared/data/real_rgbt --out fused --seg --device cuda --amp
    paif fuse ...                                                            # the same, as an installed command

``--data`` takes the layouts of ``rgbt.dataset``: ``<DIR>/<split>/{vi,ir}`` (MSRS, ``--split``, default test),
``<DIR>/images`` (MFNet, the ``--split`` list, or every image with ``--split all``) or a flat ``<DIR>/{vi,ir}``.
Pairs are matched by file name. Writes:

* ``OUT/<name>.png``: the fused RGB image, under the pair's own name;
* with ``--seg``: ``OUT/seg/<name>.png`` (class colours, MFNet palette) and ``OUT/overlay/<name>.png`` (those
  colours blended over the fused image, unlabelled pixels left as they are);
* ``OUT/fuse_summary.json``: checkpoint, settings, counts and every bad pair with its error.

Images of equal size are fused in batches (``--batch-size``); every file is written atomically (temporary file,
then rename), so an interrupted run leaves no half-written image, and a re-run skips the pairs whose outputs all
exist (``--overwrite`` redoes them). A bad pair (missing partner, unreadable or truncated file, sizes that differ,
a grey visible image, ...) stops the run with an error naming its files; ``--skip-bad`` reports it and goes on.
Exit codes: 0 done (also with pairs skipped by ``--skip-bad``), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # `python trainer/fuse.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rgbt.classes import colorize  # noqa: E402
from rgbt.dataset import DataError, list_pairs, match_pairs, read_sample  # noqa: E402
from rgbt.io import encode_png, image_size  # noqa: E402
from trainer.checkpoint import CheckpointError, load_model  # noqa: E402
from trainer.runs import atomic_write_bytes, atomic_write_text, setup_logging, tune_malloc  # noqa: E402

__all__ = ["FuseError", "Pair", "collect_pairs", "output_paths", "overlay", "fuse_folder", "main"]

log = logging.getLogger("trainer.fuse")

OVERLAY_ALPHA = 0.5
"""Weight of the class colour in the overlay (unlabelled pixels keep the fused image)."""
SUMMARY = "fuse_summary.json"


class FuseError(ValueError):
    """Bad input to the fuse command (a bad pair without ``--skip-bad``, bad arguments)."""


@dataclass
class Pair:
    """One image pair: its name (output file stem) and files (``{"vis", "ir"}`` or MFNet ``{"rgbt"}``)."""

    name: str
    files: dict[str, Path]


# --------------------------------------------------------------------------------------------------- input
def collect_pairs(data: str | None, ir: str | None, vis: str | None, split: str | None
                  ) -> tuple[list[Pair], list[str]]:
    """The pairs to fuse and the unpaired files (one message each), from ``--data`` or ``--ir``/``--vis``."""
    if data and (ir or vis):
        raise FuseError("expected either --data DIR or --ir DIR --vis DIR, got both")
    if data:
        pairs, problems = list_pairs(data, split)
    elif ir and vis:
        folders = {"vis": Path(vis), "ir": Path(ir)}
        for role, folder in folders.items():
            if not folder.is_dir():
                raise FuseError(f"--{role} {folder}: expected a folder of images, got no such directory")
        pairs, problems = match_pairs(folders)
    else:
        raise FuseError("expected --data DIR (MSRS, MFNet or vi/ + ir/ folders) or both --ir DIR and --vis DIR")
    return [Pair(name, files) for name, files in pairs], problems


def output_paths(out: Path, name: str, seg: bool) -> list[Path]:
    """The files written for pair ``name``: the fused image, plus segmentation and overlay with ``seg``."""
    paths = [out / f"{name}.png"]
    if seg:
        paths += [out / "seg" / f"{name}.png", out / "overlay" / f"{name}.png"]
    return paths


def _size(pair: Pair) -> tuple[int, int]:
    """(H, W) from the image header (the full read happens when the pair's batch is fused)."""
    return image_size(pair.files.get("rgbt") or pair.files["vis"])


def _batches(pairs: list[Pair], batch_size: int, bad: dict[str, str]) -> Iterator[list[Pair]]:
    """Pairs grouped by image size (sizes in order, names in order within a size), ``batch_size`` at a time.

    Pairs whose header cannot be read are put into ``bad`` instead.
    """
    groups: dict[tuple[int, int], list[Pair]] = {}
    for pair in pairs:
        try:
            groups.setdefault(_size(pair), []).append(pair)
        except DataError as exc:
            bad[pair.name] = str(exc)
    for size in sorted(groups):
        group = groups[size]
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


# ------------------------------------------------------------------------------------------------- fusion
def overlay(fused: np.ndarray, pred: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Class colours blended over the fused image: ``(1 − α)·fused + α·colour`` where the class is not 0
    (unlabelled), the fused image elsewhere.

    Args:
        fused: (H, W, 3) uint8 RGB; pred: (H, W) class ids.
    Returns:
        (H, W, 3) uint8.
    """
    color = colorize(pred).astype(np.float32)
    out = fused.astype(np.float32)
    mask = pred != 0
    out[mask] = (1.0 - alpha) * out[mask] + alpha * color[mask]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_u8(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 (rounded)."""
    return rgb.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _read(batch: list[Pair], bad: dict[str, str]) -> tuple[list[Pair], torch.Tensor | None, torch.Tensor | None]:
    """Read the pairs of a batch; unreadable ones go to ``bad``. Returns (good pairs, ir (B,1,H,W), vis (B,3,H,W))."""
    good, irs, viss = [], [], []
    for pair in batch:
        try:
            arrays = read_sample(pair.files, pair.name)
        except DataError as exc:
            bad[pair.name] = str(exc)
            continue
        good.append(pair)
        irs.append(torch.from_numpy(arrays["ir"]).float().div_(255.0)[None])
        viss.append(torch.from_numpy(np.ascontiguousarray(arrays["vis"].transpose(2, 0, 1))).float().div_(255.0))
    if not good:
        return good, None, None
    return good, torch.stack(irs), torch.stack(viss)


@torch.no_grad()
def _fuse(model: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor, device: torch.device, amp: bool,
          seg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fused_rgb (B,3,H,W) in [0, 1], class ids (B,H,W) or None)."""
    ir, vis = ir.to(device), vis.to(device)
    with _autocast(device, amp):
        if seg:
            out = model(ir, vis)
            return out.fused_rgb.float(), out.logits.float().argmax(1)
        return model.fuse(ir, vis)[1].float(), None


def _write(out: Path, name: str, fused: np.ndarray, pred: np.ndarray | None) -> None:
    """The pair's outputs, each atomically; the fused image last, so it marks the pair as done."""
    if pred is not None:
        atomic_write_bytes(encode_png(colorize(pred)), out / "seg" / f"{name}.png")
        atomic_write_bytes(encode_png(overlay(fused, pred)), out / "overlay" / f"{name}.png")
    atomic_write_bytes(encode_png(fused), out / f"{name}.png")


def fuse_folder(checkpoint: str | Path, out: str | Path, data: str | None = None, ir: str | None = None,
                vis: str | None = None, split: str | None = "test", seg: bool = False, batch_size: int = 4,
                device: str = "auto", amp: bool = False, skip_bad: bool = False, overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Fuse every pair of a folder into ``out`` (see the module docstring); returns the summary it writes.

    Raises:
        FuseError: bad arguments, or a bad pair without ``skip_bad`` (the message names its files).
        CheckpointError, DataError: an unreadable checkpoint or dataset folder.
    """
    from trainer.evaluate import resolve_device

    if batch_size < 1:
        raise FuseError(f"--batch-size: expected >= 1, got {batch_size}")
    t0 = time.time()
    out = Path(out)
    pairs, unpaired = collect_pairs(data, ir, vis, split)
    if unpaired and not skip_bad:
        more = f" (and {len(unpaired) - 5} more)" if len(unpaired) > 5 else ""
        raise FuseError("unpaired files: " + "; ".join(unpaired[:5]) + more
                        + "; add the partners, or pass --skip-bad to fuse the complete pairs only")
    if not pairs:
        raise FuseError(f"no complete pair to fuse in {data or (ir, vis)}")
    todo = [p for p in pairs if overwrite or not all(q.is_file() for q in output_paths(out, p.name, seg))]
    log.info("%d pairs: %d to fuse, %d already written (in %s)", len(pairs), len(todo), len(pairs) - len(todo), out)
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, map_location=dev) if todo else (None, load_checkpoint_meta(checkpoint))
    if model is not None:
        model.requires_grad_(False)
    if seg and ((meta.get("card") or {}).get("training") or {}).get("mode") in ("fusion", "init"):
        log.warning("%s: its segmenter was never trained (training mode %r); the --seg output is not meaningful",
                    checkpoint, meta["card"]["training"]["mode"])
    bad: dict[str, str] = {}
    written: list[str] = []
    bar = tqdm(total=len(todo), desc="fuse", unit="pair", disable=not progress, file=sys.stderr)
    for batch in _batches(todo, batch_size, bad):
        _stop_if_bad(bad, skip_bad)
        good, ir_t, vis_t = _read(batch, bad)
        _stop_if_bad(bad, skip_bad)
        if good:
            fused, pred = _fuse(model, ir_t, vis_t, dev, amp, seg)
            for i, pair in enumerate(good):
                _write(out, pair.name, _to_u8(fused[i]), None if pred is None else pred[i].cpu().numpy())
                written.append(pair.name)
        bar.update(len(batch))
    _stop_if_bad(bad, skip_bad)
    bar.close()
    problems = [*unpaired, *(f"{name}: {msg}" for name, msg in sorted(bad.items()))]
    for msg in problems:
        log.warning("skipped bad pair: %s", msg)
    summary = {"checkpoint": str(checkpoint), "content_hash": (meta.get("card") or {}).get("content_hash"),
               "input": data or {"ir": ir, "vis": vis}, "split": split if data else None, "out": str(out),
               "pairs": len(pairs), "fused": len(written), "already_written": len(pairs) - len(todo),
               "bad": problems, "seg": seg, "device": str(dev), "amp": amp, "batch_size": batch_size,
               "seconds": round(time.time() - t0, 2)}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / SUMMARY)
    return summary


def load_checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata without building the model (nothing left to fuse)."""
    from trainer.checkpoint import load_checkpoint

    return {k: v for k, v in load_checkpoint(checkpoint).items() if k != "state_dict"}


def _stop_if_bad(bad: dict[str, str], skip_bad: bool) -> None:
    if bad and not skip_bad:
        name, msg = next(iter(bad.items()))
        raise FuseError(f"bad pair {name!r}: {msg}; fix or remove it, or pass --skip-bad to fuse the other pairs "
                        "(pairs fused so far are kept; a re-run skips them)")


# ------------------------------------------------------------------------------------------------ command
def build_parser(prog: str = "python trainer/fuse.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Usage::" + __doc__.split("Usage::")[1].split("``--data``")[0])
    p.add_argument("--checkpoint", required=True, help="PAIF checkpoint (.pt) or its .safetensors export")
    p.add_argument("--data", help="dataset folder: MSRS <DIR>/<split>/{vi,ir}, MFNet <DIR>/images, or <DIR>/{vi,ir}")
    p.add_argument("--ir", help="folder of infrared images (with --vis, instead of --data)")
    p.add_argument("--vis", help="folder of visible images (with --ir)")
    p.add_argument("--split", default="test", help="split of an MSRS/MFNet folder (default test; 'all': every "
                                                   "MFNet image); ignored for a flat vi/ + ir/ folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seg", action="store_true", help="also write the colour-coded segmentation and an overlay")
    p.add_argument("--batch-size", type=int, default=4, help="pairs of equal size fused together (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16; fp16 on GPUs without bf16)")
    p.add_argument("--skip-bad", action="store_true", help="report bad pairs and go on instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="fuse pairs whose outputs exist again")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python trainer/fuse.py") -> int:
    """Entry point; returns the exit code (0 done, 2 bad input)."""
    tune_malloc()
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    setup_logging(None)
    split = None if args.split.lower() in ("all", "none", "") else args.split
    try:
        summary = fuse_folder(args.checkpoint, args.out, args.data, args.ir, args.vis, split, args.seg,
                              args.batch_size, args.device, args.amp, args.skip_bad, args.overwrite, args.progress)
    except (FuseError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = f", {len(summary['bad'])} bad pairs skipped (see {Path(args.out) / SUMMARY})" if summary["bad"] else ""
    print(f"fused {summary['fused']} pairs into {args.out} ({summary['already_written']} already written{bad}) "
          f"in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
