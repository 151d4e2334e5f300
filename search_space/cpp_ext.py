"""Build and load the fused C++ CPU kernels of the guided-filter decomposition (issue 10), at first use.

The source is ``search_space/csrc/guided_decompose.cpp`` (PAIF's decomposition: He et al.'s guided filter
with two eps sharing the window statistics, streamed row by row per group of channels, see its header; and
the one-pass single-slope PReLU backward of :mod:`search_space.activations`). It is
compiled with ``torch.utils.cpp_extension.load`` (gcc, ninja) with ``-O3 -fopenmp``, plus ``-mavx2 -mfma``
only when PyTorch reports an AVX2-capable CPU (no ``-march=native``: the build stays portable to the CPUs
of that class), into ``$PAIF_EXT_DIR`` (default ``~/.cache/paif_ext``) under a directory named by the hash of
the source, its path, the flags and the torch/Python versions, so an edited source never loads a stale build.

Concurrent processes: the build runs under an exclusive ``flock`` on ``<dir>/<name>.lock`` (released by the
kernel if the process dies), so a second process waits and then loads the first one's build; a lock file
left by torch's own baton after a killed build is removed under that lock (torch's baton alone would make
every later process wait forever).

``PAIF_NO_CPP=1`` turns the extension off (the pure-PyTorch path is used). A failed build (no compiler, no
ninja, a compile error) is reported by one ``RuntimeWarning`` and the pure-PyTorch path is used for the rest of
the process; it never raises.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

__all__ = ["SOURCE", "build_flags", "cache_dir", "disabled", "failure", "load_extension", "main"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "guided_decompose.cpp"
_state: dict[str, object] = {}  # "module" once loaded, "error" (str) once failed
_lock = threading.Lock()


def disabled() -> bool:
    """True when ``PAIF_NO_CPP`` is set to anything but ``""`` or ``"0"`` (read at every call)."""
    return os.environ.get("PAIF_NO_CPP", "") not in ("", "0")


def cache_dir() -> Path:
    """Where builds are kept: ``$PAIF_EXT_DIR``, else ``~/.cache/paif_ext``."""
    return Path(os.environ.get("PAIF_EXT_DIR") or Path.home() / ".cache" / "paif_ext")


def build_flags() -> list[str]:
    """Compiler flags: ``-O3 -fopenmp`` (at::parallel_for's OpenMP pragmas), AVX2/FMA only where supported."""
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build_name(flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), str(SOURCE).encode(), " ".join(flags).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return f"paif_guided_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (the kernel drops it if the process dies)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put the ``ninja`` pip package's binary (a dependency) first on PATH for the block, else keep PATH's ``ninja``.

    Always the same ninja, whichever PATH a process has: ninja records a hash of each build command in its log, and
    two ninja versions (here the system's 1.11 when ``.venv/bin`` is not on PATH, as under ``make``, and the pip
    package's 1.13 when it is, as in the demo's NNI trials) do not accept each other's entries, so alternating
    between them recompiled the kernels (~70 s) at the first use in every process that used the other one.
    """
    old = os.environ.get("PATH", "")
    try:
        import ninja  # the pip package: torch's JIT build runs the `ninja` found on PATH

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    flags = build_flags()
    name = _build_name(flags)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir() / f"{name}.lock"):
        (build_dir / "lock").unlink(missing_ok=True)  # torch's baton, stale if a build was killed
        with _ninja_on_path():
            return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                      extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=verbose)


def _summary(exc: Exception) -> str:
    """One line for a build failure: the compiler's first ``error:`` line if there is one (torch's message
    starts with the whole compile command), else the start of the message."""
    text = str(exc)
    errors = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    return f"{type(exc).__name__}: {errors[0] if errors else ' '.join(text.split())}"[:300]


def load_extension(verbose: bool = False) -> ModuleType | None:
    """The compiled module (``guide_stats``, ``forward``, ``backward``, ``prelu_backward``), or None when disabled
    or not buildable.

    The first call builds (about a minute) or loads the cached build; a failure warns once and is remembered.
    """
    if disabled():
        return None
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _build(verbose)
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
                msg = _summary(exc)
                _state["error"] = msg
                log.warning("C++ decomposition kernel not built: %s\n%s", msg, exc)
                warnings.warn(f"search_space.cpp_ext: the C++ decomposition kernel could not be built ({msg}); "
                              "using the pure-PyTorch decomposition", RuntimeWarning, stacklevel=2)
        return _state.get("module")  # type: ignore[return-value]


def failure() -> str | None:
    """Why the build failed in this process (None if it did not fail or was not tried)."""
    return _state.get("error")  # type: ignore[return-value]


def main() -> int:
    """``python -m search_space.cpp_ext``: build (or find) the extension now, e.g. at install time, so that the first
    search or training step does not compile it. Prints one line; exits 0 also when it cannot be built (the
    pure-PyTorch path is then used, as at first use)."""
    import time

    if disabled():
        print("search_space.cpp_ext: PAIF_NO_CPP is set; the pure-PyTorch decomposition is used")
        return 0
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failure() says it in one line below
        module = load_extension()
    if module is None:
        print(f"search_space.cpp_ext: not built ({failure()}); the pure-PyTorch decomposition is used")
    else:
        print(f"search_space.cpp_ext: C++ decomposition kernels ready in {Path(module.__file__).parent} "
              f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
