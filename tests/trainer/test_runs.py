"""Tests of trainer.runs: run directories, logging, seeding, atomic saves, versions."""
from __future__ import annotations

import logging
import os
import random
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.runs import atomic_save, atomic_write_text, make_run_dir, seed_everything, setup_logging, versions


def test_make_run_dir_is_timestamped_unique_and_sanitised(tmp_path):
    a = make_run_dir(tmp_path / "runs", "eval/my run")
    b = make_run_dir(tmp_path / "runs", "eval/my run")
    assert a.is_dir() and b.is_dir() and a != b
    assert re.fullmatch(r"eval_my_run-\d{8}-\d{6}", a.name)
    assert b.name.startswith(a.name)


def test_setup_logging_writes_file_and_replaces_handler(tmp_path):
    first = setup_logging(tmp_path / "r1")
    logging.getLogger("paif.test").info("hello one")
    second = setup_logging(tmp_path / "r2")
    logging.getLogger("paif.test").info("hello two")
    setup_logging(None)  # detach the file handler again
    for h in logging.getLogger().handlers:
        h.flush()
    assert "hello one" in first.read_text() and "hello two" not in first.read_text()
    assert "hello two" in second.read_text()
    assert sum(getattr(h, "_paif_console", False) for h in logging.getLogger().handlers) == 1


def test_seed_everything_reproduces_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(123)
    a = draw()
    seed_everything(123)
    assert draw() == a
    seed_everything(124)
    assert draw() != a
    with pytest.raises(TypeError, match="expected an int seed"):
        seed_everything("1")  # type: ignore[arg-type]


def test_seed_everything_deterministic_flag():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_atomic_save_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    atomic_save({"w": torch.zeros(2)}, path)  # overwrite
    assert torch.load(path, weights_only=True)["w"].shape == (2,)
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"w": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"w": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"w": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_write_text(tmp_path):
    p = atomic_write_text("ä\n", tmp_path / "a.md")
    assert p.read_text(encoding="utf-8") == "ä\n"


def test_versions_are_plain_strings():
    v = versions()
    assert {"python", "torch", "nni", "transformers", "numpy"} <= set(v)
    assert all(type(x) is str for x in v.values())
    assert v["torch"] == str(torch.__version__)


# ------------------------------------------------------------------------------------------- tune_malloc
from trainer import runs as _runs  # noqa: E402


def _fake_mallopt(calls):
    def mallopt(param, value):
        calls.append((param, value))
        return 1
    return mallopt


def test_tune_malloc_sets_both_options_once(monkeypatch):
    calls = []
    monkeypatch.setattr(_runs, "_malloc_tuned", None)
    monkeypatch.setattr(_runs, "_mallopt", lambda: _fake_mallopt(calls))
    monkeypatch.delenv(_runs.MALLOC_ENV, raising=False)
    assert _runs.tune_malloc() is True
    assert _runs.tune_malloc() is True  # idempotent: no second mallopt call
    assert calls == [(-3, 1 << 30), (-1, -1)]


def test_tune_malloc_is_a_noop_without_mallopt(monkeypatch):
    monkeypatch.setattr(_runs, "_malloc_tuned", None)
    monkeypatch.setattr(_runs.sys, "platform", "darwin")
    monkeypatch.delenv(_runs.MALLOC_ENV, raising=False)
    assert _runs._mallopt() is None
    assert _runs.tune_malloc() is False
    assert _runs.tune_malloc() is False


def test_tune_malloc_opt_out(monkeypatch):
    calls = []
    monkeypatch.setattr(_runs, "_malloc_tuned", None)
    monkeypatch.setattr(_runs, "_mallopt", lambda: _fake_mallopt(calls))
    monkeypatch.setenv(_runs.MALLOC_ENV, "0")
    assert _runs.tune_malloc() is False
    assert calls == []


def test_tune_malloc_on_this_platform_returns_a_bool():
    assert isinstance(_runs.tune_malloc(), bool)


