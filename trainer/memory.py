"""Training-memory estimate of a fusion + segmentation model before anything is built (a guard against a width,
batch or crop that cannot fit: ``channels=100000`` in a genotype would try to allocate ~160 GB).

:func:`estimate_training_memory` (a fixed genotype, ``trainer/retrain.py``) and :func:`estimate_search_memory` (the
DARTS supernet, ``strategies/search.py``) return a :class:`MemoryEstimate` for one training step on one device:

* **parameters** — exact: the model is built on ``torch.device("meta")`` at its real width (shapes only, no memory)
  and its parameters counted; float32.
* **optimizer + gradients** — computed: one gradient and two Adam(W) moments per parameter (3 × parameter bytes).
* **activations** — the tensors autograd keeps for the backward pass, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks` (distinct storages, parameters excluded; :func:`saved_bytes`):

  - the fusion net and the fusion loss: *measured* by a real CPU forward at batch 1, 32×40, channels 4 and 8 (the
    pure-PyTorch decomposition, the path CUDA takes; the C++ CPU kernels keep less), then *extrapolated*: the cost
    per pixel is fitted as ``a + b·C`` and scaled to batch × height × width at the real channels C (every fusion
    op works at full resolution, so the cost is proportional to the pixels; the box filters' borders make the small
    measurement slightly larger per pixel, so the extrapolation errs high);
  - everything else (colour conversion, normalisation, the ``seg_scale`` upsampling, padding to a multiple of 32,
    SegFormer, the upsampled logits and the cross-entropy): *computed exactly* at the real batch and crop by running
    that part on the meta device (no memory; SegFormer's attention grows faster than the pixels, so it is not
    extrapolated);
  - times the forward passes alive at once (``graphs``: 2 in adversarial training, the clean and the attacked one);
  - none when the size is not known yet (no crop and no readable training image: the data error follows at once).

Not counted: the batch itself, the gradient buffers of the backward pass (they grow while the saved tensors are
freed), kernels' temporary workspace, allocator fragmentation, the CUDA context, the attack's own passes (each freed
before the next), validation (no graph kept). So the real peak is higher: in real CPU training steps at 96x128 to
128x160, 16-64 channels (``bench/memory_estimate.py``) 2-24 % above the estimate with the C++ decomposition kernels
and 23-35 % above it with the pure-PyTorch decomposition (CUDA's path). Mixed precision (``bf16-mixed``) keeps about
half of the activations in 16 bits.

The bound: ``max_memory_gb`` in the retrain and search configs (None = :func:`default_memory_limit`, 90 % of this
machine's RAM, or of the GPU's memory when training on a GPU); :func:`check_memory` refuses beyond it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from trainer.config import ConfigError

__all__ = ["MemoryEstimate", "MemoryLimitError", "estimate_training_memory", "estimate_search_memory", "saved_bytes",
           "fusion_pixel_cost", "segmenter_bytes", "default_memory_limit", "check_memory", "step_graphs",
           "first_image_size", "size_label", "GB", "DEFAULT_FRACTION"]

GB = 1e9
#: the share of the machine's RAM (or the GPU's memory) that ``max_memory_gb: null`` allows
DEFAULT_FRACTION = 0.9
#: the widths and the (height, width) of the two CPU measurements of the fusion net's cost per pixel (batch 1)
PROBE_CHANNELS: tuple[int, int] = (4, 8)
PROBE_SIZE: tuple[int, int] = (32, 40)
#: gradient + the two Adam(W) moments, per parameter
OPTIMIZER_COPIES = 3
FLOAT_BYTES = 4


class MemoryLimitError(ConfigError):
    """The estimated training memory exceeds ``max_memory_gb``."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one training step (bytes; :data:`GB` = 1e9).

    Attributes:
        parameters: parameter count (exact, from the meta-device model).
        parameter_bytes: float32 parameter bytes.
        activation_bytes: bytes autograd keeps for backward, all ``graphs`` forward passes together.
        optimizer_bytes: gradients + Adam(W) moments.
        processes: model copies on the machine (CPU data parallelism runs one process per device).
        batch, height, width, channels, graphs: what the estimate is for.
    """

    parameters: int
    parameter_bytes: int
    activation_bytes: int
    optimizer_bytes: int
    batch: int
    height: int
    width: int
    channels: int
    graphs: int = 1
    processes: int = 1

    @property
    def total_bytes(self) -> int:
        """Parameters + activations + optimizer state, times :attr:`processes`."""
        return self.processes * (self.parameter_bytes + self.activation_bytes + self.optimizer_bytes)

    def describe(self) -> str:
        """E.g. ``"236.0 GB (parameters 17.0 GB, activations 168.2 GB in 2 forward passes (clean + attacked),
        optimizer + gradients 50.9 GB)"``."""
        copies = f" in {self.processes} processes" if self.processes > 1 else ""
        passes = f" in {self.graphs} forward passes (clean + attacked)" if self.graphs > 1 else ""
        return (f"{self.total_bytes / GB:.1f} GB{copies} (parameters {self.parameter_bytes / GB:.1f} GB, "
                f"activations {self.activation_bytes / GB:.1f} GB{passes}, optimizer + gradients "
                f"{self.optimizer_bytes / GB:.1f} GB)")


