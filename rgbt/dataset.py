"""RGB-T (visible + infrared) dataset in the MSRS, MFNet and unlabelled-pairs layouts.

MSRS: Tang et al., "PIAFusion", Information Fusion 2022. MFNet: Ha et al., IROS 2017.
Used by PAIF (Liu et al., "Paif: Perception-aware infrared-visible image fusion for attack-tolerant
semantic segmentation", ACM MM 2023) for fusion + segmentation training and evaluation.

Layouts (``layout=``):

* ``"msrs"``: ``<root>/<split>/{vi,ir,Segmentation_labels|label}/<name>.png``; also the capitalised
  ``Visible/Infrared/Label`` spelling. Without a label folder the dataset is unlabelled.
* ``"mfnet"``: ``<root>/images/<name>.png`` (4 channels: R, G, B, thermal), ``<root>/labels/<name>.png``,
  split lists ``<root>/{train,val,test,test_day,test_night}.txt`` (``split=None``: every image).
* ``"pairs"``: a flat ``<root>/{vi,ir}/<name>.png`` with no split folder and no labels (e.g. the real pairs
  in ``shared/data/real_rgbt``). A split other than ``None`` is ignored with a warning.
* ``"auto"`` (default): ``images/`` → mfnet; ``<root>/<split>/`` with vi+ir folders → msrs; ``<root>/{vi,ir}``
  → pairs; anything else is an error that lists what was looked for.

Files are paired **by file name stem** (never by sorted order); a file without its partner is an error.

Augmentation (training): ``crop=(h, w)`` takes a random crop, ``flip=True`` a random horizontal flip, both
applied identically to vis, ir and label. The randomness is a pure function of ``(seed, epoch, index)``
(``set_epoch`` advances it), so a sample is reproducible in any worker / process. A crop larger than the
image **pads** the image first (vis/ir with 0, label with 255 = ignore) and then crops; padding is at the
bottom / right so the original pixels keep their coordinates.

Validation: each ``__getitem__`` checks sizes and label values of the files it reads (cheap);
``check()`` reads every sample and reports all problems at once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from rgbt.classes import IGNORE_INDEX, NUM_CLASSES
from rgbt.io import DataError, MissingDataError, read_gray, read_label, read_rgb, read_rgbt

__all__ = ["RGBTDataset", "RGBTSubset", "DataError", "MissingDataError", "detect_layout", "match_pairs", "list_pairs",
           "read_sample",
           "VI_DIRS", "IR_DIRS", "LABEL_DIRS"]

logger = logging.getLogger(__name__)

VI_DIRS = ("vi", "Visible", "visible", "VI", "vis")
IR_DIRS = ("ir", "Infrared", "infrared", "IR")
LABEL_DIRS = ("Segmentation_labels", "label", "Label", "labels", "Labels")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("auto", "msrs", "mfnet", "pairs")
MFNET_SPLITS = ("train", "val", "test", "test_day", "test_night")


def _find_dir(parent: Path, candidates: tuple[str, ...]) -> Path | None:
    for name in candidates:
        if (parent / name).is_dir():
            return parent / name
    return None


def _has_pair_dirs(folder: Path) -> bool:
    return folder.is_dir() and _find_dir(folder, VI_DIRS) is not None and _find_dir(folder, IR_DIRS) is not None


def detect_layout(root: str | Path, split: str | None) -> str:
    """Guess the layout of ``root`` (see the module docstring); raises :class:`DataError` when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"{root}: expected a dataset folder, got no such directory; check the path")
    if (root / "images").is_dir():
        return "mfnet"
    if split is not None and _has_pair_dirs(root / split):
        return "msrs"
    if _has_pair_dirs(root):
        return "pairs"
    splits = sorted(p.name for p in root.iterdir() if _has_pair_dirs(p))
    hint = f"; splits found: {', '.join(splits)}" if splits else ""
    raise DataError(
        f"{root}: unknown dataset layout for split {split!r}: expected <root>/<split>/{{vi,ir}}/ (MSRS), "
        f"<root>/images/ + <root>/labels/ (MFNet) or <root>/{{vi,ir}}/ (unlabelled pairs), "
        f"got entries {sorted(p.name for p in root.iterdir())[:10]}{hint}"
    )


