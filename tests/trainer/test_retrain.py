"""End-to-end tests of trainer/retrain.py on the synthetic dataset: modes, checkpoints, exact resume, DDP,
bad input. Tiny settings (32x40 crops of the 64x80 synthetic scenes, fusion width 8, 1-step attacks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import retrain
from trainer.checkpoint import init_checkpoint, load_checkpoint, load_model
from trainer.module import RetrainModule, StepBatchSampler, warmup_poly

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """The entry point sets threads and deterministic mode; leave the process as found."""
    threads = torch.get_num_threads()
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn)


def _tiny(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "data.crop=[32,40]", "data.batch_size=2", "data.val_batch_size=2", "channels=8",
        "progress_bar=false", "val.attack_steps=1", "val.num_images=2", "attack.steps=1", "aat.meta_iters=1",
        "aat.inner_steps=1", "num_threads=1", "deterministic=true", f"runs_root={runs}", "log_every_steps=1",
        "save_every_steps=100", "optim.warmup_steps=2", *extra,
    ]


def _run(*argv: str) -> dict:
    return retrain.run(retrain.parse_args(list(argv)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrain_runs")


@pytest.fixture(scope="module")
def aat_full(synthetic_root, runs) -> dict:
    """An uninterrupted AAT run of 4 steps (3 per epoch: 6 images, batch 2) -- the reference for resume."""
    threads = torch.get_num_threads()
    try:
        return _run("--genotype", "paif", *_tiny(synthetic_root, runs, "max_steps=4", "run_name=full"))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def _tb_scalars(run_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])


def _check_outputs(summary: dict, mode: str) -> dict:
    assert summary["mode"] == mode
    assert summary["best"] is not None, "validation ran at the end of the epoch, so best.pt exists"
    for name in ("best", "last"):
        model, meta = load_model(summary[name])
        assert meta["genotype"]["channels"] == 8 and meta["state"]["mode"] == mode
        assert meta["train_cfg"]["mode"] == mode
        ir, vis = torch.rand(1, 1, 32, 40), torch.rand(1, 3, 32, 40)
        assert model(ir, vis).logits.shape == (1, 9, 32, 40)
    return load_checkpoint(summary["last"])["state"]


# --------------------------------------------------------------------------------------------- small units
def test_step_batch_sampler_resumes_mid_epoch_and_shards():
    step = {"k": 0}
    full = StepBatchSampler(10, 2, seed=3, step_fn=lambda: step["k"])
    assert len(full) == 5
    epoch0 = list(full)
    assert sorted(i for b in epoch0 for _, i in b) == list(range(10)) and {e for b in epoch0 for e, _ in b} == {0}
    step["k"] = 3
    assert list(full) == epoch0[3:]  # resumed mid-epoch: the remaining batches of the same permutation
    step["k"] = 5
    assert list(full)[0][0][0] == 1  # next epoch, new permutation
    ranks = [list(StepBatchSampler(10, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == 2
    seen = [i for r in ranks for b in r for _, i in b]
    assert len(seen) == len(set(seen)) == 8  # disjoint shards, the remainder dropped
    with pytest.raises(ValueError, match="at least"):
        StepBatchSampler(3, 2, world_size=2)


def test_warmup_poly_schedule():
    assert warmup_poly(0, 100, 10, warmup_start=0.1) == pytest.approx(0.1)
    assert warmup_poly(5, 100, 10, warmup_start=0.1) == pytest.approx(0.55)
    assert warmup_poly(10, 100, 10) == pytest.approx(1.0)
    assert warmup_poly(55, 100, 10, power=2.0) == pytest.approx(0.25)
    assert warmup_poly(100, 100, 10, min_ratio=0.05) == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------- modes
def test_aat_mode_end_to_end(aat_full):
    state = _check_outputs(aat_full, "aat")
    assert aat_full["global_step"] == 4
    probs = state["aat_probabilities"]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0)
    tags = _tb_scalars(aat_full["run_dir"])
    assert {"aat/p_eps2", "aat/p_eps8", "aat/pretext_loss_adv_eps4", "train/loss_adv", "val/miou",
            "val/miou_adv"} <= tags
    assert any(t.startswith("val/ir_vis_fused") for t in tags)  # sample pictures
    assert (Path(aat_full["run_dir"]) / "config.yaml").is_file()
    assert (Path(aat_full["run_dir"]) / "run.log").is_file()


@pytest.mark.parametrize("flags", [["mode=at"], ["--no-aat", "val.threat=sea-lite"]], ids=["at", "clean"])
def test_at_and_clean_modes_end_to_end(synthetic_root, runs, flags):
    summary = _run("--genotype", "paif", *flags, *_tiny(synthetic_root, runs, "max_steps=3", f"run_name={flags[0]}"))
    mode = "clean" if "--no-aat" in flags else "at"
    _check_outputs(summary, mode)
    if mode == "clean":  # validation under the cheap SEA threat model
        assert "(sea-lite)" in (Path(summary["run_dir"]) / "run.log").read_text()
    tags = _tb_scalars(summary["run_dir"])
    assert ("train/loss_adv" in tags) == (mode == "at")
    assert not any(t.startswith("aat/") for t in tags)


# --------------------------------------------------------------------------------------------- resume
class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("how, at", [("stop", 2), ("crash", 2), ("stop", 3)], ids=["stop", "crash", "epoch-end"])
def test_resume_mid_epoch_gives_the_same_weights(synthetic_root, runs, aat_full, monkeypatch, how, at):
    """Interrupted at step 2 of 4 (mid-epoch: 3 steps per epoch), by ``stop_at_step`` or by an exception
    in step 3 after the resumable state of step 2 was saved, or at the epoch's end (step 3); the resumed
    run ends with the same weights as the uninterrupted one."""
    step_fn, pretext_fn = RetrainModule.training_step, RetrainModule.run_pretext
    if how == "stop":
        part = _run("--genotype", "paif", *_tiny(synthetic_root, runs, "max_steps=4", f"stop_at_step={at}",
                                                 f"run_name=stop{at}"))
        assert part["global_step"] == at
        run_dir = part["run_dir"]
    else:
        def crash(self, batch, i):
            if self.global_step == 3:
                raise _Crash("killed")
            return step_fn(self, batch, i)

        monkeypatch.setattr(RetrainModule, "training_step", crash)
        with pytest.raises(_Crash):
            _run("--genotype", "paif", *_tiny(synthetic_root, runs, "max_steps=4", "save_every_steps=2",
                                              "run_name=crash"))
        monkeypatch.setattr(RetrainModule, "training_step", step_fn)
        (run_dir,) = [p for p in runs.iterdir() if p.name.startswith("crash-")]
        assert not (run_dir / "last.pt").exists() or load_checkpoint(run_dir / "last.pt")["state"]["global_step"] < 4
    steps, pretext = [], []
    monkeypatch.setattr(RetrainModule, "training_step",
                        lambda self, batch, i: steps.append(self.global_step) or step_fn(self, batch, i))
    monkeypatch.setattr(RetrainModule, "run_pretext", lambda self: pretext.append(1) or pretext_fn(self))
    resumed = _run("--resume", str(run_dir))  # stop_at_step is reset to 0 on resume
    assert resumed["run_dir"] == str(run_dir) and resumed["global_step"] == 4
    assert steps == list(range(at, 4)) and not pretext, "the run continues where it stopped, with no second pretext"
    ref = load_checkpoint(aat_full["last"])["state_dict"]
    got = load_checkpoint(resumed["last"])["state_dict"]
    assert ref.keys() == got.keys()
    differing = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differing, f"resumed weights differ from the uninterrupted run: {differing[:5]}"
    # the resumable state carries the AAT sampler and the optimiser
    ckpt = torch.load(Path(run_dir) / "resume.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["paif"]["sampler"]["counts"].sum() > 0


def test_training_time_adds_up_over_a_resume(synthetic_root, runs, monkeypatch):
    """The training time in the checkpoints covers every invocation: a run stopped at step 2 of 4 and resumed
    records the same total as the clock says for all four steps (a fake clock that advances 10 s a step), not
    only the resumed part's."""
    import types

    import trainer.module as module

    clock = [1000.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    step_fn = RetrainModule.training_step

    def timed_step(self, batch, i):
        clock[0] += 10.0
        return step_fn(self, batch, i)

    monkeypatch.setattr(RetrainModule, "training_step", timed_step)
    part = _run("--genotype", "paif", *_tiny(synthetic_root, runs, "max_steps=4", "stop_at_step=2",
                                             "save_every_steps=2", "run_name=clock"))
    assert part["global_step"] == 2 and part["train_seconds"] == pytest.approx(20.0)
    saved = torch.load(Path(part["run_dir"]) / "resume.ckpt", weights_only=True)
    assert saved["paif"]["train_seconds"] == pytest.approx(20.0)
    clock[0] += 5000.0  # time between the invocations is not training
    resumed = _run("--resume", part["run_dir"])
    assert resumed["global_step"] == 4 and resumed["train_seconds"] == pytest.approx(40.0)
    assert load_checkpoint(resumed["last"])["state"]["train_seconds"] == pytest.approx(40.0)


def test_resume_with_another_genotype_fails_before_training(synthetic_root, runs, aat_full, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"version": 1, "ir": ["dense_k3_d1", "dense_k3_d1"], "vis": ["dense_k3_d1",
                     "dense_k3_d1"], "fused": ["eca_k3", "eca_k3"], "rule": "spatial_attention", "channels": 8}))
    before = (Path(aat_full["run_dir"]) / "resume.ckpt").stat().st_mtime_ns
    assert retrain.main(["--resume", aat_full["run_dir"], "--genotype", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "resumed checkpoint" in err
    assert (Path(aat_full["run_dir"]) / "resume.ckpt").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"version": 1, "ir": ["dense_k3_d1", "no_such_op"], "vis": ["dense_k3_d1", "dense_k3_d1"],
                 "fused": ["eca_k3", "residual_k7_d1"], "rule": "spatial_attention", "channels": 8}), "no_such_op"),
], ids=["unparsable", "unknown-op"])
def test_bad_genotype_file_is_a_clear_error(tmp_path, synthetic_root, content, message, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    runs = tmp_path / "runs"
    assert retrain.main(["--genotype", str(path), *_tiny(synthetic_root, runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "bad.json" in err
    assert not runs.exists(), "no run folder is created before the inputs are checked"


def test_unknown_validation_threat_is_an_error():
    from trainer.module import RetrainConfig, ValConfig

    with pytest.raises(ValueError, match="unknown threat model 'nosuch'"):
        RetrainConfig(val=ValConfig(threat="nosuch"))


def test_unknown_genotype_name_and_mode_conflict(tmp_path, capsys):
    assert retrain.main(["--genotype", "nope", f"runs_root={tmp_path}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert retrain.main(["--genotype", "paif", "--no-aat", "mode=at", f"runs_root={tmp_path}"]) == 2
    assert "--no-aat" in capsys.readouterr().err


def test_init_from_checkpoint_of_another_genotype_fails(tmp_path, synthetic_root, capsys):
    ckpt = init_checkpoint(tmp_path / "init.pt", "paif", channels=8)
    assert retrain.main(["--genotype", "paif", f"init_from={ckpt}",
                         *_tiny(synthetic_root, tmp_path / "runs", "channels=16")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_init_from_another_seg_scale_is_a_warning(tmp_path, synthetic_root, caplog):
    """A start built at seg_scale=1 retrained at seg_scale=2 is allowed (fine-tuning at another scale) but said."""
    ckpt = init_checkpoint(tmp_path / "init.pt", "paif", channels=8)
    args = ["--genotype", "paif", f"init_from={ckpt}", *_tiny(synthetic_root, tmp_path / "runs")]
    with caplog.at_level("WARNING", logger="trainer.retrain"):
        cfg = retrain.resolve_inputs(retrain.parse_args([*args, "seg_scale=2"]))[0]
    assert cfg.seg_scale == 2
    assert "was built with seg_scale=1, this run uses seg_scale=2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.retrain"):
        retrain.resolve_inputs(retrain.parse_args(args))
    assert "seg_scale" not in caplog.text


def test_retraining_from_a_narrow_head_start_keeps_and_records_the_width(tmp_path, synthetic_root):
    """A start whose SegFormer head is 16 wide (trainer.warmstart seg.decoder_hidden_size): retrain.py builds its
    network with that width, starts from the start's weights, and its checkpoints record the width, so that
    load_model (evaluation, export) rebuilds the same shapes."""
    start = init_checkpoint(tmp_path / "start.pt", "paif", channels=8, decoder_hidden_size=16)
    assert load_checkpoint(start)["segmenter"]["decoder_hidden_size"] == 16
    summary = _run("--genotype", "paif", f"init_from={start}", "mode=clean",
                   *_tiny(synthetic_root, tmp_path / "runs", "max_steps=1", "run_name=narrow"))
    last = Path(summary["run_dir"]) / "last.pt"
    assert load_checkpoint(last)["segmenter"] == {"variant": "b0", "num_classes": 9, "decoder_hidden_size": 16}
    model, _ = load_model(last)
    assert model.segmenter.model.decode_head.classifier.weight.shape[1] == 16
    before, after = load_checkpoint(start)["state_dict"], model.state_dict()
    assert set(before) == set(after) and not torch.equal(before["segmenter.model.decode_head.classifier.weight"],
                                                         after["segmenter.model.decode_head.classifier.weight"])


# --------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent('''
    """Runs trainer/retrain.py's main; each rank also dumps its final weights (test helper)."""
    import os, sys
    import torch
    from trainer import retrain

    _end = retrain.RetrainModule.on_train_end

    def on_train_end(self):
        _end(self)
        torch.save(self.model.state_dict(), os.path.join(os.environ["DUMP_DIR"], f"rank{self.global_rank}.pt"))

    retrain.RetrainModule.on_train_end = on_train_end
    sys.exit(retrain.main(sys.argv[1:]))
''')


def test_ddp_two_cpu_processes_hold_the_same_weights(synthetic_root, tmp_path):
    script = tmp_path / "ddp_retrain.py"
    script.write_text(_DDP_SCRIPT)
    runs = tmp_path / "runs"
    args = _tiny(synthetic_root, runs, "devices=2", "accelerator=cpu", "data.batch_size=1", "max_steps=3",
                 "deterministic=false")
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--genotype", "paif", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
    run_dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, f"both ranks must share one run folder, got {run_dirs}"
    last = load_checkpoint(run_dirs[0] / "last.pt")
    assert last["state"]["global_step"] == 3
    for k in w0:
        assert torch.equal(w0[k], last["state_dict"][k])