def test_a_second_process_cannot_take_a_held_run_folder_and_a_dead_owner_releases_it(tmp_path):
    import subprocess
    import sys
    import textwrap

    from trainer.runs import RunInUseError, lock_run_dir

    out = tmp_path / "runs" / "experiment"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from trainer.runs import lock_run_dir
        lock_run_dir({str(out)!r}); print("held", flush=True); time.sleep(60)""")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=rf"another process \(pid {holder.pid}\) is running in this folder"):
            lock_run_dir(out)
        assert not out.exists()  # the lock lies beside the folder: taking it neither creates nor marks it
    finally:
        holder.kill()
        holder.wait()
    lock = lock_run_dir(out)  # the kernel dropped the dead owner's lock
    assert lock.read_text().strip() == str(os.getpid())
    assert lock_run_dir(out) == lock  # taking it again in the same process is a no-op


# ------------------------------------------------------------------------ distributed launch: rank and run folder
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
                "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID",
                "SLURM_JOB_NAME", "LSB_JOBID", "LSB_HOSTS", "LSB_MCPU_HOSTS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                "PAIF_TEST_RUN_DIR")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_launch_rank_follows_each_launcher(no_launcher):
    from trainer.runs import launch_rank, launcher_job_id

    assert launch_rank(4) == 0 and launcher_job_id() is None  # plain `python retrain.py`
    no_launcher.setenv("NODE_RANK", "1")
    no_launcher.setenv("LOCAL_RANK", "2")
    assert launch_rank(4) == 1 * 4 + 2  # Lightning's own variables: node x devices + local
    assert launcher_job_id() is None
    no_launcher.setenv("SLURM_NTASKS", "8")  # srun: SLURM's numbering wins over NODE_RANK/LOCAL_RANK
    no_launcher.setenv("SLURM_NTASKS_PER_NODE", "4")
    no_launcher.setenv("SLURM_PROCID", "5")
    no_launcher.setenv("SLURM_JOB_ID", "4242")
    no_launcher.setenv("SLURM_JOB_NAME", "paif")
    assert launch_rank(4) == 5 and launcher_job_id() == "4242"
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "GROUP_RANK": "0"}.items():  # torchrun inside an allocation
        no_launcher.setenv(key, value)
    assert launch_rank(4) == 3 and launcher_job_id() == "4242"  # torchrun's RANK; the job id is SLURM's
    no_launcher.delenv("SLURM_JOB_ID")
    assert launcher_job_id() is None  # a static torchrun rendezvous has no id ("none")
    no_launcher.setenv("TORCHELASTIC_RUN_ID", "exp/1")
    assert launcher_job_id() == "exp_1"


def test_shared_run_dir_is_the_same_for_every_rank(no_launcher, tmp_path):
    from trainer.runs import SharedRunDirError, shared_run_dir

    first = shared_run_dir(tmp_path, "search", world=1, rank=0, env_key="PAIF_TEST_RUN_DIR")
    assert first.parent == tmp_path and first.name.startswith("search-") and first.is_dir()
    no_launcher.setenv("PAIF_TEST_RUN_DIR", str(first))  # Lightning's child process on this node
    no_launcher.setenv("LOCAL_RANK", "1")
    assert shared_run_dir(tmp_path, "search", world=2, rank=1, env_key="PAIF_TEST_RUN_DIR") == first
    no_launcher.delenv("PAIF_TEST_RUN_DIR")
    with pytest.raises(SharedRunDirError, match="run_dir: expected one folder that all 2 processes share"):
        shared_run_dir(tmp_path, "search", world=2, rank=1, env_key="PAIF_TEST_RUN_DIR")
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_NTASKS_PER_NODE", "1")
    no_launcher.setenv("SLURM_PROCID", "1")
    no_launcher.setenv("SLURM_JOB_ID", "77")
    no_launcher.setenv("SLURM_JOB_NAME", "paif")
    for rank in (1, 0):  # every rank of the job names the same folder, whoever comes first
        assert shared_run_dir(tmp_path, "search", world=2, rank=rank, env_key="PAIF_TEST_RUN_DIR") == \
            tmp_path / "search-77"


def test_only_rank_0_settles_a_shared_run_folder(no_launcher, tmp_path):
    """A failed rank 0 marks the shared folder FAILED; a rank > 0 neither marks, clears nor removes it."""
    from trainer.errors import PaifError, entry_point
    from trainer.runs import shared_run_dir, use_run_dir

    @entry_point
    def command(folder: Path, rank: int, fail: bool) -> int:
        run_dir = use_run_dir(folder, rank)
        (run_dir / f"rank{rank}.pt").write_text("weights")  # a result: the folder is kept
        if fail:
            raise PaifError(f"rank {rank} diverged")
        return 0

    shared = tmp_path / "shared"
    assert command(shared, 0, True) == 2
    assert (shared / "FAILED").read_text() == "rank 0 diverged\n"
    assert command(shared, 1, False) == 0  # ends normally after rank 0 failed: the mark stays
    assert (shared / "FAILED").read_text() == "rank 0 diverged\n"
    assert command(shared, 0, False) == 0  # a successful rank 0 (--resume) clears it
    assert not (shared / "FAILED").exists()

    fresh = tmp_path / "fresh"
    assert command(fresh, 1, True) == 2  # rank 1 created the folder and failed: rank 0 settles it, not rank 1
    assert fresh.is_dir() and not (fresh / "FAILED").exists()

    @entry_point
    def child(parent: Path) -> int:  # a process Lightning started on this node, in its parent's folder
        shared_run_dir(tmp_path, "search", world=2, rank=1, env_key="PAIF_TEST_RUN_DIR")
        raise PaifError("child failed")

    no_launcher.setenv("PAIF_TEST_RUN_DIR", str(fresh))
    no_launcher.setenv("LOCAL_RANK", "1")
    assert child(fresh) == 2 and not (fresh / "FAILED").exists()


def test_console_log_follows_the_current_stderr_after_a_captured_one_is_closed(monkeypatch):
    import io
    import sys

    from trainer.runs import setup_logging

    root = logging.getLogger()
    old = [h for h in root.handlers if getattr(h, "_paif_console", False)]
    for h in old:
        root.removeHandler(h)
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        setup_logging()
        first.close()  # the stream the handler was created with is gone
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("paif.test").warning("still visible")
        assert "still visible" in second.getvalue() and "Logging error" not in second.getvalue()
    finally:
        for h in [h for h in root.handlers if getattr(h, "_paif_console", False)]:
            root.removeHandler(h)
        for h in old:
            root.addHandler(h)
