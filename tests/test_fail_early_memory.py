"""The memory guard (trainer/memory.py): the estimate against the real model (parameters counted on the CPU,
activations measured directly at a larger size than the estimate's probes), and a genotype too wide for this machine
refused with one line and exit code 2 before any data or model is built, unless max_memory_gb is raised."""
from __future__ import annotations

import json
import os
import re
import resource

import pytest
import torch

from search_space.fusion_space import FusionSpace
from search_space.genotype import GENOTYPES, Genotype, random_genotype
from search_space.pipeline import FusionSegModel, build_model
from search_space.segmenter import build_segmenter
from strategies import search
from strategies.darts import ResumableDARTS
from trainer import retrain
from trainer.config import ConfigError, load_config
from trainer.losses import TaskLoss
from trainer.memory import (GB, default_memory_limit, estimate_search_memory, estimate_training_memory,
                            fusion_pixel_cost)
from trainer.module import RetrainConfig

CANDIDATES = ("dense_k3_d1", "dilconv_k3_d2", "eca_k3")
RULES = ("spatial_attention", "add")


def _paif(channels: int) -> Genotype:
    return Genotype(**{**{k: getattr(GENOTYPES["paif"], k) for k in ("ir", "vis", "fused", "rule")},
                       "channels": channels})


def _supernet_model(channels: int) -> FusionSegModel:
    space = FusionSpace(channels=channels, steps=2, candidates=CANDIDATES, rules=RULES)
    return FusionSegModel(ResumableDARTS().mutate_model(space), build_segmenter("b0", 9))