# ------------------------------------------------------------------------------------------------ measuring
def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (works on the meta device).

    Storages of ``exclude`` (the parameters: counted separately) are not counted; a storage saved by several ops
    (an input kept by a conv and by the next activation) counts once. The result of ``fn`` is dropped.
    """
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@contextlib.contextmanager
def _pure_pytorch() -> Iterator[None]:
    """The decomposition's pure-PyTorch path (``PAIF_NO_CPP=1``): no C++ build at check time, and the path of CUDA."""
    old = os.environ.get("PAIF_NO_CPP")
    os.environ["PAIF_NO_CPP"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PAIF_NO_CPP", None)
        else:
            os.environ["PAIF_NO_CPP"] = old


def _fusion_bytes(make_fusion: Callable[[int], nn.Module], channels: int, batch: int, height: int, width: int) -> int:
    """Saved bytes of a real CPU forward of ``make_fusion(channels)`` and the fusion loss."""
    from trainer.losses import fusion_loss

    with _pure_pytorch(), torch.random.fork_rng(devices=[]):  # model init draws: leave the global stream alone
        torch.manual_seed(0)
        net = make_fusion(channels).train()
        ir, y = torch.rand(batch, 1, height, width), torch.rand(batch, 1, height, width)
        return saved_bytes(lambda: fusion_loss(ir, y, net(ir, y)), exclude=net.parameters())


def fusion_pixel_cost(make_fusion: Callable[[int], nn.Module], channels: Sequence[int] = PROBE_CHANNELS,
                      size: Sequence[int] = PROBE_SIZE) -> tuple[float, float]:
    """``(a, b)``: the fusion net's and fusion loss's saved bytes per pixel are ``a + b·C`` at C channels.

    Measured by a real CPU forward at batch 1 and ``size`` for the two ``channels``
    (:func:`saved_bytes`); ``make_fusion(C)`` builds the net at width C.
    """
    (c0, c1), (h, w) = channels, size
    m0, m1 = (_fusion_bytes(make_fusion, c, 1, h, w) / (h * w) for c in (c0, c1))
    slope = (m1 - m0) / (c1 - c0)
    return m0 - slope * c0, slope


class _PassThrough(nn.Module):
    """Stands in for the fusion net on the meta device: the luminance, as a fresh leaf that needs a gradient."""

    def forward(self, ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.detach().requires_grad_()


def segmenter_bytes(batch: int, height: int, width: int, segmenter: str = "b0", num_classes: int = 9,
                    inputs: str = "both", seg_scale: int = 1) -> int:
    """Saved bytes of everything around the fusion net (colour conversion, normalisation, ``seg_scale`` upsampling,
    padding, SegFormer, logits upsampling, cross-entropy) at the real sizes, computed on the meta device (exact;
    nothing allocated)."""
    from search_space.pipeline import FusionSegModel
    from search_space.segmenter import build_segmenter
    from trainer.losses import TaskLoss

    with torch.device("meta"):
        model = FusionSegModel(_PassThrough(), build_segmenter(segmenter, num_classes), inputs=inputs,
                               seg_scale=seg_scale).train()
        ir, vis = torch.empty(batch, 1, height, width), torch.empty(batch, 3, height, width)
        label = torch.zeros(batch, height, width, dtype=torch.long)
        return saved_bytes(lambda: TaskLoss().segmentation(model(ir, vis).logits, label), exclude=model.parameters())


def _count_parameters(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _estimate(make_fusion: Callable[[int], nn.Module], cost_key: Any, build: Callable[[], nn.Module], channels: int,
              batch: int, height: int, width: int, segmenter: str | None, num_classes: int, inputs: str, graphs: int,
              processes: int, seg_scale: int = 1) -> MemoryEstimate:
    params = _count_parameters(build)
    per_graph = 0.0
    if height > 0 and width > 0:  # 0 x 0: the size is not known yet (parameters and optimizer only)
        a, b = _cached_pixel_cost(cost_key, make_fusion)
        per_graph = batch * height * width * (a + b * channels)
        if segmenter is not None:
            per_graph += segmenter_bytes(batch, height, width, segmenter, num_classes, inputs, seg_scale)
    param_bytes = FLOAT_BYTES * params
    return MemoryEstimate(parameters=params, parameter_bytes=param_bytes, activation_bytes=int(graphs * per_graph),
                          optimizer_bytes=OPTIMIZER_COPIES * param_bytes, batch=batch, height=height, width=width,
                          channels=channels, graphs=graphs, processes=processes)


_COSTS: dict[Any, tuple[float, float]] = {}


def _cached_pixel_cost(key: Any, make_fusion: Callable[[int], nn.Module]) -> tuple[float, float]:
    """:func:`fusion_pixel_cost` once per architecture (the width is not part of ``key``) and process."""
    if key not in _COSTS:
        _COSTS[key] = fusion_pixel_cost(make_fusion)
    return _COSTS[key]


def estimate_training_memory(genotype: Any, batch: int, height: int, width: int, *, channels: int | None = None,
                             segmenter: str | None = "b0", num_classes: int = 9, inputs: str = "both",
                             seg_scale: int = 1, graphs: int = 1, processes: int = 1) -> MemoryEstimate:
    """Memory of one training step of ``build_model(genotype)`` at ``batch`` × ``height`` × ``width``.

    Args:
        genotype: a :class:`search_space.genotype.Genotype`, a name or a JSON path / mapping.
        channels: the width (None: the genotype's).
        segmenter: the SegFormer variant, or None when the segmenter never runs (``mode=fusion``; its parameters
            are still counted).
        num_classes, inputs, seg_scale: as :func:`search_space.pipeline.build_model`.
        graphs: forward passes alive at once (:func:`step_graphs`).
        processes: model copies on this machine.
    """
    import dataclasses

    from search_space.genotype import build_fusion_net, get_genotype
    from search_space.pipeline import build_model

    g = get_genotype(genotype)
    if channels is not None:
        g = dataclasses.replace(g, channels=int(channels))
    key = ("genotype", g.ir, g.vis, g.fused, g.rule)
    return _estimate(lambda c: build_fusion_net(dataclasses.replace(g, channels=c)), key,
                     lambda: build_model(g, segmenter=segmenter or "b0", num_classes=num_classes, inputs=inputs,
                                         seg_scale=seg_scale),
                     g.channels, batch, height, width, segmenter, num_classes, inputs, graphs, processes, seg_scale)


def estimate_search_memory(channels: int, steps: int, candidates: Sequence[str], rules: Sequence[str], batch: int,
                           height: int, width: int, *, segmenter: str = "b0", num_classes: int = 9, graphs: int = 1,
                           processes: int = 1, seg_scale: int = 1) -> MemoryEstimate:
    """Memory of one search step: the DARTS supernet of :class:`search_space.fusion_space.FusionSpace` (every
    candidate op runs and keeps its activations) + SegFormer (input upsampled by ``seg_scale``), at ``batch`` ×
    ``height`` × ``width``."""
    from search_space.fusion_space import FusionSpace
    from search_space.pipeline import FusionSegModel
    from search_space.segmenter import build_segmenter

    def supernet(c: int) -> nn.Module:
        from strategies.darts import ResumableDARTS

        return ResumableDARTS().mutate_model(FusionSpace(channels=c, steps=steps, candidates=tuple(candidates),
                                                         rules=tuple(rules)))

    key = ("supernet", steps, tuple(candidates), tuple(rules))
    return _estimate(supernet, key, lambda: FusionSegModel(supernet(channels), build_segmenter(segmenter, num_classes)),
                     channels, batch, height, width, segmenter, num_classes, "both", graphs, processes, seg_scale)


def step_graphs(clean_weight: float, attacked: bool) -> int:
    """Forward passes alive in one training step: the clean one (weight > 0) and the attacked one (if any)."""
    return max(1, int(clean_weight > 0) + int(attacked))


def first_image_size(root: str, split: str | None, layout: str = "auto") -> tuple[int, int] | None:
    """(height, width) of the first image of a split, from its header only; None when the split cannot be listed or
    read (no folder yet, a bad file): the run's data check or dataset then reports it, before any model is built."""
    from rgbt.dataset import RGBTDataset
    from rgbt.io import DataError, image_size

    try:
        files = RGBTDataset(root, split, layout=layout).samples[0]
        return image_size(files.get("vis", files.get("rgbt")))
    except DataError:
        return None


def size_label(crop: Any, size: tuple[int, int] | None) -> str:
    """What the estimate's height and width are, for :func:`check_memory`'s message."""
    if crop is not None:
        return "crop"
    if size is not None:
        return "image (data.crop null)"
    return "image (data.crop null; no training image readable yet, activations not counted)"


# ------------------------------------------------------------------------------------------------ the bound
def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit(gpu: bool = False) -> tuple[float, str]:
    """(GB, where it comes from): :data:`DEFAULT_FRACTION` of the GPU's memory (``gpu`` and CUDA present), else of
    this machine's RAM (``/proc/meminfo``, or ``os.sysconf``)."""
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        total, what = props.total_memory, f"GPU memory ({props.name})"
    else:
        total, what = _ram_bytes(), "RAM"
    return DEFAULT_FRACTION * total / GB, f"{DEFAULT_FRACTION:.0%} of this machine's {total / GB:.1f} GB {what}"


def check_memory(estimate: MemoryEstimate, max_memory_gb: float | None, channels_key: str, gpu: bool = False,
                 size_label: str = "crop") -> None:
    """Refuse a training step that would not fit.

    Args:
        estimate: from :func:`estimate_training_memory` / :func:`estimate_search_memory`.
        max_memory_gb: the bound in GB; None = :func:`default_memory_limit`.
        channels_key: the setting that sets the width (``channels``, ``space.channels``), named in the message.
        gpu: the run trains on a GPU (the default bound is then the GPU's memory).
        size_label: what the height and width are (``crop``, or the image size when there is no crop).
    Raises:
        MemoryLimitError: one line with the estimate split, the batch, crop and channels, and what to change.
    """
    if max_memory_gb is None:
        limit, source = default_memory_limit(gpu)
        bound = f"max_memory_gb (default {limit:.1f} GB: {source})"
    else:
        limit, bound = float(max_memory_gb), f"max_memory_gb={max_memory_gb:g}"
    if estimate.total_bytes <= limit * GB:
        return
    e = estimate
    size = f"{size_label} {e.height}x{e.width}" if e.height and e.width else size_label
    raise MemoryLimitError(
        f"estimated training memory {e.describe()} at data.batch_size {e.batch}, {size}, "
        f"{channels_key} {e.channels} is above {bound}; lower {channels_key}, data.batch_size or data.crop, or raise "
        f"max_memory_gb (e.g. max_memory_gb={int(e.total_bytes / GB) + 1}) to train it anyway")
