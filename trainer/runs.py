"""Run-directory helpers shared by the PAIF entry scripts (search, retrain, evaluate).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023. Every run writes into its own time-stamped directory with a log file, the
resolved config and the library versions, so that a result can be traced back to what produced it.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import fcntl
import importlib.metadata
import logging
import os
import platform
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import PaifError, track_run_dir

__all__ = ["make_run_dir", "use_run_dir", "setup_logging", "seed_everything", "atomic_save", "atomic_write_text",
           "atomic_write_bytes", "atomic_save_figure", "versions", "tune_malloc", "MALLOC_ENV", "lock_run_dir",
           "RunInUseError", "launch_rank", "launcher_job_id", "shared_run_dir", "no_shared_run_dir", "SharedRunDirError"]

log = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_VERSION_PACKAGES = (
    "torch", "nni", "transformers", "pytorch-lightning", "kornia", "torchmetrics", "numpy", "scipy", "pillow",
    "matplotlib", "paif",
)


def make_run_dir(root: str | Path, name: str) -> Path:
    """Create and return ``root/<name>-YYYYmmdd-HHMMSS`` (a numeric suffix is added if it already exists).

    Inside an entry point (:func:`trainer.errors.entry_point`) the folder is marked ``FAILED`` (or removed while it
    holds only start-up files) when the command fails.

    Args:
        root: parent directory, created if missing.
        name: a short run name; characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        candidate = root / (f"{safe}-{stamp}" if i == 0 else f"{safe}-{stamp}-{i}")
        try:
            candidate.mkdir()
            return track_run_dir(candidate, created=True)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {root}: expected a free name, got 1000 clashes")


class RunInUseError(PaifError):
    """Another live process holds the folder's lock (:func:`lock_run_dir`)."""


#: open lock files of this process, kept referenced so their ``flock`` lasts until the process ends
_HELD_LOCKS: dict[Path, Any] = {}


