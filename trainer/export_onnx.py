"""Export a PAIF checkpoint to ONNX, to run the fusion (and segmentation) outside Python.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023. Usage::

    python trainer/export_onnx.py --checkpoint CKPT --out model.onnx [--part fusion|full] [--opset 17] [--verify]
    paif export-onnx --checkpoint CKPT --out fusion.onnx --part fusion

The graph has two inputs and, by ``--part``, one or two outputs (batch, height and width are dynamic: one file
serves every image size)::

    ir         float32 (batch, 1, height, width)  infrared, values in [0, 1]
    vis        float32 (batch, 3, height, width)  visible RGB, values in [0, 1]
    fused_rgb  float32 (batch, 3, height, width)  fused RGB, values in [0, 1]
    logits     float32 (batch, K, height, width)  class scores (--part full; argmax = class id, MFNet classes)

The model's ``metadata_props`` repeat this (keys ``ir``, ``vis``, ``fused_rgb``, ``logits``: shape, range,
meaning) and ``paif`` holds it as JSON with the genotype, segmenter, classes and the weights' content hash.
The guided-filter decomposition is exported through its plain-torch-ops path
(``search_space.decompose.plain_ops``), never through its custom autograd function. The TorchScript-based
exporter is used (``dynamo=False``: no onnxscript needed). ``--verify`` runs the file with onnxruntime
against PyTorch on random inputs of two sizes and prints the largest differences (the test suite does the
same on real pairs: ``tests/trainer/test_export_onnx.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python trainer/export_onnx.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rgbt.classes import CLASSES  # noqa: E402
from search_space.decompose import plain_ops  # noqa: E402
from trainer.card import content_hash  # noqa: E402
from trainer.checkpoint import CheckpointError, load_model  # noqa: E402
from trainer.runs import atomic_write_bytes  # noqa: E402

__all__ = ["PARTS", "INPUTS", "ExportModel", "io_spec", "export_onnx", "verify", "main"]

log = logging.getLogger("trainer.export_onnx")

PARTS = ("fusion", "full")
INPUTS = ("ir", "vis")
DEFAULT_OPSET = 17
EXAMPLE_SIZE = (37, 53)
"""Size of the tracing example. Not a multiple of 32, so the segmenter's padding is traced (its amount stays
symbolic and is 0 for sizes that need none); any size works at run time."""


class ExportModel(nn.Module):
    """``(ir, vis) -> fused_rgb`` (``part="fusion"``: the segmenter is not in the graph) or ``(fused_rgb, logits)``."""

    def __init__(self, model: nn.Module, part: str = "full") -> None:
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
        self.model, self.part = model, part

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.part == "fusion":
            return self.model.fuse(ir, vis)[1]
        out = self.model(ir, vis)
        return out.fused_rgb, out.logits

    @property
    def output_names(self) -> list[str]:
        return ["fused_rgb"] if self.part == "fusion" else ["fused_rgb", "logits"]


def io_spec(part: str, num_classes: int) -> dict[str, dict[str, Any]]:
    """Shape, dtype, value range and meaning of every input and output (written into the ONNX metadata)."""
    spec: dict[str, dict[str, Any]] = {
        "ir": {"shape": ["batch", 1, "height", "width"], "dtype": "float32", "range": [0.0, 1.0],
               "meaning": "infrared image, 8-bit value / 255"},
        "vis": {"shape": ["batch", 3, "height", "width"], "dtype": "float32", "range": [0.0, 1.0],
                "meaning": "visible image, RGB channel order, 8-bit value / 255; same height and width as ir"},
        "fused_rgb": {"shape": ["batch", 3, "height", "width"], "dtype": "float32", "range": [0.0, 1.0],
                      "meaning": "fused image, RGB (fused luminance with the visible chroma); x 255 for 8 bit"},
    }
    if part == "full":
        spec["logits"] = {"shape": ["batch", num_classes, "height", "width"], "dtype": "float32",
                          "range": [None, None],
                          "meaning": "unnormalised class scores; argmax over dim 1 = class id"}
    return spec


def _metadata(meta: dict[str, Any], part: str, opset: int, checkpoint: str) -> dict[str, str]:
    num_classes = int(meta["segmenter"]["num_classes"])
    spec = io_spec(part, num_classes)
    props = {name: (f"{s['dtype']} ({', '.join(map(str, s['shape']))}), range "
                    f"{'unbounded' if s['range'][0] is None else s['range']}: {s['meaning']}")
             for name, s in spec.items()}
    card = meta.get("card") or {}
    info = {"part": part, "opset": opset, "inputs": {k: spec[k] for k in INPUTS},
            "outputs": {k: v for k, v in spec.items() if k not in INPUTS}, "genotype": meta.get("genotype"),
            "segmenter": meta.get("segmenter"), "model_options": meta.get("model"),
            "classes": list(CLASSES) if num_classes == len(CLASSES) else None,
            "content_hash": meta.get("content_hash"),
            "training_mode": (card.get("training") or {}).get("mode"), "checkpoint": Path(checkpoint).name}
    props["paif"] = json.dumps(info, default=str)
    return props


def _declare_shapes(proto: Any, spec: dict[str, dict[str, Any]]) -> None:
    """Write the documented shapes into the graph's inputs and outputs: named dynamic dimensions (batch, height,
    width) and fixed channel counts (the tracer leaves some, e.g. the number of classes, symbolic)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec[value.name]["shape"]):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def export_onnx(checkpoint: str | Path, out: str | Path, part: str = "full", opset: int = DEFAULT_OPSET
                ) -> dict[str, Any]:
    """Write ``out`` (atomically) from ``checkpoint``; returns ``{"out", "part", "opset", "outputs", "metadata"}``.

    Raises:
        CheckpointError: an unreadable checkpoint; ImportError (with the pip command) when ``onnx`` is missing.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx package: pip install onnx onnxruntime "
                          "(or pip install -e '.[dev]')") from exc
    import io

    if part not in PARTS:
        raise ValueError(f"--part: expected one of {PARTS}, got {part!r}")
    model, meta = load_model(checkpoint, map_location="cpu")
    meta["content_hash"] = content_hash(model.state_dict())  # the same as the card's (weights only)
    wrapper = ExportModel(model, part).eval()
    h, w = EXAMPLE_SIZE
    example = (torch.rand(1, 1, h, w), torch.rand(1, 3, h, w))
    dims = {0: "batch", 2: "height", 3: "width"}
    names = wrapper.output_names
    buffer = io.BytesIO()
    with plain_ops(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks in Python (they hold for any size)
        torch.onnx.export(wrapper, example, buffer, input_names=list(INPUTS), output_names=names,
                          dynamic_axes={n: dims for n in (*INPUTS, *names)}, opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    _declare_shapes(proto, io_spec(part, int(meta["segmenter"]["num_classes"])))
    props = _metadata(meta, part, opset, str(checkpoint))
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"PAIF fusion{' + segmentation' if part == 'full' else ''} model exported from {Path(checkpoint).name}"
    onnx.checker.check_model(proto)
    atomic_write_bytes(proto.SerializeToString(), out)
    log.info("wrote %s (part %s, opset %d, outputs %s)", out, part, opset, names)
    return {"out": str(out), "part": part, "opset": opset, "outputs": names, "metadata": props}


def verify(onnx_path: str | Path, checkpoint: str | Path, sizes: Sequence[tuple[int, int, int]] = ((1, 64, 80), (2, 45, 71)),
           seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per output between onnxruntime and PyTorch on random inputs of ``sizes``
    ((batch, height, width) each)."""
    import onnxruntime as ort

    model, _ = load_model(checkpoint, map_location="cpu")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    part = "fusion" if names == ["fused_rgb"] else "full"
    ref_model = ExportModel(model, part).eval()
    gen = torch.Generator().manual_seed(seed)
    worst = {n: 0.0 for n in names}
    for b, h, w in sizes:
        ir, vis = torch.rand(b, 1, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = ref_model(ir, vis)
        ref = [ref] if part == "fusion" else list(ref)
        got = session.run(names, {"ir": ir.numpy(), "vis": vis.numpy()})
        for n, r, g in zip(names, ref, got):
            worst[n] = max(worst[n], float((torch.from_numpy(g) - r).abs().max()))
    return worst


def main(argv: Sequence[str] | None = None, prog: str = "python trainer/export_onnx.py") -> int:
    """Entry point; returns the exit code (0 done, 2 bad input, 1 --verify above --tolerance)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Usage::" + __doc__.split("Usage::")[1].split("The graph")[0])
    p.add_argument("--checkpoint", required=True, help="PAIF checkpoint (.pt) or its .safetensors export")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--part", choices=PARTS, default="full", help="fusion: fused_rgb only; full: + logits")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--verify", action="store_true", help="compare with PyTorch in onnxruntime (random inputs)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference for --verify")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = export_onnx(args.checkpoint, args.out, args.part, args.opset)
    except (CheckpointError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']}: inputs ir, vis -> {', '.join(result['outputs'])} (dynamic batch, height, width)")
    if args.verify:
        diffs = verify(args.out, args.checkpoint)
        print("onnxruntime vs PyTorch, largest |difference|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if max(diffs.values()) > args.tolerance:
            print(f"error: difference above --tolerance {args.tolerance}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
