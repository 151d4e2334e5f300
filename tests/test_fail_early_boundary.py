"""The error boundary of the entry points (trainer/errors.py): project and OS errors become one line and exit code 2,
bugs keep their traceback, and the run folders of a failed command are marked FAILED or removed."""
from __future__ import annotations

import errno
import logging

import pytest
import torch

from rgbt.io import DataError, MissingDataError
from robustness.threats import ThreatError
from search_space.convert_reference import ConversionError
from search_space.genotype import GenotypeError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.errors import (EXIT_USER_ERROR, FAILED_FILE, PaifError, describe_error, describe_os_error, entry_point,
                            track_run_dir)
from trainer.finite import NonFiniteError
from trainer.retrain import RetrainError
from trainer.runs import atomic_save, atomic_write_text, make_run_dir, setup_logging, use_run_dir


@pytest.mark.parametrize("cls", [ConfigError, DataError, MissingDataError, GenotypeError, CheckpointError, ThreatError,
                                 NonFiniteError, RetrainError, ConversionError])
def test_every_project_error_derives_from_the_base(cls):
    assert issubclass(cls, PaifError)
    # and keeps its old base, so existing `except ValueError` / `except FloatingPointError` code still catches it
    assert issubclass(cls, FloatingPointError if cls is NonFiniteError else ValueError)


@pytest.mark.parametrize("exc, text", [
    (PermissionError(errno.EACCES, "Permission denied", "runs/x"),
     "permission denied: runs/x (EACCES); make it writable or choose another output folder"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt"),
     "no space left on device: runs/x/last.pt (ENOSPC); the disk is full; free space or choose an output folder "
     "on another disk"),
    (OSError(errno.EFBIG, "File too large", "runs/x/last.pt"),
     "file too large: runs/x/last.pt (EFBIG); the file system or a file-size limit (ulimit -f) refuses a file this "
     "large; raise the limit or choose another output folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/runs"),
     "not a directory: f/runs (ENOTDIR); a part of the path is a file, not a folder; choose another path"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "invalid cross-device link: a -> b (EXDEV)"),
    (FileNotFoundError("--run x: expected a run directory"), "--run x: expected a run directory"),
])
def test_os_errors_read_as_one_line_with_the_path_and_what_to_do(exc, text):
    assert describe_os_error(exc) == text
    assert describe_error(exc) == text


def test_a_data_error_from_a_dataloader_worker_keeps_only_its_message():
    # what torch's ExceptionWrapper.reraise builds from an error in a worker process
    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\nrgbt.io.DataError: a.png: unreadable or truncated image')
    assert describe_error(worker) == "a.png: unreadable or truncated image"
    missing = MissingDataError("data/x: expected a dataset folder")  # a DataError that is also a FileNotFoundError
    assert describe_error(missing) == "data/x: expected a dataset folder"


def _main_raising(exc: BaseException, make_dir=None, write=None):
    @entry_point
    def main(argv=None) -> int:
        if make_dir is not None:
            run_dir = make_dir()
            if write:
                (run_dir / write).write_text("x")
        raise exc

    return main


def test_project_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    main = _main_raising(ConfigError("optim.lr: expected a number > 0 (e.g. 5e-4), got -1.0"))
    assert main() == EXIT_USER_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: optim.lr: expected a number > 0 (e.g. 5e-4), got -1.0\n"


def test_os_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    main = _main_raising(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs")))
    assert main() == 2
    assert capsys.readouterr().err == f"error: permission denied: {tmp_path / 'runs'} (EACCES); make it writable or " \
                                      "choose another output folder\n"


def test_a_bug_keeps_its_traceback_and_marks_the_folder(tmp_path, capsys):
    main = _main_raising(KeyError("oops"), lambda: make_run_dir(tmp_path, "run"), write="last.pt")
    with pytest.raises(KeyError):
        main()
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / FAILED_FILE).read_text().startswith("KeyError: 'oops' (an unexpected error; the traceback")


def test_a_failed_run_with_results_is_marked_failed_with_the_reason(tmp_path):
    main = _main_raising(NonFiniteError("non-finite loss nan at training step 3"),
                         lambda: make_run_dir(tmp_path, "run"), write="last.pt")
    assert main() == 2
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / FAILED_FILE).read_text() == "non-finite loss nan at training step 3\n"
    assert (run_dir / "last.pt").is_file()  # results are kept


def test_a_failed_run_that_wrote_only_start_files_is_removed(tmp_path):
    def make():
        run_dir = make_run_dir(tmp_path, "run")
        setup_logging(run_dir)  # run.log
        atomic_write_text("a: 1\n", run_dir / "config.yaml")
        (run_dir / "tb").mkdir()  # empty folders do not count
        return run_dir

    try:
        assert _main_raising(DataError("bad.png: truncated"), make)() == 2
    finally:
        setup_logging(None)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_the_command_did_not_create_is_only_marked(tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    assert _main_raising(DataError("bad"), lambda: use_run_dir(existing))() == 2
    assert (existing / FAILED_FILE).read_text() == "bad\n"
    # a later successful command in the same folder (e.g. --resume) clears the marker

    @entry_point
    def ok(argv=None) -> int:
        use_run_dir(existing)
        return 0

    assert ok() == 0 and not (existing / FAILED_FILE).exists()


def test_interrupt_marks_the_folder_and_propagates(tmp_path):
    main = _main_raising(KeyboardInterrupt(), lambda: make_run_dir(tmp_path, "run"), write="resume.ckpt")
    with pytest.raises(KeyboardInterrupt):
        main()
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / FAILED_FILE).read_text().startswith("interrupted")


def test_run_dirs_are_tracked_only_inside_an_entry_point(tmp_path):
    track_run_dir(tmp_path, created=True)  # no entry point: nothing to settle, no error
    assert tmp_path.is_dir()


def test_the_error_line_also_goes_to_the_run_log(tmp_path):
    def make():
        run_dir = make_run_dir(tmp_path, "run")
        setup_logging(run_dir)
        logging.getLogger("x").info("started")
        (run_dir / "last.pt").write_text("x")
        return run_dir

    try:
        assert _main_raising(ConfigError("monitor: expected one of"), make)() == 2
    finally:
        setup_logging(None)
    (run_dir,) = tmp_path.iterdir()
    assert "ERROR paif: monitor: expected one of" in (run_dir / "run.log").read_text()


def test_atomic_save_names_the_file_when_torch_save_hides_the_os_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos';
    atomic_save turns it back into the OSError (with the path) that the boundary explains."""
    import trainer.runs as runs

    def full_disk(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        atomic_save({"x": torch.zeros(2)}, tmp_path / "last.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