def lock_run_dir(path: str | Path) -> Path | None:
    """Hold an exclusive lock on the run folder ``path`` until this process ends; return the lock file (None when
    the folder's parent cannot be made: :func:`use_run_dir`, called next, reports that).

    The lock file ``.<name>.lock`` lies beside the folder (so taking it neither creates nor marks the folder) and
    holds the owner's pid; the kernel drops the ``flock`` when the process dies, so a killed run never blocks its
    resumption. Two commands resuming one folder at once would each redo and overwrite the other's jobs.

    Raises:
        RunInUseError: another live process holds the lock (its pid is named).
    """
    path = Path(path).resolve()
    if path in _HELD_LOCKS:
        return Path(_HELD_LOCKS[path].name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    lock = path.parent / f".{path.name}.lock"
    fh = open(lock, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown"
        fh.close()
        raise RunInUseError(f"{path}: another process (pid {owner}) is running in this folder; wait for it to end "
                            f"or stop it (kill {owner}), then rerun to continue") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD_LOCKS[path] = fh
    return lock


def use_run_dir(path: str | Path, rank: int = 0) -> Path:
    """Create ``path`` if needed (with its parents) and register it as the command's run folder.

    For a folder the user names (``--out``, ``run_dir=``, ``--resume``): a failed command marks it ``FAILED``; one
    it created and left without results is removed (:func:`trainer.errors.track_run_dir`). In a distributed run
    only rank 0 registers it; the other ranks (``rank`` > 0) just create it, so a rank that ends normally after
    rank 0 failed cannot clear rank 0's ``FAILED`` mark, and none removes a folder the others write into.
    """
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return track_run_dir(path, created=created) if rank == 0 else path


def _cluster_environment() -> Any:
    """The Lightning cluster environment that manages this process (torchrun, SLURM, LSF, MPI), or None.

    The same detection order as ``pytorch_lightning``'s accelerator connector, so a rank computed here
    before the ``Trainer`` exists is the one Lightning will use.
    """
    from lightning_fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env.detect():
            return env()
    return None


def launch_rank(devices: int) -> int:
    """This process's global rank as its launcher set it, before Lightning starts (0 when not distributed).

    torchrun: ``RANK``; SLURM (srun): ``SLURM_PROCID``; LSF / MPI: theirs; otherwise Lightning's own
    variables: ``NODE_RANK * devices + LOCAL_RANK`` (``devices`` = processes per node).
    """
    env = _cluster_environment()
    if env is not None:
        return int(env.global_rank())
    return int(os.environ.get("NODE_RANK", "0")) * int(devices) + int(os.environ.get("LOCAL_RANK", "0"))


def launcher_job_id() -> str | None:
    """The id that every process of one distributed launch shares, or None.

    SLURM: ``SLURM_JOB_ID``; torchrun: ``TORCHELASTIC_RUN_ID`` (its ``--rdzv-id``; ``--standalone`` draws
    one; a static ``--master-addr`` launch leaves it at ``none``, which counts as no id).
    """
    if _cluster_environment() is None:
        return None
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID"):
        value = os.environ.get(key, "").strip()
        if value and value.lower() != "none":
            return re.sub(r"[^A-Za-z0-9._-]+", "_", value)
    return None


class SharedRunDirError(PaifError, ValueError):
    """The processes of a distributed run have no way to agree on one run folder."""


def shared_run_dir(root: str | Path, name: str, world: int, rank: int, env_key: str) -> Path:
    """The run folder that every process of one (possibly distributed) run uses; created by rank 0 only.

    Rank 0 registers it as the command's run folder (:func:`use_run_dir`, :func:`make_run_dir`: marked ``FAILED``
    when the command fails); the other ranks do not.

    * a process that Lightning launched on this node (``LOCAL_RANK`` > 0) takes its parent's folder from the
      environment variable ``env_key`` (the caller sets it before ``trainer.fit`` launches the children);
    * under torchrun / SLURM with ``world`` > 1: ``root/<name>-<launcher job id>`` (:func:`launcher_job_id`);
    * otherwise rank 0 makes ``root/<name>-<time>`` (:func:`make_run_dir`).

    Raises:
        SharedRunDirError: a rank > 0 with none of these (pass an explicit run folder instead).
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(env_key):
        return Path(os.environ[env_key])
    job = launcher_job_id() if world > 1 else None
    if job is not None:
        return use_run_dir(Path(root) / f"{name}-{job}", rank)
    if rank != 0:
        raise SharedRunDirError(no_shared_run_dir(world))
    return make_run_dir(root, name)


def no_shared_run_dir(world: int, note: str = "") -> str:
    """The error message of a distributed run whose processes cannot agree on a run folder."""
    return (f"run_dir: expected one folder that all {world} processes share{note}, got none and no launcher job id "
            "(SLURM_JOB_ID, torchrun --rdzv-id); pass run_dir=<folder on a shared filesystem>, the same on every node")


class _ConsoleHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each record, not the stream it was created with: a
    redirected or captured stderr that is later closed (pytest's capture, a caller's ``redirect_stderr``) would
    otherwise turn every later log line into a "Logging error" traceback."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__/setStream assign it; sys.stderr wins
        pass


def setup_logging(run_dir: str | Path | None = None, level: int = logging.INFO, filename: str = "run.log") -> Path | None:
    """Configure the root logger: a console handler once, plus a file handler in ``run_dir``.

    Calling it again for another run directory replaces the previous file handler (useful for tests that
    run several entry points in one process). Returns the log file path, or None without ``run_dir``.
    """
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter(_LOG_FORMAT)
    if not any(getattr(h, "_paif_console", False) for h in root.handlers):
        console = _ConsoleHandler()
        console.setFormatter(fmt)
        console._paif_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    for h in [h for h in root.handlers if getattr(h, "_paif_file", False)]:
        root.removeHandler(h)
        h.close()
    if run_dir is None:
        return None
    path = Path(run_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(fmt)
    fh._paif_file = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    return path


MALLOC_ENV = "PAIF_MALLOC_TUNING"
"""Set to ``0`` to leave glibc's allocator at its defaults (:func:`tune_malloc` then does nothing)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 1 << 30
_malloc_tuned: bool | None = None  # None: not tried yet; else the outcome of the first call


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process (glibc only): ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and
    ``mallopt(M_TRIM_THRESHOLD, -1)``.

    By default glibc serves every block above ~32 MB with a fresh ``mmap`` and unmaps it on free, so each
    large feature map of a full-resolution CPU step is page-faulted in again (at 480×640 the faults cost
    about as much as the arithmetic on the tensor). With the two settings the heap keeps those pages: a
    3×3 conv at 32×480×640 runs about 2.5× faster (``bench/malloc_gain.py`` for the whole-step numbers). The
    cost is that the process keeps its peak heap (RSS does not shrink after a large step).

    Process-wide, so it is called by the entry points (retrain, evaluate, search, warm start, experiment,
    the benches), never by library code. Idempotent; a no-op returning False where ``mallopt`` is
    unavailable (non-glibc platforms) or when ``PAIF_MALLOC_TUNING=0``. Returns whether the settings are on.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get(MALLOC_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    log.debug("glibc malloc tuning %s", "on" if _malloc_tuned else "refused")
    return _malloc_tuned


def _mallopt() -> Any:
    """glibc's ``mallopt(int, int) -> int``, or None off Linux/glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic kernels.

    ``deterministic=True`` sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` and disables the
    cuDNN autotuner; on CUDA it also sets ``CUBLAS_WORKSPACE_CONFIG`` if unset.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed_everything: expected an int seed, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _atomic_write(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        failed = _os_error_of(exc)
        if failed is not None:  # name the file: a write error (ENOSPC, EFBIG) carries no path of its own
            raise OSError(failed.errno, failed.strerror, failed.filename or str(path)) from exc
        raise
    return path


def _os_error_of(exc: BaseException) -> OSError | None:
    """The file-system error behind ``exc``: itself, or the ``OSError`` a ``torch.save`` ``RuntimeError`` hides.

    ``torch.save`` into a file object reports a failed write (full disk, size limit) as
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``; the ``OSError`` is its context.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError) and exc.__context__.errno is not None:
        return exc.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``.

    A crash mid-write leaves either the old file or none, never a truncated one.
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 text atomically (temporary file + ``os.replace``)."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write bytes atomically (temporary file in the same folder + ``os.replace``): never a half-written file."""
    return _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the suffix) and close it, also when saving fails."""
    path = Path(path)
    try:
        return _atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png",
                                                         **savefig_kwargs))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on (missing ones are omitted)."""
    out: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["torch"] = str(torch.__version__)  # TorchVersion is a str subclass; keep it plain
    out["cuda"] = str(torch.version.cuda) if torch.version.cuda else "none"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
