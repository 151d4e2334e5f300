"""The project's error base class and the error boundary every entry point runs inside.

A command that fails on bad input (a setting, a data file, a genotype, a checkpoint), on a diverged training (NaN)
or on the file system (no permission, a full disk, a file-size limit, a missing path) ends with one line on stderr,
``error: <what failed and what to do>``, and exit code 2. Any other exception is a bug: it keeps its traceback.
Either way the run folders the command created or wrote into are settled (:func:`track_run_dir`): a ``FAILED`` file
holds the one-line reason, or a folder this command created is removed when it holds nothing but its start-up files
(the resolved config, the genotype, the versions, logs). A later successful run in the same folder (``--resume``)
removes the ``FAILED`` file.

This module imports nothing from the project, so every package can derive its errors from :class:`PaifError`::

    @entry_point
    def main(argv: list[str] | None = None) -> int:
        cfg = load_config(...)                       # ConfigError -> "error: optim.lr: expected ..." exit 2
        run_dir = make_run_dir(cfg.runs_root, ...)   # tracked: marked FAILED if anything below fails
        ...
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

__all__ = ["PaifError", "EXIT_USER_ERROR", "FAILED_FILE", "entry_point", "track_run_dir", "describe_error",
           "describe_os_error", "settle_run_dir", "os_error_at"]

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
FAILED_FILE = "FAILED"
#: what a run writes when it starts; a folder holding only these (and empty folders) has no result to keep
START_FILES = frozenset({"config.yaml", "genotype.json", "versions.json"})
START_SUFFIXES = (".log",)

F = TypeVar("F", bound=Callable[..., Any])


class PaifError(Exception):
    """Base of the project's own errors: bad settings, data, genotypes or checkpoints, and diverged training.

    Entry points turn them into one line and exit code 2 (:func:`entry_point`); the message must say what was
    expected, what was found, and what to do.
    """


# ------------------------------------------------------------------------------------------------- messages
_OS_HINTS = {
    errno.EACCES: "make it writable or choose another output folder",
    errno.EPERM: "make it writable or choose another output folder",
    errno.EROFS: "the file system is mounted read-only; choose another output folder",
    errno.ENOSPC: "the disk is full; free space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another output folder",
    errno.EFBIG: "the file system or a file-size limit (ulimit -f) refuses a file this large; raise the limit or "
                 "choose another output folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "expected a file, got a folder; check the path",
    errno.EEXIST: "remove it or choose another path",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and what to do.

    ``PermissionError(13, 'Permission denied', 'runs/x')`` -> ``"permission denied: runs/x (EACCES); make it
    writable or choose another output folder"``.
    """
    code = exc.errno
    if exc.strerror:
        what = exc.strerror.strip()
        what = what[:1].lower() + what[1:]  # "Permission denied" -> "permission denied"
    else:  # an OSError raised with a message of its own
        what = str(exc).strip() or type(exc).__name__
    where = ""
    if exc.filename is not None:
        where = f": {os.fsdecode(exc.filename)}"
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
    name = f" ({errno.errorcode[code]})" if isinstance(code, int) and code in errno.errorcode else ""
    hint = _OS_HINTS.get(code, "")
    if code == errno.EEXIST and exc.filename is not None and os.path.isfile(exc.filename):
        hint = "it is a file where a folder is expected; choose another path"  # mkdir(parents=True) below a file
    return f"{what}{where}{name}" + (f"; {hint}" if hint else "")


def os_error_at(exc: BaseException, path: str | Path) -> BaseException:
    """``exc`` with ``path`` as its file name when it is an OS error without one (a failed ``write``: ENOSPC, EFBIG).

    Use as ``raise os_error_at(exc, path) from exc``; any other exception is returned unchanged.
    """
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
        return type(exc)(exc.errno, exc.strerror, str(path))
    return exc


_WORKER_TRACEBACK = re.compile(r"Original Traceback \(most recent call last\):", re.M)


