"""Run every "fail early" case of issue 16 against the entry points and print a Markdown table of what happened.

Each case is a real subprocess of an entry point on a tiny synthetic dataset (32x40 crops, 4-8 channels); the table
shows its exit code, whether a traceback was printed, the last line of stderr and, where it matters, what the run
left on disk. Used for the before/after table of issue 16 (README "Failing early, not silently")::

    python scripts/fail_early_cases.py                       # all cases (about 3-4 minutes on 2 cores)
    python scripts/fail_early_cases.py --only efbig resume    # the cases whose name contains a word
    python scripts/fail_early_cases.py --repo /path/to/checkout   # run another checkout's code (e.g. the base commit)

A read-only folder is a 0555 folder; as root, which chmod does not stop, the child drops ``CAP_DAC_OVERRIDE`` from
its capability bounding set first (Linux), so the kernel refuses the write as it would for a user. EFBIG comes from
``RLIMIT_FSIZE`` (``ulimit -f``) in the child process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24

RETRAIN_TINY = ["--genotype", "paif", "mode=clean", "data.crop=[32,40]", "data.batch_size=2", "data.val_batch_size=2",
                "channels=8", "progress_bar=false", "val.attack_steps=1", "val.num_images=0", "num_threads=1",
                "optim.warmup_steps=0", "max_steps=2"]
SEARCH_TINY = ["data.crop=[32,40]", "data.batch_size=2", "space.channels=4",
               "space.candidates=[dense_k3_d1,dilconv_k3_d2,eca_k3]", "epochs=1", "max_train_batches=1",
               "threads=1", "progress_bar=false", "attack.name=fgsm", "selection.max_batches=1"]


def drop_dac_override() -> None:
    """In a child process of root: give up the right to ignore file permissions (takes effect at exec)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run(repo: Path, args: list[str], cwd: Path, fsize: int | None = None, as_user: bool = False,
        timeout: int = 600) -> dict[str, Any]:
    """Run ``python *args`` with ``repo`` importable; returns exit code, stderr, seconds."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PAIF_CACHE_DIR": str(cwd / "cache")}

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if as_user and os.geteuid() == 0:
            drop_dac_override()

    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          preexec_fn=limit, timeout=timeout)
    return {"rc": proc.returncode, "err": proc.stderr, "out": proc.stdout, "s": time.time() - t0}


def last_line(err: str) -> str:
    """The ``error: ...`` line when there is one (a multi-line data report follows it), else the last line."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors or lines or [""])[-1].strip()


def listing(folder: Path) -> str:
    if not folder.exists():
        return "no folder"
    runs = [p for p in sorted(folder.iterdir()) if p.is_dir()]
    if not runs:
        return "no run folder"
    out = []
    for r in runs:
        names = sorted(p.name for p in r.iterdir())
        failed = (r / "FAILED").read_text().strip()[:80] if (r / "FAILED").is_file() else None
        out.append(f"{r.name}: {', '.join(names)}" + (f" (FAILED: {failed})" if failed else ""))
    return "; ".join(out)


# -------------------------------------------------------------------------------------------------- cases
def case_retrain_under_file(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    blocker = work / "not_a_dir"
    blocker.write_text("x")
    return run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY,
                      f"data.root={data}", f"runs_root={blocker}/runs"], work)


def case_retrain_readonly(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    ro = work / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    res = run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY, f"data.root={data}", f"runs_root={ro}"], work,
              as_user=True)
    res["note"] = "root without CAP_DAC_OVERRIDE" if os.geteuid() == 0 else ""
    return res


def case_retrain_efbig(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    runs = work / "runs_efbig"
    res = run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY, f"data.root={data}", f"runs_root={runs}"],
              work, fsize=2_000_000)
    res["disk"] = listing(runs)
    return res


def case_retrain_nan(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    runs = work / "runs_nan"
    res = run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY, f"data.root={data}", f"runs_root={runs}",
                     "optim.lr=1e30", "val.every_n_steps=1"], work)
    res["disk"] = listing(runs)
    return res


def case_retrain_nan_skip(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    runs = work / "runs_skip"
    return run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY, f"data.root={data}", f"runs_root={runs}",
                      "optim.lr=1e30", "nan_policy=skip", "nan_max_skips=2", "max_steps=4", "data.batch_size=1"],
               work)


