"""The decomposition on the fused C++ kernels (search_space/csrc/guided_decompose.cpp, search_space/cpp_ext.py):
forward and gradients against the brute-force guided-filter oracle, gradcheck in float64, the PAIF_NO_CPP
fallback, a build failure that falls back with one warning, and a whole ``paif`` model with and without it."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from search_space import cpp_ext
from search_space import decompose as dec
from search_space.decompose import GuidedDecomposition, decompose_fused, guidance_from_features, guided_filter_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _needs_extension(extension):
    """Every test here is skipped, with the reason, when the kernels cannot be built (conftest ``extension``)."""
    return extension


def _oracle(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps, radius: int) -> torch.Tensor:
    """The published decomposition written out: brute-force guided filters, then the unfolded 4C->C conv."""
    guide = guidance_from_features(x)
    lows = [guided_filter_reference(guide, x, e, radius) for e in eps]
    maps = torch.cat([*lows, *(x - low for low in lows)], 1)
    return F.conv2d(maps, weight.reshape(weight.shape[0], -1, 1, 1), bias)


def _inputs(shape: tuple[int, ...], c_out: int, n_eps: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(c_out, 2 * n_eps * shape[1], generator=g, dtype=dtype).requires_grad_(True)
    bias = torch.randn(c_out, generator=g, dtype=dtype).requires_grad_(True)
    return x, weight, bias


# odd sizes, images smaller than the 9x9 window (1 to 3 pixels), tall images (the running column sum is
# recomputed every 32 rows), batch 2, one and two eps, radius 4 and 2
CASES = [((1, 3, 7, 9), 4), ((2, 3, 5, 4), 4), ((1, 2, 3, 2), 4), ((1, 4, 1, 11), 4), ((1, 2, 70, 9), 4),
         ((2, 5, 13, 17), 2)]


@pytest.mark.parametrize("shape,radius", CASES)
@pytest.mark.parametrize("eps", [(1e-2, 1e-3), (1e-2,)])
def test_cpp_matches_brute_force_oracle_float64(shape: tuple[int, ...], radius: int, eps: tuple[float, ...]) -> None:
    x, weight, bias = _inputs(shape, 3, len(eps), torch.float64, seed=sum(shape))
    out = decompose_fused(x, weight, bias, eps, radius, backend="cpp")
    expected = _oracle(x, weight, bias, eps, radius)
    torch.testing.assert_close(out, expected, atol=1e-11, rtol=0)
    w = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad((out * w).sum(), (x, weight, bias)),
                         torch.autograd.grad((expected * w).sum(), (x, weight, bias))):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("shape,radius", [((1, 3, 34, 13), 4), ((2, 3, 6, 5), 4), ((1, 2, 35, 8), 2)])
def test_cpp_float32_matches_float64_oracle(shape: tuple[int, ...], radius: int) -> None:
    """float32 runs other instantiations than float64: r = 4 compiled in, other radii at run time."""
    x64, w64, b64 = _inputs(shape, 4, 2, torch.float64, seed=5)
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (x64, w64, b64))
    out = decompose_fused(x32, w32, b32, (1e-3, 1e-4), radius, backend="cpp")
    expected = _oracle(x64, w64, b64, (1e-3, 1e-4), radius)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(expected)
    got = torch.autograd.grad((out * w.float()).sum(), (x32, w32, b32))
    want = torch.autograd.grad((expected * w).sum(), (x64, w64, b64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=2e-3)


def test_cpp_equals_torch_path_float32() -> None:
    torch.manual_seed(3)
    mod = GuidedDecomposition(6)
    x = torch.randn(2, 6, 33, 41)
    args = (mod.reduce.weight, mod.reduce.bias, mod.eps, mod.radius)
    torch.testing.assert_close(decompose_fused(x, *args, backend="cpp"), decompose_fused(x, *args, backend="torch"),
                               atol=2e-5, rtol=1e-5)


def test_cpp_gradcheck_float64() -> None:
    x, weight, bias = _inputs((2, 3, 7, 9), 3, 2, torch.float64, seed=11)
    assert torch.autograd.gradcheck(lambda *a: decompose_fused(*a, (1e-2, 1e-3), 4, backend="cpp"), (x, weight, bias))
    x1, w1, _ = _inputs((1, 2, 10, 6), 2, 1, torch.float64, seed=12)
    assert torch.autograd.gradcheck(lambda p, wt: decompose_fused(p, wt, None, (1e-2,), 2, backend="cpp"), (x1, w1))


def test_cpp_partial_gradients() -> None:
    """Only x (an attack) or only the weights asked for: the same numbers as the full backward."""
    x, weight, bias = _inputs((1, 3, 9, 11), 2, 2, torch.float64, seed=13)
    full = torch.autograd.grad(decompose_fused(x, weight, bias, backend="cpp").sum(), (x, weight, bias))
    (gx,) = torch.autograd.grad(decompose_fused(x, weight.detach(), bias.detach(), backend="cpp").sum(), (x,))
    gw, gb = torch.autograd.grad(decompose_fused(x.detach(), weight, bias, backend="cpp").sum(), (weight, bias))
    for a, b in zip(full, (gx, gw, gb)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_module_uses_cpp_by_default_and_no_cpp_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    mod = GuidedDecomposition(5)
    x = torch.randn(1, 5, 12, 14, requires_grad=True)
    calls = []
    real_apply = dec._DecompositionCppFn.apply
    monkeypatch.setattr(dec._DecompositionCppFn, "apply", lambda *a: calls.append(1) or real_apply(*a))
    with_cpp = mod(x)
    g_cpp = torch.autograd.grad(with_cpp.square().sum(), (x, mod.reduce.weight))
    assert calls == [1]
    monkeypatch.setenv("PAIF_NO_CPP", "1")
    assert not dec.cpp_usable(x)
    without = mod(x)
    g_torch = torch.autograd.grad(without.square().sum(), (x, mod.reduce.weight))
    assert calls == [1]
    torch.testing.assert_close(with_cpp, without, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_cpp, g_torch):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="backend 'cpp'.*PAIF_NO_CPP"):
        decompose_fused(x, mod.reduce.weight, mod.reduce.bias, backend="cpp")


def test_paif_model_forward_backward_same_with_and_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    from search_space.pipeline import build_model
    from trainer.checkpoint import resolve_genotype

    torch.manual_seed(0)
    model = build_model(resolve_genotype("paif", channels=8), segmenter="b0").train()
    g = torch.Generator().manual_seed(1)
    ir, vis = torch.rand(2, 1, 32, 40, generator=g), torch.rand(2, 3, 32, 40, generator=g)

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # SegFormer's dropout draws the same masks in both runs
        irg, visg = ir.clone().requires_grad_(True), vis.clone().requires_grad_(True)
        out = model(irg, visg)
        (out.logits.square().mean() + out.fused_y.mean()).backward()
        grads = [p.grad for p in model.fusion.parameters()] + [irg.grad, visg.grad]
        return [t.detach() for t in out], grads

    outs_cpp, grads_cpp = run()
    monkeypatch.setenv("PAIF_NO_CPP", "1")
    outs_torch, grads_torch = run()
    for a, b in zip(outs_cpp, outs_torch):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_cpp, grads_torch):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_cpp_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected backend"):
        decompose_fused(torch.zeros(1, 2, 4, 4), torch.zeros(2, 8), None, backend="fast")
    with pytest.raises(ValueError, match="backend 'cpp' needs a CPU float tensor"):
        decompose_fused(torch.zeros(1, 2, 4, 4, dtype=torch.float16), torch.zeros(2, 8, dtype=torch.float16), None,
                        backend="cpp")


def test_build_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken source\n")
    monkeypatch.setattr(cpp_ext, "SOURCE", broken)
    monkeypatch.setattr(cpp_ext, "_state", {})
    monkeypatch.setenv("PAIF_EXT_DIR", str(tmp_path / "ext"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpp_ext.load_extension() is None
        assert cpp_ext.load_extension() is None
        x, weight = torch.randn(1, 2, 6, 7, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
        out = decompose_fused(x, weight, None, (1e-2, 1e-3), 4)  # auto: the PyTorch path
    built = [w for w in caught if issubclass(w.category, RuntimeWarning) and "could not be built" in str(w.message)]
    assert len(built) == 1 and "deliberately broken" in cpp_ext.failure()
    torch.testing.assert_close(out, _oracle(x, weight, None, (1e-2, 1e-3), 4), atol=1e-11, rtol=0)


# The race is the lock's, not the kernels': a small pybind11 source (no torch headers) builds in seconds where the
# real one takes ~65 s; the real source's build is what `make install` runs, and the other tests here load it.
_SMALL_SOURCE = """
#include <pybind11/pybind11.h>
static double weighted_sum(double a, double b) { return 0.25 * a + 0.75 * b; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("weighted_sum", &weighted_sum); }
"""

_BUILD_AND_RUN = """
import sys
from pathlib import Path
from search_space import cpp_ext
cpp_ext.SOURCE = Path(sys.argv[1])
module = cpp_ext.load_extension()
assert module is not None, cpp_ext.failure()
print(module.__file__, repr(module.weighted_sum(2.0, 6.0)))
"""


@pytest.mark.slow
def test_two_processes_building_at_once(tmp_path: Path) -> None:
    """Two fresh processes build into an empty cache at the same time: one builds, the other waits for it (the
    flock), both load the same module file and compute the same number."""
    source = tmp_path / "small.cpp"
    source.write_text(_SMALL_SOURCE)
    ext = tmp_path / "ext"
    env = {**os.environ, "PAIF_EXT_DIR": str(ext), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PAIF_NO_CPP", None)
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN, str(source)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    assert results[0][0] == results[1][0] and results[0][0].split()[-1] == "5.0"
    builds = [d for d in ext.iterdir() if d.is_dir()]
    assert len(builds) == 1 and len(list(builds[0].glob("*.so"))) == 1 and not (builds[0] / "lock").exists()
    assert results[0][0].split()[0].startswith(str(builds[0]))


def test_the_onednn_probe_leaves_the_global_random_stream_alone():
    """Its first call comes at the first decomposition of a process: drawing from the global generator there shifted
    every later random number, and a resumed run (a new process) ended with other weights than an uninterrupted one."""
    from search_space import decompose

    decompose._ONEDNN.clear()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    decompose._onednn_linear_ok()
    assert "ok" in decompose._ONEDNN
    assert torch.equal(torch.rand(4), expected)


def test_main_reports_a_failed_build_and_exits_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    """`python -m search_space.cpp_ext` (make install runs it): a source that does not compile is one line naming the
    compiler's error, exit 0 (the PyTorch path is used); PAIF_NO_CPP=1 says that it is off."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken source\n")
    monkeypatch.setattr(cpp_ext, "SOURCE", broken)
    monkeypatch.setattr(cpp_ext, "_state", {})
    monkeypatch.setenv("PAIF_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("PAIF_NO_CPP", raising=False)
    assert cpp_ext.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("search_space.cpp_ext: not built (") and "deliberately broken" in out
    assert "pure-PyTorch" in out and len(out.strip().splitlines()) == 1
    monkeypatch.setenv("PAIF_NO_CPP", "1")
    assert cpp_ext.main() == 0
    assert "PAIF_NO_CPP is set" in capsys.readouterr().out


def test_the_build_runs_the_pip_ninja_whatever_ninja_path_finds_first(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Another ninja first on PATH (the system's, when .venv/bin is not on it) must not be used: two ninja versions do
    not accept each other's build logs, so alternating between them recompiled the kernels in every other process."""
    import shutil

    ninja = pytest.importorskip("ninja")
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\nexit 1\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert shutil.which("ninja") == str(other)
    with cpp_ext._ninja_on_path():
        assert Path(shutil.which("ninja")).parent == Path(ninja.BIN_DIR)
    assert shutil.which("ninja") == str(other)
