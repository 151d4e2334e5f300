"""File-system errors at every entry point: a read-only output folder, a path under a regular file, a file-size limit
(EFBIG) and a missing path end in one line `error: ...` with exit code 2, not a traceback.

A read-only folder is a 0555 folder. Root ignores permissions, so as root the child process first drops
CAP_DAC_OVERRIDE from its capability bounding set (Linux): the kernel then refuses the write as it would for a user.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from derive import export_genotype
from rgbt import synthetic
from trainer import evaluate, experiment, retrain, warmstart
from trainer.errors import FAILED_FILE

REPO = Path(__file__).resolve().parents[1]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _blocker(tmp_path: Path) -> Path:
    """A regular file: any path below it cannot be created (ENOTDIR), for root too."""
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    return path


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_retrain_output_under_a_file(synthetic_root, tmp_path, capsys):
    runs = _blocker(tmp_path) / "runs"
    args = ["--genotype", "paif", "mode=clean", f"data.root={synthetic_root}", "channels=8", f"runs_root={runs}",
            "progress_bar=false"]
    assert retrain.main(args) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: not a directory: {runs} (ENOTDIR); a part of the path is a file, not a folder; choose another path")


def test_evaluate_output_under_a_file(tmp_path, capsys, synthetic_root):
    from trainer.checkpoint import init_checkpoint

    ckpt = init_checkpoint(tmp_path / "c.pt", "paif", channels=4)
    out = _blocker(tmp_path) / "eval"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(synthetic_root), "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(f"error: not a directory: {out} (ENOTDIR)")


def test_export_genotype_output_under_a_file(tmp_path, capsys):
    probs = {label: {"dense_k3_d1": 0.7, "eca_k3": 0.3}
             for label in ("ir/op1", "ir/op2", "vis/op1", "vis/op2", "fused/op1", "fused/op2")}
    probs["rule"] = {"add": 0.6, "max": 0.4}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "search_result.json").write_text(json.dumps({"probabilities": probs, "channels": 4}))
    out = _blocker(tmp_path) / "out.json"
    assert export_genotype.main(["--run", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: file exists: {out.parent} (EEXIST); it is a file where a folder is expected; choose another path")


def test_export_genotype_unreadable_result(tmp_path, capsys):
    (tmp_path / "search_result.json").write_text('{"probabilities": ')  # cut short
    assert export_genotype.main(["--run", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    assert "search_result.json: expected a search result (JSON), got unreadable text" in capsys.readouterr().err


def test_synthetic_output_under_a_file(tmp_path, capsys):
    out = _blocker(tmp_path) / "data"
    assert synthetic.main(["--out", str(out), "--n-train", "1", "--n-val", "0", "--n-test", "0",
                           "--size", "32", "32"]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith("error: not a directory: ")


def test_experiment_output_under_a_file(tmp_path, capsys):
    out = _blocker(tmp_path) / "exp"
    assert experiment.main(["--out", str(out), "seeds=[0]", "warmstart=null"]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: not a directory: {out} (ENOTDIR); a part of the path is a file, not a folder; choose another path")


def test_warm_start_missing_data(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    assert warmstart.main(["--data", str(missing), "--cache", str(tmp_path / "cache")]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {missing}: expected a dataset folder, got no such directory; check the path")


# --------------------------------------------------------------------------------------- real OS refusals
def _drop_dac_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_caps() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_override, capture_output=True)
    return probe.returncode == 0


def _run(args: list[str], tmp_path: Path, readonly_user: bool = False, fsize: int | None = None):
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if readonly_user and os.geteuid() == 0:
            _drop_dac_override()

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          preexec_fn=limit, timeout=600)


@pytest.mark.slow
def test_retrain_into_a_read_only_folder(synthetic_root, tmp_path):
    if os.geteuid() == 0 and not _can_drop_caps():
        pytest.skip("running as root, and CAP_DAC_OVERRIDE cannot be dropped here: a 0555 folder would not stop it")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = _run([str(REPO / "trainer" / "retrain.py"), "--genotype", "paif", "mode=clean",
                    f"data.root={synthetic_root}", "channels=8", f"runs_root={ro}", "progress_bar=false",
                    "--skip-data-check"], tmp_path, readonly_user=True)
    finally:
        ro.chmod(0o755)
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res.stderr)
    assert line.startswith(f"error: permission denied: {ro}/retrain-clean-") and line.endswith(
        "(EACCES); make it writable or choose another output folder")
    assert list(ro.iterdir()) == []


@pytest.mark.slow
def test_synthetic_over_a_file_size_limit_then_a_clean_rerun(tmp_path):
    out = tmp_path / "data"
    args = ["-m", "rgbt.synthetic", "--out", str(out), "--n-train", "2", "--n-val", "0", "--n-test", "0",
            "--size", "256", "320"]
    res = _run(args, tmp_path, fsize=60_000)  # ulimit -f: a 256x320 RGB PNG of a scene is larger
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res.stderr)
    assert line.startswith(f"error: file too large: {out}/train/vi/") and "(EFBIG)" in line and "ulimit -f" in line
    assert (out / FAILED_FILE).read_text().startswith("file too large")
    res = _run(args, tmp_path)  # the partial dataset is cleared (meta.partial.json) and written again
    assert res.returncode == 0, res.stderr
    assert not (out / FAILED_FILE).exists() and json.loads((out / "meta.json").read_text())["splits"]["train"] == 2