def _direct_saved_bytes(model: torch.nn.Module, batch: int, height: int, width: int) -> int:
    """The reference: one real CPU forward of the whole model and the task loss at full size, keeping the storages
    autograd saves (by address; parameters left out). No extrapolation, no meta device."""
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    gen = torch.Generator().manual_seed(1)
    ir, vis = torch.rand(batch, 1, height, width, generator=gen), torch.rand(batch, 3, height, width, generator=gen)
    label = torch.randint(0, 9, (batch, height, width), generator=gen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = TaskLoss()(model.train()(ir, vis), ir, vis, label)
    assert loss.requires_grad
    return sum(saved.values())


# ------------------------------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("genotype", [_paif(8), random_genotype(5, channels=6)], ids=["paif-c8", "random-c6"])
def test_parameter_count_is_the_real_models(genotype):
    estimate = estimate_training_memory(genotype, 1, 32, 40)
    assert estimate.parameters == sum(p.numel() for p in build_model(genotype).parameters())
    assert estimate.parameter_bytes == 4 * estimate.parameters


def test_supernet_parameter_count_is_the_real_supernets():
    estimate = estimate_search_memory(4, 2, CANDIDATES, RULES, 1, 32, 40)
    assert estimate.parameters == sum(p.numel() for p in _supernet_model(4).parameters())


@pytest.mark.parametrize("kind,seg_scale", [("genotype", 1), ("supernet", 1), ("genotype", 2)])
def test_activation_estimate_is_within_25_percent_of_a_direct_measurement(kind, seg_scale, monkeypatch):
    monkeypatch.setenv("PAIF_NO_CPP", "1")  # the decomposition path the estimate measures (CUDA's)
    batch, height, width, channels = 2, 64, 80, 16
    if kind == "genotype":
        estimate = estimate_training_memory(_paif(channels), batch, height, width, seg_scale=seg_scale)
        model = build_model(_paif(channels), seg_scale=seg_scale)
    else:
        estimate = estimate_search_memory(channels, 2, CANDIDATES, RULES, batch, height, width, seg_scale=seg_scale)
        model = _supernet_model(channels)
    direct = _direct_saved_bytes(model, batch, height, width)
    assert 0.75 * direct <= estimate.activation_bytes <= 1.25 * direct, (estimate.activation_bytes, direct)
    assert os.environ["PAIF_NO_CPP"] == "1"


def test_fusion_cost_grows_with_the_channels_and_leaves_the_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = fusion_pixel_cost(lambda c: build_model(_paif(c)).fusion)
    assert torch.equal(torch.rand(3), expected)  # the probe's model init drew from its own generator
    assert a > 0 and b > 0


def test_seg_scale_costs_activations_only():
    """An upsampled segmenter input keeps more activations around the fusion net (SegFormer runs on 4x the pixels at
    seg_scale=2), but fewer than the scale-1 model's at twice the size, whose logits and loss are also at that size;
    the parameters and the fusion net's part do not change."""
    def segmenter_part(height: int, width: int, seg_scale: int = 1) -> int:
        full = estimate_training_memory("paif", 2, height, width, seg_scale=seg_scale).activation_bytes
        return full - estimate_training_memory("paif", 2, height, width, segmenter=None).activation_bytes

    one, two, big = segmenter_part(32, 40), segmenter_part(32, 40, seg_scale=2), segmenter_part(64, 80)
    assert 0 < one < two < big, (one, two, big)
    a, b = estimate_training_memory("paif", 2, 32, 40), estimate_training_memory("paif", 2, 32, 40, seg_scale=2)
    assert (a.parameters, a.optimizer_bytes) == (b.parameters, b.optimizer_bytes)


def test_more_forward_passes_cost_more_activations_only():
    one = estimate_training_memory("paif", 2, 32, 40, graphs=1)
    two = estimate_training_memory("paif", 2, 32, 40, graphs=2)
    assert two.activation_bytes == pytest.approx(2 * one.activation_bytes, rel=1e-6)
    assert (two.parameter_bytes, two.optimizer_bytes) == (one.parameter_bytes, one.optimizer_bytes)


def test_default_bound_is_90_percent_of_the_ram():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    limit, source = default_memory_limit(gpu=not torch.cuda.is_available())  # no GPU: the RAM either way
    assert limit == pytest.approx(0.9 * ram, rel=0.01)
    assert source.startswith("90% of this machine's") and "RAM" in source


# ------------------------------------------------------------------------------------------------- the settings
@pytest.mark.parametrize("cls", [RetrainConfig, search.SearchConfig])
@pytest.mark.parametrize("value", ["-1", "0", ".nan"])
def test_max_memory_gb_is_checked_at_load(cls, value):
    with pytest.raises(ConfigError, match=r"max_memory_gb: expected null \(90% of this machine's RAM, or of the "
                                          r"GPU's memory\) or a number of GB > 0, got"):
        load_config(cls, None, [f"max_memory_gb={value}"])


def test_max_memory_gb_may_change_on_resume():
    assert "max_memory_gb" in retrain.RESUME_SAFE and "max_memory_gb" in search.RESUME_SAFE


@pytest.mark.parametrize("overrides, graphs", [
    (["mode=clean"], 1), (["mode=at"], 2), (["mode=aat"], 2), (["mode=fusion"], 1),
    (["mode=fusion", "attack.fusion_eps=0.03"], 2),
])
def test_retrain_counts_the_clean_and_attacked_passes(overrides, graphs):
    assert retrain.training_graphs(load_config(RetrainConfig, None, overrides)) == graphs


# ------------------------------------------------------------------------------------------------- refusals
WIDE = 4096


@pytest.fixture
def wide_genotype(tmp_path):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({**json.loads(GENOTYPES["paif"].to_json()), "channels": WIDE}))
    return path