def _list_images(folder: Path) -> dict[str, Path]:
    """Map stem → path of the image files in ``folder``; duplicate stems (a.png + a.jpg) are an error."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem in out:
            raise DataError(f"{p}: two images share the name {p.stem!r} in {folder} ({out[p.stem].name}); keep one")
        out[p.stem] = p
    if not out:
        raise MissingDataError(f"{folder}: expected image files ({', '.join(IMAGE_EXTS)}), got an empty folder")
    return out


def match_pairs(folders: dict[str, Path]) -> tuple[list[tuple[str, dict[str, Path]]], list[str]]:
    """Pair the image files of ``folders`` (role -> folder) by file-name stem.

    Returns:
        ``(pairs, problems)``: ``[(name, {role: path})]`` sorted by name for the stems present in every folder,
        and one message per file whose partner is missing (``"<file>: missing partner <role> file <path>"``).
    Raises:
        MissingDataError / DataError: a folder is empty or holds two images with the same stem.
    """
    listings = {key: _list_images(folder) for key, folder in folders.items()}
    all_names = sorted(set().union(*(set(v) for v in listings.values())))
    pairs, problems = [], []
    for name in all_names:
        have = {k: listing[name] for k, listing in listings.items() if name in listing}
        if len(have) == len(listings):
            pairs.append((name, have))
            continue
        present = next(iter(have.values()))
        problems += [f"{present}: missing partner {key} file {folders[key] / present.name}"
                     for key in listings if key not in have]
    return pairs, problems


def _pair_up(folders: dict[str, Path]) -> list[tuple[str, dict[str, Path]]]:
    """Pair files across folders by stem; a stem missing from any folder is an error naming the file."""
    pairs, problems = match_pairs(folders)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError("unpaired files: " + "; ".join(problems[:5]) + more + "; add or remove the files")
    return pairs


def list_pairs(root: str | Path, split: str | None = None, layout: str = "auto"
               ) -> tuple[list[tuple[str, dict[str, Path]]], list[str]]:
    """The image pairs of a dataset folder, labels ignored, unpaired files reported instead of raised.

    Used where every good pair should be processed even if some files lack a partner (``trainer/fuse.py``).
    MSRS and flat pairs give ``{"vis": path, "ir": path}`` per name, MFNet ``{"rgbt": path}`` (``split=None``:
    every image of ``images/``).

    Returns:
        ``(pairs, problems)`` as :func:`match_pairs`.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    layout = detect_layout(root, split) if layout == "auto" else layout
    if layout == "mfnet":
        ds = RGBTDataset(root, split, layout="mfnet")
        return [(name, {"rgbt": files["rgbt"]}) for name, files in zip(ds.names, ds.samples)], []
    base = root / split if layout == "msrs" and split is not None else root
    vi, ir = _find_dir(base, VI_DIRS), _find_dir(base, IR_DIRS)
    if vi is None or ir is None:
        kind, names = ("visible", VI_DIRS) if vi is None else ("infrared", IR_DIRS)
        raise MissingDataError(f"{base}: expected the {kind} image folder (one of {', '.join(names)}), got none")
    return match_pairs({"vis": vi, "ir": ir})


def read_sample(files: dict[str, Path], name: str) -> dict[str, np.ndarray]:
    """Read and size-check the files of one sample (``{"vis", "ir"[, "label"]}`` or ``{"rgbt"[, "label"]}``).

    Returns:
        uint8 ``vis`` (H, W, 3), ``ir`` (H, W) and, when present, ``label`` (H, W) (values not range-checked).
    Raises:
        DataError: an unreadable / truncated / wrong-mode file, or files of different sizes (all named).
    """
    if "rgbt" in files:
        vis, ir = read_rgbt(files["rgbt"])
        sources = {"vis": files["rgbt"], "ir": files["rgbt"]}
    else:
        vis, ir = read_rgb(files["vis"]), read_gray(files["ir"])
        sources = {"vis": files["vis"], "ir": files["ir"]}
    out: dict[str, Any] = {"vis": vis, "ir": ir}
    if "label" in files:
        out["label"] = read_label(files["label"])
        sources["label"] = files["label"]
    shapes = {k: out[k].shape[:2] for k in out}
    if len(set(shapes.values())) != 1:
        sizes = ", ".join(f"{k} {sources[k]} is {h}x{w}" for k, (h, w) in shapes.items())
        raise DataError(f"size mismatch for sample {name!r}: {sizes} (HxW); "
                        "expected all files of a sample to have the same size")
    return out