def case_retrain_resume_batch(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    runs = work / "runs_resume"
    first = run(repo, [str(repo / "trainer/retrain.py"), *RETRAIN_TINY, f"data.root={data}", f"runs_root={runs}",
                       "max_steps=3", "stop_at_step=1", "save_every_steps=1"], work)
    if first["rc"] != 0:
        return first
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return run(repo, [str(repo / "trainer/retrain.py"), "--resume", str(run_dir), "data.batch_size=1"], work)


def case_search_bad_label(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    bad = work / "bad_data"
    shutil.copytree(data, bad)
    import numpy as np
    from PIL import Image

    label = sorted((bad / "val" / "Segmentation_labels").iterdir())[-1]
    arr = np.array(Image.open(label))
    arr[0, 0] = 12
    Image.fromarray(arr).save(label)
    runs = work / "search_bad"
    res = run(repo, [str(repo / "strategies/search.py"), "--config", str(repo / "configs/search.yaml"),
                     f"data.root={bad}", *SEARCH_TINY, f"run_dir={runs / 'run'}"], work)
    res["disk"] = listing(runs)
    return res


def case_search_checkpoints(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    run_dir = work / "search_ckpt"
    res = run(repo, [str(repo / "strategies/search.py"), "--config", str(repo / "configs/search.yaml"),
                     f"data.root={data}", *SEARCH_TINY, "epochs=3", f"run_dir={run_dir}"], work)
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    res["disk"] = (f"{len(ckpts)} checkpoints ({', '.join(p.name for p in ckpts)}), "
                   f"{sum(p.stat().st_size for p in ckpts) / 1e6:.0f} MB")
    return res


def case_search_bad_lr(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    run_dir = work / "search_lr"
    res = run(repo, [str(repo / "strategies/search.py"), "--config", str(repo / "configs/search.yaml"),
                     f"data.root={data}", *SEARCH_TINY, "lr=-1", f"run_dir={run_dir}"], work)
    res["disk"] = "run folder created" if run_dir.exists() else "no run folder"
    return res


def case_search_wide(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    run_dir = work / "search_wide"
    return run(repo, [str(repo / "strategies/search.py"), "--config", str(repo / "configs/search.yaml"),
                      f"data.root={data}", *SEARCH_TINY, "space.channels=100000", f"run_dir={run_dir}"], work)


def case_search_efbig(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    run_dir = work / "search_efbig"
    return run(repo, [str(repo / "strategies/search.py"), "--config", str(repo / "configs/search.yaml"),
                      f"data.root={data}", *SEARCH_TINY, f"run_dir={run_dir}"], work, fsize=2_000_000)


def case_evaluate_random_bytes(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    ckpt = work / "random.pt"
    ckpt.write_bytes(os.urandom(4096))
    return run(repo, [str(repo / "trainer/evaluate.py"), "--checkpoint", str(ckpt), "--data", str(data),
                      "--out", str(work / "eval_rand"), "--no-progress"], work)


def _init_ckpt(repo: Path, work: Path) -> Path:
    ckpt = work / "init.pt"
    if not ckpt.is_file():
        run(repo, ["-m", "trainer.checkpoint", "--init", "--genotype", "paif", "--channels", "4", "--out", str(ckpt)],
            work)
    return ckpt


def case_evaluate_under_file(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    blocker = work / "eval_blocker"
    blocker.write_text("x")
    return run(repo, [str(repo / "trainer/evaluate.py"), "--checkpoint", str(_init_ckpt(repo, work)), "--data",
                      str(data), "--out", str(blocker / "out"), "--no-progress", "--limit", "1", "--threat", "paif",
                      "--eps-sweep", "masking.enabled=false"], work)


def case_evaluate_batch0(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    return run(repo, [str(repo / "trainer/evaluate.py"), "--checkpoint", str(_init_ckpt(repo, work)), "--data",
                      str(data), "--out", str(work / "eval_b0"), "--no-progress", "--limit", "1", "--threat", "paif",
                      "--eps-sweep", "batch_size=0", "masking.enabled=false"], work)


def case_export_under_file(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    src = work / "search_ckpt"
    if not (src / "search_result.json").is_file():
        case_search_checkpoints(repo, work, data)
    blocker = work / "export_blocker"
    blocker.write_text("x")
    return run(repo, [str(repo / "derive/export_genotype.py"), "--run", str(src), "--out",
                      str(blocker / "out.json")], work)


def case_synthetic_under_file(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    blocker = work / "syn_blocker"
    blocker.write_text("x")
    return run(repo, ["-m", "rgbt.synthetic", "--out", str(blocker / "data"), "--n-train", "2", "--n-val", "0",
                      "--n-test", "0", "--size", "32", "40"], work)


def case_synthetic_efbig(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    out = work / "syn_efbig"
    res = run(repo, ["-m", "rgbt.synthetic", "--out", str(out), "--n-train", "2", "--n-val", "0", "--n-test", "0",
                     "--size", "512", "640"], work, fsize=100_000)
    res["disk"] = ("FAILED: " + (out / "FAILED").read_text().strip()[:80]) if (out / "FAILED").is_file() else (
        ", ".join(sorted(p.name for p in out.iterdir())) if out.exists() else "no folder")
    return res


def case_warmstart_missing(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    return run(repo, ["-m", "trainer.warmstart", "--data", str(work / "no_such_data"), "--cache",
                      str(work / "ws_cache")], work)


def case_experiment_under_file(repo: Path, work: Path, data: Path) -> dict[str, Any]:
    blocker = work / "exp_blocker"
    blocker.write_text("x")
    return run(repo, ["-m", "trainer.experiment", "--out", str(blocker / "exp"), "seeds=[0]", "runs=[[a,paif,clean]]",
                      "warmstart=null"], work)


CASES: dict[str, Callable[[Path, Path, Path], dict[str, Any]]] = {
    "retrain: runs_root under a regular file": case_retrain_under_file,
    "retrain: read-only runs_root (EACCES)": case_retrain_readonly,
    "retrain: file size limit, ulimit -f 2 MB (EFBIG)": case_retrain_efbig,
    "retrain: optim.lr=1e30 (NaN)": case_retrain_nan,
    "retrain: optim.lr=1e30 nan_policy=skip nan_max_skips=2": case_retrain_nan_skip,
    "retrain: --resume with data.batch_size changed": case_retrain_resume_batch,
    "search: label value 12 in the val split": case_search_bad_label,
    "search: checkpoints after 3 epochs": case_search_checkpoints,
    "search: lr=-1": case_search_bad_lr,
    "search: space.channels=100000": case_search_wide,
    "search: file size limit 2 MB (EFBIG)": case_search_efbig,
    "evaluate: 4 KB of random bytes as --checkpoint": case_evaluate_random_bytes,
    "evaluate: --out under a regular file": case_evaluate_under_file,
    "evaluate: batch_size=0": case_evaluate_batch0,
    "export_genotype: --out under a regular file": case_export_under_file,
    "rgbt.synthetic: --out under a regular file": case_synthetic_under_file,
    "rgbt.synthetic: file size limit 100 KB (EFBIG)": case_synthetic_efbig,
    "warmstart: --data does not exist": case_warmstart_missing,
    "experiment: --out under a regular file": case_experiment_under_file,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose code runs (default: this one)")
    p.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these words")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    repo = args.repo.resolve()
    work = Path(tempfile.mkdtemp(prefix="paif-fail-early-"))
    data = work / "data"
    gen = run(repo, ["-m", "rgbt.synthetic", "--out", str(data), "--n-train", "4", "--n-val", "2", "--n-test", "2",
                     "--size", "48", "64"], work)
    if gen["rc"] != 0:
        print(gen["err"], file=sys.stderr)
        return 1
    rows, raw = [], {}
    for name, case in CASES.items():
        if args.only and not any(w in name for w in args.only):
            continue
        res = case(repo, work, data)
        raw[name] = res
        tb = "yes" if "Traceback (most recent call last)" in res["err"] else "no"
        line = last_line(res["err"]).replace("|", "\\|")[:300]
        extra = " ".join(x for x in (res.get("note", ""), res.get("disk", "")) if x).replace("|", "\\|")
        rows.append(f"| {name} | {res['rc']} | {tb} | `{line}` | {extra} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("| case | exit | traceback | last stderr line | on disk |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