def _forbid_building(monkeypatch, module, *names):
    def forbidden(*args, **kwargs):
        raise AssertionError("built data or a model although the memory guard should have refused")

    for name in names:
        monkeypatch.setattr(module, name, forbidden)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def test_too_wide_genotype_is_refused_before_anything_is_built(wide_genotype, tmp_path, monkeypatch, capsys):
    _forbid_building(monkeypatch, retrain, "build_datasets", "build_network", "shared_run_dir", "use_run_dir")
    peak = _peak_rss_gb()
    rc = retrain.main(["--genotype", str(wide_genotype), f"max_channels={WIDE}", "data.crop=[128,160]",
                       f"data.root={tmp_path / 'no_data'}", f"runs_root={tmp_path / 'runs'}", "max_memory_gb=50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(
        r"error: estimated training memory [\d.]+ GB \(parameters 17\.0 GB, activations [\d.]+ GB in 2 forward "
        r"passes \(clean \+ attacked\), optimizer \+ gradients 50\.9 GB\) at data\.batch_size 4, crop 128x160, "
        r"channels 4096 is above max_memory_gb=50; lower channels, data\.batch_size or data\.crop, or raise "
        r"max_memory_gb \(e\.g\. max_memory_gb=\d+\) to train it anyway", err[0]), err[0]
    assert _peak_rss_gb() - peak < 2.0  # the 17 GB of weights were never allocated
    assert not (tmp_path / "runs").exists()


def test_raising_max_memory_gb_lets_the_wide_genotype_pass(wide_genotype, tmp_path):
    args = retrain.parse_args(["--genotype", str(wide_genotype), f"max_channels={WIDE}", "data.crop=[128,160]",
                               f"runs_root={tmp_path / 'runs'}", "max_memory_gb=100000"])
    cfg, genotype, _, _ = retrain.resolve_inputs(args)  # the check runs in here; nothing is trained
    assert genotype.channels == WIDE and cfg.max_memory_gb == 100000
    assert 17.0 * GB < retrain.check_training_memory(cfg, genotype).total_bytes < 100000 * GB


def test_without_a_crop_the_first_training_image_sets_the_size(tmp_path):
    from rgbt.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", n_train=1, n_val=1, n_test=0, size=(48, 64), seed=0)
    cfg = load_config(RetrainConfig, None, [f"data.root={tmp_path / 'data'}", "max_memory_gb=0.001"])
    assert retrain.train_size(cfg) == (48, 64)
    with pytest.raises(ConfigError, match=r"at data\.batch_size 4, image \(data\.crop null\) 48x64, channels 32 is "
                                          r"above max_memory_gb=0\.001"):
        retrain.check_training_memory(cfg, GENOTYPES["paif"])


def test_too_wide_search_is_refused_before_a_run_folder(tmp_path, monkeypatch, capsys):
    _forbid_building(monkeypatch, search, "run_search", "shared_run_dir", "use_run_dir")
    rc = search.main(["--config", "configs/search.yaml", f"space.channels={WIDE}", f"max_channels={WIDE}",
                      f"data.root={tmp_path / 'no_data'}", "data.generate_synthetic=false",
                      f"run_root={tmp_path / 'runs'}", "max_memory_gb=50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(r"^error: estimated training memory [\d.]+ GB \(parameters .* at data\.batch_size 4, crop "
                     r"128x160, space\.channels 4096 is above max_memory_gb=50; lower space\.channels", err[0]), err[0]
    cfg = load_config(search.SearchConfig, "configs/search.yaml",
                      [f"space.channels={WIDE}", f"max_channels={WIDE}", "max_memory_gb=100000"])
    assert search.check_search_memory(cfg).channels == WIDE  # raised: it passes


def test_without_data_the_wide_genotype_is_refused_on_its_parameters(wide_genotype, tmp_path):
    args = retrain.parse_args(["--genotype", str(wide_genotype), f"max_channels={WIDE}",
                               f"data.root={tmp_path / 'no_data'}", "max_memory_gb=50"])
    with pytest.raises(ConfigError, match=r"activations 0\.0 GB in 2 forward passes .* image \(data\.crop null; no "
                                          r"training image readable yet, activations not counted\), channels 4096 is above"):
        retrain.resolve_inputs(args)
    cfg, genotype, _, _ = retrain.resolve_inputs(retrain.parse_args(["--genotype", "paif", f"data.root={tmp_path}"]))
    assert retrain.train_size(cfg) is None and genotype.channels == 32  # no data: the data error comes later


def test_cpu_data_parallel_counts_every_process():
    base = ["data.crop=[32,40]", "space.channels=4", "device=cpu", "max_memory_gb=100000"]
    one = search.check_search_memory(load_config(search.SearchConfig, "configs/search.yaml", base))
    two = search.check_search_memory(load_config(search.SearchConfig, "configs/search.yaml", base + ["devices=2"]))
    assert (one.processes, two.processes) == (1, 2) and two.total_bytes == 2 * one.total_bytes
    cfg = load_config(RetrainConfig, None, ["data.crop=[32,40]", "accelerator=cpu", "devices=3"])
    assert retrain.check_training_memory(cfg, GENOTYPES["paif"]).processes == 3