def describe_error(exc: BaseException) -> str:
    """The message shown for ``exc``: :func:`describe_os_error` for OS errors, else the error's own text.

    An error re-raised by a ``DataLoader`` worker carries the worker's traceback in its text; only its last line
    (the original message) is kept.
    """
    if isinstance(exc, OSError) and not isinstance(exc, PaifError):
        return describe_os_error(exc)
    text = str(exc).strip() or type(exc).__name__
    if _WORKER_TRACEBACK.search(text):
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


# ------------------------------------------------------------------------------------------------- run folders
_frames: list[list[tuple[Path, bool]]] = []


def track_run_dir(path: str | Path, created: bool) -> Path:
    """Register ``path`` as a run folder of the running entry point (no-op outside :func:`entry_point`).

    Args:
        path: the folder.
        created: True when this command created it (it may then be removed when the command fails before
            writing any result into it); False for a folder that existed (``--resume``, ``--out``): only marked.
    """
    path = Path(path)
    if _frames and all(p != path for p, _ in _frames[-1]):
        _frames[-1].append((path, created))
    return path


def _only_start_files(folder: Path) -> bool:
    for p in folder.rglob("*"):
        if p.is_file() or p.is_symlink():
            if p.name not in START_FILES and not p.name.endswith(START_SUFFIXES):
                return False
    return True


def settle_run_dir(path: Path, created: bool, reason: str | None) -> str | None:
    """After a command: clear a stale ``FAILED`` (``reason`` None), or mark the folder failed / remove it.

    Returns what was done (for the log), or None. Never raises: the folder may be unwritable, which is often
    why the command failed.
    """
    marker = path / FAILED_FILE
    try:
        if reason is None:
            marker.unlink(missing_ok=True)
            return None
        if not path.is_dir():
            return None
        if created and _only_start_files(path):
            import shutil

            shutil.rmtree(path)
            return f"removed the run folder {path} (nothing but its start-up files)"
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{FAILED_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(reason.splitlines()[0] + "\n" if reason else "\n")
        os.replace(tmp, marker)
        return f"marked {path} as failed ({marker})"
    except OSError as exc:
        log.debug("could not settle run folder %s: %s", path, exc)
        return None


def _log_to_files(level: int, message: str, exc: BaseException | None = None) -> None:
    """Write ``message`` into the run log files only (the console shows the error line once, on stderr)."""
    record = logging.LogRecord("paif", level, __file__, 0, message, None,
                               (type(exc), exc, exc.__traceback__) if exc is not None else None)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_paif_file", False):
            try:
                handler.handle(record)
            except Exception:  # a full disk: the log cannot take it either
                pass


def _settle_all(frame: list[tuple[Path, bool]], reason: str | None) -> list[str]:
    return [done for path, created in frame if (done := settle_run_dir(path, created, reason))]


# ------------------------------------------------------------------------------------------------- boundary
def entry_point(main: F) -> F:
    """Wrap an entry point's ``main(argv) -> int`` in the error boundary (see the module docstring).

    :class:`PaifError` and :class:`OSError`: ``error: <one line>`` on stderr, the run folders settled, return
    :data:`EXIT_USER_ERROR`. Any other exception (a bug, ``KeyboardInterrupt``): the run folders settled, then
    re-raised with its traceback. A normal return clears stale ``FAILED`` markers when the code is 0.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        frame: list[tuple[Path, bool]] = []
        _frames.append(frame)
        try:
            code = main(*args, **kwargs)
        except (PaifError, OSError) as exc:
            message = describe_error(exc)
            _log_to_files(logging.ERROR, message)
            for done in _settle_all(frame, message):
                log.debug("%s", done)
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR
        except BaseException as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {first}"
            if not isinstance(exc, SystemExit):
                _log_to_files(logging.ERROR, f"unexpected error: {reason}", exc)
                _settle_all(frame, reason + " (an unexpected error; the traceback is on stderr and in the log)")
            raise
        finally:
            _frames.pop()
        if code in (0, None):
            _settle_all(frame, None)
        return code

    return wrapper  # type: ignore[return-value]
