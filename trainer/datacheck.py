"""The data check before a run: every file a run will read is opened and validated once, up front, and remembered.

A truncated PNG or a label value outside the classes otherwise stops a run when training first reaches that sample,
which on MSRS can be hours in. :func:`check_datasets` reads every sample of the given splits
(``RGBTDataset.validate``: decode, sizes, label values), with a progress bar, and raises one
:class:`rgbt.io.DataError` listing the bad files of all splits at once. Valid samples are cached by the size and
modification time of each of their files, so a rerun on unchanged data reads nothing (it only stats the files) and a
rerun after fixing a file reads only the changed samples.

The cache is one JSON file per split under ``$PAIF_CACHE_DIR/data-check/`` (default ``~/.cache/paif/data-check``);
it is an optimisation only: a cache that cannot be read or written is ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Subset

from rgbt.classes import NUM_CLASSES
from rgbt.io import DataError
from trainer.runs import atomic_write_text

__all__ = ["CHECK_VERSION", "CACHE_ENV", "cache_dir", "check_datasets"]

log = logging.getLogger(__name__)

#: bump when RGBTDataset's validation changes what counts as a valid sample (invalidates every cache entry)
CHECK_VERSION = 1
CACHE_ENV = "PAIF_CACHE_DIR"


def cache_dir() -> Path:
    """``$PAIF_CACHE_DIR/data-check``, else ``$XDG_CACHE_HOME/paif/data-check``, else ``~/.cache/paif/data-check``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "data-check"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "paif" / "data-check"


def _cache_file(ds: Any, folder: Path) -> Path:
    key = json.dumps([CHECK_VERSION, NUM_CLASSES, str(Path(ds.root).resolve()), ds.split, ds.layout])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _stamp(files: dict[str, Path]) -> list[Any] | None:
    """``[[path, size, mtime_ns], ...]`` of one sample's files; None when one cannot be stat'ed (checked again)."""
    try:
        return [[str(Path(p).resolve()), st.st_size, st.st_mtime_ns]
                for p, st in ((files[k], os.stat(files[k])) for k in sorted(files))]
    except OSError:
        return None


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data["valid"] if data.get("version") == CHECK_VERSION and isinstance(data.get("valid"), dict) else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def _save(path: Path, valid: dict[str, Any]) -> None:
    try:
        atomic_write_text(json.dumps({"version": CHECK_VERSION, "valid": valid}) + "\n", path)
    except OSError as exc:  # a read-only home or a full disk: the check itself is done
        log.warning("data check: could not write the cache %s (%s); the next run checks again", path, exc)


def check_split(ds: Any, progress: bool = True, cache: Path | None = None) -> tuple[Any, dict[int, str], int]:
    """Validate the samples of ``ds`` not known valid; returns (the base dataset, problems by index, samples read).

    ``ds`` is an ``RGBTDataset`` or a ``torch.utils.data.Subset`` / ``RGBTSubset`` of one (only its samples are
    checked).
    """
    from rgbt.dataset import RGBTSubset

    if isinstance(ds, Subset):
        base, wanted = ds.dataset, list(ds.indices)
    elif isinstance(ds, RGBTSubset):
        base, wanted = ds.base, list(ds.indices)
    else:
        base, wanted = ds, range(len(ds))
    path = _cache_file(base, cache) if cache is not None else None
    known = _load(path) if path is not None else {}
    stamps = {i: _stamp(base.samples[i]) for i in wanted}
    todo = [i for i, st in stamps.items() if st is None or known.get(base.names[i]) != st]
    problems = base.validate(todo, progress=progress) if todo else {}
    if path is not None and todo:
        valid = {**known, **{base.names[i]: st for i, st in stamps.items() if st is not None and i not in problems}}
        for i in problems:
            valid.pop(base.names[i], None)
        _save(path, valid)
    return base, problems, len(todo)


def check_datasets(datasets: Sequence[Any], progress: bool = True, cache: Path | None = None,
                   opt_out: str = "data.check=false or --skip-data-check skips this check") -> None:
    """Open and validate every file of ``datasets`` before a run.

    ``RGBTDataset`` objects or ``Subset`` s of them (only their samples); None entries are skipped.

    Args:
        datasets: the splits the run reads.
        progress: tqdm bar per split (only when samples must be read).
        cache: the cache folder (default :func:`cache_dir`).
        opt_out: how to skip the check, named in the error.
    Raises:
        DataError: one error listing the bad files of every split (truncated or unreadable images, label values
            outside the classes, size mismatches, ...).
    """
    cache = cache_dir() if cache is None else cache
    reports, counts = [], []
    for ds in datasets:
        if ds is None:
            continue
        base, problems, read = check_split(ds, progress, cache)
        if problems:
            reports.append(base.problem_report(problems))
        counts.append(f"{len(ds)} {base.split}" + (f" ({len(ds) - read} unchanged since the last check)"
                                                   if read < len(ds) else ""))
    if reports:
        raise DataError("\n".join(reports) + f"\nfix or remove these files ({opt_out})")
    log.info("data check: %s samples valid", " + ".join(counts))