class RGBTDataset(Dataset):
    """Paired visible / infrared images (+ optional labels) as float tensors.

    Args:
        root: dataset root folder.
        split: split folder / list name (``"train"``, ``"val"``, ``"test"``, ...); ``None`` for a flat pairs
            folder or all MFNet images.
        crop: ``None`` or (h, w) random-crop size (pads when the image is smaller, see module docstring).
        flip: random horizontal flip with probability 0.5.
        layout: ``"auto"``, ``"msrs"``, ``"mfnet"`` or ``"pairs"``.
        seed: base seed of the augmentation randomness.
        require_labels: raise if the dataset has no labels.

    Item: ``{"ir": (1, H, W) float32 in [0, 1], "vis": (3, H, W) float32 RGB in [0, 1],
    "label": (H, W) int64 in 0..8 or 255 (only when labelled), "name": str}``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        crop: tuple[int, int] | None = None,
        flip: bool = False,
        layout: str = "auto",
        seed: int = 0,
        require_labels: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.crop = self._check_crop(crop)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        if layout not in LAYOUTS:
            raise DataError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.layout = detect_layout(self.root, split) if layout == "auto" else layout
        if not self.root.is_dir():
            raise MissingDataError(f"{self.root}: expected a dataset folder, got no such directory")
        self.samples: list[dict[str, Path]]
        self.names: list[str]
        if self.layout == "mfnet":
            self._index_mfnet()
        else:
            self._index_folders()
        self.has_labels = "label" in self.samples[0]
        if require_labels and not self.has_labels:
            raise MissingDataError(
                f"{self.root}: expected labels (require_labels=True), got no label folder for split {split!r}; "
                f"add one of {LABEL_DIRS} (MSRS) or labels/ (MFNet)"
            )
        logger.info("%s split=%s layout=%s: %d samples, labels=%s", self.root, split, self.layout,
                    len(self.names), self.has_labels)

    # ----------------------------------------------------------------------------------------- indexing
    @staticmethod
    def _check_crop(crop: Any) -> tuple[int, int] | None:
        if crop is None:
            return None
        try:
            h, w = (int(c) for c in crop)
        except (TypeError, ValueError) as exc:
            raise DataError(f"crop: expected None or (height, width), got {crop!r}") from exc
        if h <= 0 or w <= 0:
            raise DataError(f"crop: expected positive (height, width), got {crop!r}")
        return h, w

    def _index_folders(self) -> None:
        if self.layout == "msrs":
            if self.split is None:
                raise DataError(f"{self.root}: the MSRS layout needs a split (e.g. split='train'), got split=None")
            base = self.root / self.split
            if not base.is_dir():
                raise MissingDataError(f"{base}: expected split folder {self.split!r}, got no such directory")
        else:
            if self.split is not None:
                logger.warning("%s has no split folders (flat vi/ir pairs): split=%r uses every pair",
                               self.root, self.split)
            base = self.root
        vi, ir = _find_dir(base, VI_DIRS), _find_dir(base, IR_DIRS)
        if vi is None or ir is None:
            kind, names = ("visible", VI_DIRS) if vi is None else ("infrared", IR_DIRS)
            raise MissingDataError(f"{base}: expected the {kind} image folder (one of {', '.join(names)}), got none")
        folders = {"vis": vi, "ir": ir}
        label = _find_dir(base, LABEL_DIRS) if self.layout == "msrs" else None
        if label is not None:
            folders["label"] = label
        pairs = _pair_up(folders)
        self.names = [name for name, _ in pairs]
        self.samples = [files for _, files in pairs]

    def _index_mfnet(self) -> None:
        images = self.root / "images"
        labels = self.root / "labels"
        if not images.is_dir():
            raise MissingDataError(f"{images}: expected the MFNet images/ folder, got no such directory")
        available = _list_images(images)
        if self.split is None:
            names = sorted(available)
        else:
            listing = self.root / f"{self.split}.txt"
            if not listing.is_file():
                found = sorted(p.name for p in self.root.glob("*.txt"))
                raise MissingDataError(f"{listing}: expected the MFNet split list for {self.split!r}, got no such "
                                       f"file (lists found: {found or 'none'})")
            names = [Path(line.strip()).stem for line in listing.read_text().splitlines() if line.strip()]
            if not names:
                raise MissingDataError(f"{listing}: expected one image name per line, got an empty list")
        has_labels = labels.is_dir()
        label_files = _list_images(labels) if has_labels else {}
        problems = []
        self.names, self.samples = [], []
        for name in names:
            if name not in available:
                problems.append(f"{images / (name + '.png')}: listed in {self.split}.txt but missing")
                continue
            sample = {"rgbt": available[name]}
            if has_labels:
                if name not in label_files:
                    problems.append(f"{available[name]}: missing partner label file {labels / (name + '.png')}")
                    continue
                sample["label"] = label_files[name]
            self.names.append(name)
            self.samples.append(sample)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DataError("unpaired files: " + "; ".join(problems[:5]) + more)

    # ----------------------------------------------------------------------------------------- loading
    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation randomness (call once per epoch, like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def load_arrays(self, index: int) -> dict[str, Any]:
        """Read and validate one sample without augmentation: uint8 ``vis`` (H,W,3), ``ir`` (H,W), ``label``."""
        files = self.samples[index]
        out = read_sample(files, self.names[index])
        if "label" in out:
            self._check_label(out["label"], files["label"])
        return out

    @staticmethod
    def _check_label(label: np.ndarray, path: Path) -> None:
        if label.max(initial=0) < NUM_CLASSES and label.min(initial=0) >= 0:
            return
        bad = ((label < 0) | (label >= NUM_CLASSES)) & (label != IGNORE_INDEX)
        if bad.any():
            values = sorted(np.unique(label[bad]).tolist())
            raise DataError(f"{path}: expected label values in 0..{NUM_CLASSES - 1} or {IGNORE_INDEX} (ignore), "
                            f"got {values[:8]} in {int(bad.sum())} pixels; fix the label map")

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _augment(self, arrays: dict[str, Any], index: int) -> dict[str, Any]:
        if self.crop is None and not self.flip:
            return arrays
        rng = self._rng(index)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = arrays["ir"].shape
            if ch > h or cw > w:
                arrays = _pad(arrays, max(ch, h), max(cw, w))
                h, w = arrays["ir"].shape
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            arrays = {k: v[y0:y0 + ch, x0:x0 + cw] for k, v in arrays.items()}
        if self.flip and rng.random() < 0.5:
            arrays = {k: v[:, ::-1] for k, v in arrays.items()}
        return arrays

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples in {self.root}")
        index = index % len(self)
        arrays = self._augment(self.load_arrays(index), index)
        vis = torch.from_numpy(np.ascontiguousarray(arrays["vis"]).transpose(2, 0, 1).copy()).float().div_(255.0)
        ir = torch.from_numpy(np.ascontiguousarray(arrays["ir"])).float().div_(255.0).unsqueeze(0)
        item: dict[str, Any] = {"ir": ir, "vis": vis, "name": self.names[index]}
        if "label" in arrays:
            item["label"] = torch.from_numpy(np.ascontiguousarray(arrays["label"]).astype(np.int64))
        return item

    def validate(self, indices: Sequence[int] | None = None, progress: bool = False) -> dict[int, str]:
        """Read and validate samples ``indices`` (default: all); returns the problem of each bad one by index.

        ``progress`` shows a tqdm bar (``data check <root> <split>``).
        """
        indices = range(len(self)) if indices is None else indices
        problems: dict[int, str] = {}
        bar = tqdm(indices, desc=f"data check {self.root.name} {self.split or ''}".rstrip(), unit="sample",
                   disable=not progress, leave=False)
        for i in bar:
            try:
                self.load_arrays(i)
            except DataError as exc:
                problems[i] = str(exc)
        return problems

    def problem_report(self, problems: Mapping[int, str], limit: int = 20) -> str:
        """``"<root> (split 'train'): N bad sample(s):"`` and one line per problem (the first ``limit``)."""
        lines = list(problems.values())
        more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
        return (f"{self.root} (split {self.split!r}): {len(lines)} bad sample(s):\n  " + "\n  ".join(lines[:limit])
                + more)

    def check(self, indices: Sequence[int] | None = None, progress: bool = False) -> int:
        """Read every sample (or ``indices``) and validate it; raises one :class:`DataError` listing all problems.

        Returns:
            the number of samples checked.
        """
        problems = self.validate(indices, progress)
        if problems:
            raise DataError(self.problem_report(problems))
        return len(self) if indices is None else len(indices)

    def __repr__(self) -> str:
        return (f"RGBTDataset(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, n={len(self)}, "
                f"labels={self.has_labels}, crop={self.crop}, flip={self.flip}, seed={self.seed})")


class RGBTSubset(Dataset):
    """The samples ``indices`` of an :class:`RGBTDataset`, keeping its interface (``names``, ``has_labels``,
    ``split``, ``set_epoch``, ``check``), e.g. the training or held-out part of one split."""

    def __init__(self, base: RGBTDataset, indices: list[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.names = [base.names[i] for i in self.indices]
        self.has_labels = base.has_labels
        self.split = base.split
        self.root = base.root

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def check(self) -> int:
        """Read and validate every sample of the subset; one :class:`DataError` lists all problems."""
        problems = []
        for i in self.indices:
            try:
                self.base.load_arrays(i)
            except DataError as exc:
                problems.append(str(exc))
        if problems:
            raise DataError(f"{self.root} (split {self.split!r}, {len(self)} of {len(self.base)} samples): "
                            f"{len(problems)} bad sample(s):\n  " + "\n  ".join(problems[:20]))
        return len(self)


def _pad(arrays: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    """Pad at the bottom / right to (h, w): images with 0, label with IGNORE_INDEX."""
    out = {}
    for key, arr in arrays.items():
        ph, pw = h - arr.shape[0], w - arr.shape[1]
        pad = ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2)
        out[key] = np.pad(arr, pad, constant_values=IGNORE_INDEX if key == "label" else 0)
    return out
