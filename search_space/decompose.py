"""Guided-filter decomposition of feature maps into low and high frequency (PAIF, Liu et al., ACM MM 2023).

Guided filter: He, Sun and Tang, "Guided Image Filtering", ECCV 2010 / TPAMI 2013.

Conventions (the same in the fast path and the plain oracle):

* The box filter is the **mean over the valid pixels** of the (2r+1)×(2r+1) window (He et al.'s
  ``N = box(ones)`` normalisation): near a border the window is clipped to the image and divided by the number
  of pixels it really covers. No padding value ever enters a mean. (kornia's ``guided_blur`` reflects
  instead; the bench compares the two for speed only.)
* The fast path (:func:`guided_filter`) is an autograd function whose backward is itself a few box filters
  (the box mean is self-adjoint up to its normalisation). Its box filter is a separable direct window sum by
  doubling (4 additions per axis for r = 4) on one zero-padded buffer per step, every map of a step at once;
  the elementwise work writes into preallocated buffers. Measured against the integral-image (``cumsum``)
  autograd version it replaced (kept as :func:`guided_filter_autograd` / :func:`box_filter_cumsum`):
  ``python bench/decompose_speed.py`` (README, Benchmarks). Inputs are centred per image and channel first.
* :class:`GuidedDecomposition` (eager) runs filter and 1×1 reduce as one autograd function with the conv moved
  inside the filter (:func:`decompose_fused`; exact by linearity): half the box work of the second pass and of
  the backward's first, and 5C saved maps instead of 10C. Box passes filter cache-sized chunks of maps.
* The guidance of a feature map ``x`` (B, C, H, W) is ``max_c x − min_c x`` (B, 1, H, W); every channel of
  ``x`` is filtered with that one guidance.
* Interpretation of "eps 1e-3 and 1e-4" (DESIGN §4): each modality is filtered with **both** eps values;
  ``low_e = GF_e(x)``, ``high_e = x − low_e``; the four maps ``[low_1e-3, low_1e-4, high_1e-3, high_1e-4]``
  (4C channels, the published order) are reduced by a 1×1 conv to C. IR and VIS each have their own :class:`GuidedDecomposition`.
  The window statistics are shared by both eps, so the second eps costs one extra box pass of 2C maps only.
* The filter runs in float32 with autocast disabled (cumulative sums in bf16 would lose all precision).
* **Plain-ops path** (:func:`plain_ops`, :func:`uses_plain_ops`): under ``torch.compile``, during
  ``torch.onnx.export`` and inside ``with plain_ops():`` the decomposition is written with functional torch ops
  only (:func:`box_filter_shifted`, then the 1×1 conv on ``[x, low_1, low_2]``): no custom autograd function
  and no preallocated buffers, so exporters and compilers see every op and keep the height and width symbolic.
  ``trainer/export_onnx.py`` exports inside ``plain_ops()`` (the choice is explicit, not left to the exporter).
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from search_space import cpp_ext

__all__ = [
    "box_filter", "box_filter_cumsum", "cpp_usable", "decompose_fused", "box_filter_reference", "box_filter_shifted", "guided_filter", "guided_filter_autograd",
    "guided_filter_reference",
    "guidance_from_features", "GuidedDecomposition", "RADIUS", "EPS", "plain_ops", "uses_plain_ops",
]

RADIUS = 4
EPS: tuple[float, float] = (1e-3, 1e-4)

_plain = threading.local()


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Within this block (this thread) the decomposition uses functional torch ops only (see the module
    docstring): the path for exporters that trace the graph (ONNX) and must keep sizes symbolic."""
    depth = getattr(_plain, "depth", 0)
    _plain.depth = depth + 1
    try:
        yield
    finally:
        _plain.depth = depth


def uses_plain_ops() -> bool:
    """True inside :func:`plain_ops`, under ``torch.compile`` and during ``torch.onnx.export``."""
    if getattr(_plain, "depth", 0) > 0 or torch.compiler.is_compiling():
        return True
    onnx = sys.modules.get("torch.onnx")  # never imported: cannot be exporting (and importing it costs 0.3 s)
    return onnx is not None and bool(onnx.is_in_onnx_export())


def _check_4d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected a tensor of shape (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _window_counts(n: int, r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Number of valid pixels of a radius-r window centred at 0..n-1 along one axis, shape (n,)."""
    i = torch.arange(n, device=device)
    return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(dtype)


def _inv_counts(h: int, w: int, r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 / (number of valid pixels of each clipped window), shape (H, W): He et al.'s ``1 / box(ones)``."""
    return (_window_counts(h, r, device, dtype)[:, None] * _window_counts(w, r, device, dtype)).reciprocal_()


def _window_sum_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sum over a radius-r window along ``dim`` (-1 or -2), zero outside the image, via a cumulative sum."""
    pad = (0, 0, r + 1, r) if dim == -2 else (r + 1, r)
    c = F.pad(x, pad).cumsum(dim)
    n = x.shape[dim]
    return c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)


def _shaped(flat: torch.Tensor, like: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A contiguous view of the 1-D ``flat`` with ``like``'s shape except ``size`` along ``dim``."""
    shape = list(like.shape)
    shape[dim] = size
    return flat[:math.prod(shape)].view(shape)


def _sliding_sum(x: torch.Tensor, n: int, dim: int, out: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
    """Sums of ``n`` consecutive entries along ``dim``: size L -> L - n + 1, written into ``out``.

    Doubling: ``s_2k[i] = s_k[i] + s_k[i + k]``, then the blocks of the binary digits of ``n`` are added, so
    a 9-wide window costs 4 additions instead of 8. ``scratch`` holds two flat buffers of at least
    ``x.numel()`` elements, ping-ponged; the blocks of ``n`` are kept apart from the buffer being overwritten.
    Direct window sums (no running sum), so there is no drift in float32.
    """
    m = x.shape[dim] - n + 1
    parts, offset, span, cur = [], 0, 1, x
    free = list(scratch)
    while True:
        if n & span:
            parts.append(cur.narrow(dim, offset, m))
            offset += span
        if 2 * span > n:
            break
        if not free:  # both buffers hold blocks still needed (n with many binary digits): use a fresh one
            free.append(torch.empty_like(scratch[0]))
        k = cur.shape[dim] - span
        nxt = _shaped(free.pop(0), cur, dim, k)
        torch.add(cur.narrow(dim, 0, k), cur.narrow(dim, span, k), out=nxt)
        if cur is not x and (not parts or parts[-1].untyped_storage().data_ptr() != cur.untyped_storage().data_ptr()):
            free.append(cur.view(-1))  # cur is not a kept block: its buffer is free again
        cur, span = nxt, 2 * span
    if len(parts) == 1:
        return out.copy_(parts[0])
    torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out.add_(part)
    return out


_CHUNK_BYTES = 1 << 20
"""Bytes of padded input filtered per chunk by :func:`_box_sum_padded`: the doubling passes of one chunk then
stay in the core's L2 cache instead of streaming every pass through memory (1.5× faster on this CPU)."""


def _box_sum_padded(padded: torch.Tensor, r: int) -> torch.Tensor:
    """Window sums of a zero-padded (B, K, H + 2r, W + 2r) tensor: (B, K, H, W), contiguous.

    The zero border makes every window the sum over the valid (unpadded) pixels only. The B·K maps are
    filtered a few at a time (about :data:`_CHUNK_BYTES` each), so the intermediate passes stay in cache.
    """
    n = 2 * r + 1
    b, k, hp, wp = padded.shape
    h, w = hp - 2 * r, wp - 2 * r
    maps = padded.reshape(b * k, hp, wp)  # a view: the buffers are allocated contiguous
    per = max(1, min(b * k, _CHUNK_BYTES // max(1, hp * wp * padded.element_size())))
    out = padded.new_empty(b * k, h, w)
    scratch = (padded.new_empty(per * hp * wp), padded.new_empty(per * hp * wp))
    vertical = padded.new_empty(per * h * wp)
    for i in range(0, b * k, per):
        j = min(i + per, b * k)
        v = vertical[:(j - i) * h * wp].view(j - i, h, wp)
        _sliding_sum(maps[i:j], n, -2, v, scratch)
        _sliding_sum(v, n, -1, out[i:j], scratch)
    return out.view(b, k, h, w)


def _zero_padded(b: int, k: int, h: int, w: int, r: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero (B, K, H + 2r, W + 2r) buffer and its (B, K, H, W) interior view, to be written with ``out=``."""
    padded = like.new_zeros(b, k, h + 2 * r, w + 2 * r)
    return padded, padded[..., r:r + h, r:r + w]


def box_filter(x: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """Mean over the valid pixels of each (2r+1)×(2r+1) window (He et al.'s ``box(x) / box(ones)``).

    Separable direct window sums by doubling on a zero-padded copy (about 8 additions per pixel for r = 4),
    then one multiplication by the inverse window counts.

    Args:
        x: (B, C, H, W) float.
        radius: r >= 0.
    Returns:
        (B, C, H, W), same dtype as ``x``.
    """
    _check_4d(x, "box_filter")
    if radius < 0:
        raise ValueError(f"box_filter: expected radius >= 0, got {radius}")
    if radius == 0:
        return x
    b, c, h, w = x.shape
    padded, inner = _zero_padded(b, c, h, w, radius, x)
    inner.copy_(x)
    return _box_sum_padded(padded, radius).mul_(_inv_counts(h, w, radius, x.device, x.dtype))


def box_filter_cumsum(x: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """The integral-image (``cumsum``) box filter used before issue 10; same result as :func:`box_filter`.

    Kept as the in-run baseline of ``bench/decompose_speed.py`` and for :func:`guided_filter_autograd`.
    """
    _check_4d(x, "box_filter_cumsum")
    if radius < 0:
        raise ValueError(f"box_filter_cumsum: expected radius >= 0, got {radius}")
    if radius == 0:
        return x
    h, w = x.shape[-2:]
    s = _window_sum_1d(_window_sum_1d(x, radius, -2), radius, -1)
    count = _window_counts(h, radius, x.device, x.dtype)[:, None] * _window_counts(w, radius, x.device, x.dtype)
    return s / count


def box_filter_shifted(x: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """:func:`box_filter` as plain functional ops (sum of 2r+1 shifted slices per axis of a zero-padded copy):
    the form ``torch.compile`` fuses into one loop per axis; used by :func:`guided_filter` while compiling."""
    _check_4d(x, "box_filter_shifted")
    h, w = x.shape[-2:]
    n = 2 * radius + 1
    xp = F.pad(x, (0, 0, radius, radius))
    s = sum(xp[..., d:d + h, :] for d in range(n))
    sp = F.pad(s, (radius, radius))
    s = sum(sp[..., d:d + w] for d in range(n))
    return s * _inv_counts(h, w, radius, x.device, x.dtype)


def box_filter_reference(x: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """Plain oracle of :func:`box_filter`: explicit window sums pixel by pixel (slow; tests only)."""
    _check_4d(x, "box_filter_reference")
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[..., max(i - radius, 0): i + radius + 1, max(j - radius, 0): j + radius + 1]
            out[..., i, j] = win.sum(dim=(-2, -1)) / (win.shape[-2] * win.shape[-1])
    return out


def guidance_from_features(x: torch.Tensor) -> torch.Tensor:
    """Guidance map ``max_c x − min_c x``: (B, C, H, W) -> (B, 1, H, W), >= 0."""
    _check_4d(x, "guidance_from_features")
    return x.amax(1, keepdim=True) - x.amin(1, keepdim=True)


def _guided_filter_impl(guide: torch.Tensor, x: torch.Tensor, eps: Sequence[float], radius: int, box) -> list[torch.Tensor]:
    """Guided filter of every channel of ``x`` with the single-channel ``guide``, once per eps (plain autograd)."""
    c = x.shape[1]
    guide = guide - guide.mean(dim=(2, 3), keepdim=True)
    x_mean = x.mean(dim=(2, 3), keepdim=True)
    xc = x - x_mean
    stats = box(torch.cat((guide, guide * guide, xc, guide * xc), 1), radius)
    mean_i, mean_ii, mean_p, mean_ip = stats[:, :1], stats[:, 1:2], stats[:, 2:2 + c], stats[:, 2 + c:]
    var_i = mean_ii - mean_i * mean_i
    cov_ip = mean_ip - mean_i * mean_p
    coeffs = []
    for e in eps:
        a = cov_ip / (var_i + e)
        coeffs += [a, mean_p - a * mean_i]
    smoothed = box(torch.cat(coeffs, 1), radius)
    outs = []
    for k in range(len(eps)):
        mean_a, mean_b = smoothed[:, 2 * k * c:(2 * k + 1) * c], smoothed[:, (2 * k + 1) * c:(2 * k + 2) * c]
        outs.append(mean_a * guide + mean_b + x_mean)
    return outs


def _window_means(x: torch.Tensor, x_mean: torch.Tensor, gi: torch.Tensor, r: int, inv: torch.Tensor
                  ) -> torch.Tensor:
    """Window means of ``[p, I·p, I, I²]`` (B, 2C+2, H, W) with ``p = x − mean(x)`` and the centred guide ``I``,
    from one zero-padded buffer and one box pass (the first statistics pass of the guided filter)."""
    b, c, h, w = x.shape
    padded, inner = _zero_padded(b, 2 * c + 2, h, w, r, x)
    torch.sub(x, x_mean, out=inner[:, :c])
    torch.mul(inner[:, :c], gi, out=inner[:, c:2 * c])
    inner[:, 2 * c:2 * c + 1].copy_(gi)
    torch.mul(gi, gi, out=inner[:, 2 * c + 1:])
    return _box_sum_padded(padded, r).mul_(inv)


class _GuidedFilterFn(torch.autograd.Function):
    """The guided filter with a hand-written backward made of box filters (the box mean is self-adjoint up to
    its normalisation: ``box^T g = window_sum(g / count)``).

    Forward, per image (``I`` the centred guide, ``p = x − mean(x)``; means over the clipped windows)::

        mI, mII, mp, mIp = box(I), box(I²), box(p), box(I·p)
        var = mII − mI², cov = mIp − mI·mp
        a_e = cov / (var + e), b_e = mp − a_e·mI           (per eps e)
        q_e = box(a_e)·I + box(b_e) + mean(x)

    Backward (``G_e`` the gradient of ``q_e``, sums over eps and, for the single-channel guide, over channels)::

        ga_e = box^T(G_e·I) − box^T(G_e)·mI,   gcov_e = ga_e / (var + e),   gvar = −Σ_e Σ_c gcov_e·a_e
        gmp  = Σ_e box^T(G_e) − mI·Σ_e gcov_e,  gmIp = Σ_e gcov_e,  gmII = gvar
        gmI  = −Σ_e Σ_c box^T(G_e)·a_e − Σ_c gmIp·mp − 2·mI·gvar
        dx   = box^T(gmp) + I·box^T(gmIp)
        dI   = Σ_e Σ_c G_e·box(a_e) + box^T(gmI) + 2·I·box^T(gmII) + Σ_c p·box^T(gmIp)

    The centring drops out of both gradients (the filter commutes with adding a constant to ``x`` and ignores
    one added to the guide). Every box pass filters all maps of a step at once (one zero-padded buffer), and
    the elementwise steps write into preallocated buffers: the forward keeps 4C + 4C + 2C maps for the
    backward (the coefficients, their box means, ``mp`` and the input), where plain autograd kept about 20C.
    Once differentiable (no double backward; first-order DARTS and the attacks need none).
    """

    @staticmethod
    def forward(ctx, guide: torch.Tensor, x: torch.Tensor, eps: tuple[float, ...], radius: int
                ) -> tuple[torch.Tensor, ...]:
        b, c, h, w = x.shape
        r, n_eps = radius, len(eps)
        inv = _inv_counts(h, w, r, x.device, x.dtype)
        gi = guide - guide.mean(dim=(2, 3), keepdim=True)
        x_mean = x.mean(dim=(2, 3), keepdim=True)
        stats = _window_means(x, x_mean, gi, r, inv)                   # [p, I·p, I, I²] window means
        mp, mip, mi, mii = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:2 * c + 1], stats[:, 2 * c + 1:]
        var = mii - mi * mi
        cov = mip.addcmul_(mi, mp, value=-1.0)
        coef_pad, coef = _zero_padded(b, 2 * n_eps * c, h, w, r, x)     # [a_1, b_1, a_2, b_2, ...]
        for k, e in enumerate(eps):
            a_k, b_k = coef[:, 2 * k * c:(2 * k + 1) * c], coef[:, (2 * k + 1) * c:(2 * k + 2) * c]
            torch.div(cov, var + e, out=a_k)
            torch.addcmul(mp, a_k, mi, value=-1.0, out=b_k)
        smooth = _box_sum_padded(coef_pad, r)                             # window sums of [a_k, b_k]
        outs = []
        for k in range(n_eps):
            sa, sb = smooth[:, 2 * k * c:(2 * k + 1) * c], smooth[:, (2 * k + 1) * c:(2 * k + 2) * c]
            outs.append(torch.addcmul(sb, sa, gi).mul_(inv).add_(x_mean))
        ctx.eps, ctx.radius = tuple(eps), r
        ctx.save_for_backward(x, gi, x_mean, mi, var, mp, coef_pad, smooth)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        x, gi, x_mean, mi, var, mp, coef_pad, smooth = ctx.saved_tensors
        eps, r = ctx.eps, ctx.radius
        b, c, h, w = x.shape
        inv = _inv_counts(h, w, r, x.device, x.dtype)
        coef = coef_pad[..., r:r + h, r:r + w]
        live = [k for k, g in enumerate(grads) if g is not None]
        need_guide = ctx.needs_input_grad[0]
        # box^T of [G_e·I, G_e] for every eps with a gradient
        up_pad, up = _zero_padded(b, 2 * len(live) * c, h, w, r, x)
        for j, k in enumerate(live):
            g_b = torch.mul(grads[k], inv, out=up[:, (2 * j + 1) * c:(2 * j + 2) * c])
            torch.mul(g_b, gi, out=up[:, 2 * j * c:(2 * j + 1) * c])
        back = _box_sum_padded(up_pad, r)
        del up_pad, up
        down_pad, down = _zero_padded(b, 2 * c + 2, h, w, r, x)          # [gmp, gmIp, gmI, gmII] · inv
        gmp, gmip, gmi, gmii = down[:, :c], down[:, c:2 * c], down[:, 2 * c:2 * c + 1], down[:, 2 * c + 1:]
        gvar = torch.zeros_like(mi)
        gmi_acc = torch.zeros_like(mi)
        gi_direct = torch.zeros_like(mi)
        for j, k in enumerate(live):
            ga, gb = back[:, 2 * j * c:(2 * j + 1) * c], back[:, (2 * j + 1) * c:(2 * j + 2) * c]
            a_k = coef[:, 2 * k * c:(2 * k + 1) * c]
            gcov = ga.addcmul_(gb, mi, value=-1.0).div_(var + eps[k])
            gvar.sub_((gcov * a_k).sum(1, keepdim=True))
            if need_guide:
                gmi_acc.sub_((gb * a_k).sum(1, keepdim=True))
                sa = smooth[:, 2 * k * c:(2 * k + 1) * c]
                gi_direct.add_((grads[k] * sa).sum(1, keepdim=True))
            if j == 0:
                gmp.copy_(gb)
                gmip.copy_(gcov)
            else:
                gmp.add_(gb)
                gmip.add_(gcov)
        gmp.addcmul_(mi, gmip, value=-1.0)
        if need_guide:
            gmi_acc.sub_((gmip * mp).sum(1, keepdim=True)).addcmul_(mi, gvar, value=-2.0)
            torch.mul(gmi_acc, inv, out=gmi)
            torch.mul(gvar, inv, out=gmii)
        gmp.mul_(inv)
        gmip.mul_(inv)
        del back
        bt = _box_sum_padded(down_pad, r)
        bt_mp, bt_mip, bt_mi, bt_mii = bt[:, :c], bt[:, c:2 * c], bt[:, 2 * c:2 * c + 1], bt[:, 2 * c + 1:]
        dx = torch.addcmul(bt_mp, gi, bt_mip) if ctx.needs_input_grad[1] else None
        dguide = None
        if need_guide:
            p_dot = bt_mip.mul_(x - x_mean).sum(1, keepdim=True)
            dguide = gi_direct.mul_(inv).add_(bt_mi).add_(p_dot).addcmul_(gi, bt_mii, value=2.0)
        return dguide, dx, None, None


def guided_filter(guide: torch.Tensor, x: torch.Tensor, eps: float | Sequence[float] = EPS,
                  radius: int = RADIUS) -> torch.Tensor | list[torch.Tensor]:
    """Guided filter (fast path): filter every channel of ``x`` with the single-channel ``guide``.

    An autograd function whose backward is itself a few box filters (:class:`_GuidedFilterFn`); the
    plain-autograd version is :func:`guided_filter_autograd`, the brute-force oracle
    :func:`guided_filter_reference`.

    Args:
        guide: (B, 1, H, W) float.
        x: (B, C, H, W) float, same dtype and device.
        eps: one regulariser, or a sequence (the window statistics are then shared).
        radius: window radius r (window 2r+1).
    Returns:
        (B, C, H, W) low-frequency part for one eps, or a list of them for a sequence of eps.
    """
    _check_inputs(guide, x, "guided_filter")
    many = not isinstance(eps, (int, float))
    eps_list = tuple(float(e) for e in eps) if many else (float(eps),)
    if uses_plain_ops():  # plain ops: inductor fuses them and derives the backward itself; exporters see them
        outs = _guided_filter_impl(guide, x, eps_list, radius, box_filter_shifted)
    elif radius == 0 or x.dtype != guide.dtype:
        outs = _guided_filter_impl(guide, x, eps_list, radius, box_filter_cumsum)
    else:
        outs = list(_GuidedFilterFn.apply(guide, x, eps_list, radius))
    return outs if many else outs[0]


def guided_filter_autograd(guide: torch.Tensor, x: torch.Tensor, eps: float | Sequence[float] = EPS,
                           radius: int = RADIUS) -> torch.Tensor | list[torch.Tensor]:
    """The guided filter before issue 10: the same algebra through plain autograd and the ``cumsum`` box
    filter (every intermediate saved). Same arguments and result as :func:`guided_filter`; kept as the
    in-run baseline of ``bench/decompose_speed.py`` and a second gradient oracle in the tests."""
    _check_inputs(guide, x, "guided_filter_autograd")
    many = not isinstance(eps, (int, float))
    outs = _guided_filter_impl(guide, x, list(eps) if many else [float(eps)], radius, box_filter_cumsum)
    return outs if many else outs[0]


def _check_inputs(guide: torch.Tensor, x: torch.Tensor, name: str) -> None:
    _check_4d(guide, f"{name} guide")
    _check_4d(x, f"{name} x")
    if guide.shape[1] != 1 or guide.shape[0] != x.shape[0] or guide.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{name}: expected guide (B, 1, H, W) matching x {tuple(x.shape)}, "
                         f"got {tuple(guide.shape)}")


def guided_filter_reference(guide: torch.Tensor, x: torch.Tensor, eps: float, radius: int = RADIUS) -> torch.Tensor:
    """Plain oracle: He et al.'s algorithm written out with :func:`box_filter_reference`, no centring."""
    mean_i = box_filter_reference(guide, radius)
    mean_p = box_filter_reference(x, radius)
    var_i = box_filter_reference(guide * guide, radius) - mean_i * mean_i
    cov_ip = box_filter_reference(guide * x, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_filter_reference(a, radius) * guide + box_filter_reference(b, radius)


def _mm(w: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """``w @ x3[i]`` for every i: (M, K) x (B, K, N) -> (B, M, N), one ``mm`` per image (no copies of ``x3``)."""
    out = x3.new_empty(x3.shape[0], w.shape[0], x3.shape[2])
    for i in range(x3.shape[0]):
        torch.mm(w, x3[i], out=out[i])
    return out


def _mm_nt(a3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """``Σ_i a3[i] @ b3[i]^T``: (B, M, N) x (B, K, N) -> (M, K) (a weight gradient summed over the batch)."""
    out = torch.mm(a3[0], b3[0].t())
    for i in range(1, a3.shape[0]):
        out.addmm_(a3[i], b3[i].t())
    return out


def _channel_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``max_c x, argmax_c x, min_c x, argmin_c x`` of (B, C, H, W), each (B, 1, H, W) (first index on ties).

    A running comparison over the channels: ``torch.max(x, 1)`` with indices is ~20× slower on CPU."""
    vmax, vmin = x[:, :1].clone(), x[:, :1].clone()
    imax = torch.zeros_like(vmax, dtype=torch.long)
    imin = torch.zeros_like(imax)
    for k in range(1, x.shape[1]):
        xk = x[:, k:k + 1]
        up, down = xk > vmax, xk < vmin
        imax.masked_fill_(up, k)
        imin.masked_fill_(down, k)
        torch.maximum(vmax, xk, out=vmax)
        torch.minimum(vmin, xk, out=vmin)
    return vmax, imax, vmin, imin


class _DecompositionFn(torch.autograd.Function):
    """The whole decomposition ``conv1x1([x, low_1, …, low_E])`` as one autograd function, with the 1×1 conv
    moved **inside** the guided filter (exact: the box mean is linear and ``I`` is one map for all channels).

    With ``V_e`` the folded weight of ``low_e``, ``Vs = Σ_e V_e``, ``Wx`` that of ``x`` (see
    :meth:`GuidedDecomposition.folded_weight`) and ``s_e = 1 / (var + e)``::

        Σ_e V_e·low_e = I·box(A) + box(B) + Vs·mean(x),   A = Σ_e s_e·(V_e·cov),   B = Vs·mp − mI·A
        out = Wx·x + I·box(A) + box(B) + Vs·mean(x) + bias

    so the second box pass filters 2·C_out maps instead of 2·E·C, the per-eps coefficient maps are never
    stored, and the backward's first box pass is 2·C_out maps too. The guide ``max_c x − min_c x`` is taken
    with its arg-max/arg-min, so its gradient is two ``scatter_add_`` into ``dx`` (no full-size masks). The
    1×1 convs are matrix products over (B, C, H·W) views. Backward (``G`` the gradient of ``out``)::

        gA = box^T(G·I) − mI·box^T(G),  gB = box^T(G),  T_e = V_e^T·gA,  gcov = Σ_e s_e·T_e
        gvar = −Σ_e s_e²·Σ_c cov·T_e,  gmp = Vs^T·gB − mI·gcov,  gmI = −Σ_o box^T(G)·A − Σ_c gcov·mp − 2·mI·gvar
        dx = Wx^T·G + box^T(gmp) + I·box^T(gcov) + scatter(dI),
        dI = Σ_o G·box(A) + box^T(gmI) + 2·I·box^T(gvar) + Σ_c p·box^T(gcov)
        gV_e = Σ (s_e·gA)·cov^T + gB·mp^T + ΣG·mean(x)^T,  gWx = Σ G·x^T,  gbias = Σ G

    Once differentiable (no double backward). Checked against the unfolded module and by ``gradcheck``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, wx: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                eps: tuple[float, ...], radius: int) -> torch.Tensor:
        x = x.contiguous()
        b, c, h, w = x.shape
        co, n_eps, r, hw = wx.shape[0], len(eps), radius, h * w
        inv = _inv_counts(h, w, r, x.device, x.dtype)
        if ctx.needs_input_grad[0]:  # the guide's gradient is scattered to the arg-max / arg-min channels
            vmax, imax, vmin, imin = _channel_extremes(x)
        else:  # no gradient to x (evaluation, weight-only): the fast reductions without indices
            vmax, vmin, imax, imin = x.amax(1, keepdim=True), x.amin(1, keepdim=True), None, None
        gi = vmax.sub_(vmin)
        gi.sub_(gi.mean(dim=(2, 3), keepdim=True))
        x_mean = x.mean(dim=(2, 3), keepdim=True)
        stats = _window_means(x, x_mean, gi, r, inv)                   # [p, I·p, I, I²] window means
        mp, mi, mii = stats[:, :c], stats[:, 2 * c:2 * c + 1], stats[:, 2 * c + 1:]
        cov = stats[:, c:2 * c].addcmul_(mi, mp, value=-1.0)
        var = mii.addcmul_(mi, mi, value=-1.0)
        s = torch.cat([(var + e).reciprocal_() for e in eps], 1)        # (B, E, H, W)
        v_e = v.view(n_eps, co, c)
        vs = v_e.sum(0)
        coef_pad, coef = _zero_padded(b, 2 * co, h, w, r, x)            # [A, B]
        a_sum, b_sum = coef[:, :co], coef[:, co:]
        y = _mm(v, cov.reshape(b, c, hw)).view(b, n_eps, co, h, w)
        torch.mul(y[:, 0], s[:, :1], out=a_sum)
        for k in range(1, n_eps):
            a_sum.addcmul_(y[:, k], s[:, k:k + 1])
        del y
        z = _mm(vs, mp.reshape(b, c, hw)).view(b, co, h, w)
        torch.addcmul(z, mi, a_sum, value=-1.0, out=b_sum)
        del z
        smooth = _box_sum_padded(coef_pad, r)                             # window sums [A, B]
        s_a, s_b = smooth[:, :co], smooth[:, co:]
        out = _mm(wx, x.view(b, c, hw)).view(b, co, h, w)
        out.add_(s_b.addcmul_(s_a, gi).mul_(inv))
        const = torch.matmul(vs, x_mean.view(b, c, 1)).view(b, co, 1, 1)
        out.add_(const if bias is None else const + bias.view(1, co, 1, 1))
        ctx.eps, ctx.radius, ctx.has_bias = tuple(eps), r, bias is not None
        ctx.save_for_backward(x, wx, v, gi, x_mean, imax, imin, stats, s, coef_pad, smooth)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, wx, v, gi, x_mean, imax, imin, stats, s, coef_pad, smooth = ctx.saved_tensors
        r, n_eps = ctx.radius, len(ctx.eps)
        b, c, h, w = x.shape
        co, hw = wx.shape[0], h * w
        inv = _inv_counts(h, w, r, x.device, x.dtype)
        g = grad.contiguous()
        mp, cov, mi, var = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:2 * c + 1], stats[:, 2 * c + 1:]
        a_sum = coef_pad[:, :co, r:r + h, r:r + w]
        s_a = smooth[:, :co]
        v_e = v.view(n_eps, co, c)
        vs = v_e.sum(0)
        up_pad, up = _zero_padded(b, 2 * co, h, w, r, x)                # [G·I, G] · inv
        g_inv = torch.mul(g, inv, out=up[:, co:])
        torch.mul(g_inv, gi, out=up[:, :co])
        back = _box_sum_padded(up_pad, r)
        del up_pad, up
        g_a, g_b = back[:, :co], back[:, co:]
        gmi = (g_b * a_sum).sum(1, keepdim=True).neg_()
        g_a.addcmul_(g_b, mi, value=-1.0)
        g_a3, g_b3 = g_a.reshape(b, co, hw), g_b.reshape(b, co, hw)
        if ctx.needs_input_grad[2]:
            gv = _mm_nt(g_b3, mp.reshape(b, c, hw))                                     # gVs from Z = Vs·mp
            gv.add_(g.sum(dim=(2, 3)).t() @ x_mean.view(b, c))                          # and from Vs·mean(x)
        gmp = _mm(vs.t(), g_b3).view(b, c, h, w)
        gcov = torch.zeros_like(mp)
        gvar = torch.zeros_like(mi)
        gv_e = []
        for k in range(n_eps):
            s_k = s[:, k:k + 1]
            t_k = _mm(v_e[k].t(), g_a3).view(b, c, h, w)
            gvar.sub_((t_k * cov).sum(1, keepdim=True).mul_(s_k).mul_(s_k))
            gcov.addcmul_(t_k, s_k)
            if ctx.needs_input_grad[2]:
                gv_e.append(_mm_nt((g_a * s_k).reshape(b, co, hw), cov.reshape(b, c, hw)).add_(gv))
        gmp.addcmul_(gcov, mi, value=-1.0)
        gmi.sub_((gcov * mp).sum(1, keepdim=True)).addcmul_(mi, gvar, value=-2.0)
        del back, g_a, g_b, g_a3, g_b3
        gwx = _mm_nt(g.view(b, co, hw), x.view(b, c, hw)) if ctx.needs_input_grad[1] else None
        gv = torch.cat(gv_e, 0) if ctx.needs_input_grad[2] else None
        gbias = g.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[0]:
            return None, gwx, gv, gbias, None, None
        down_pad, down = _zero_padded(b, 2 * c + 2, h, w, r, x)          # [gmp, gcov, gmI, gvar] · inv
        torch.mul(gmp, inv, out=down[:, :c])
        torch.mul(gcov, inv, out=down[:, c:2 * c])
        torch.mul(gmi, inv, out=down[:, 2 * c:2 * c + 1])
        torch.mul(gvar, inv, out=down[:, 2 * c + 1:])
        del gmp, gcov, gmi, gvar
        bt = _box_sum_padded(down_pad, r)
        del down_pad, down
        bt_mp, bt_cov, bt_mi, bt_var = bt[:, :c], bt[:, c:2 * c], bt[:, 2 * c:2 * c + 1], bt[:, 2 * c + 1:]
        dx = _mm(wx.t(), g.view(b, co, hw)).view(b, c, h, w)
        dx.add_(bt_mp).addcmul_(gi, bt_cov)
        d_guide = (g * s_a).sum(1, keepdim=True).mul_(inv).add_(bt_mi).addcmul_(gi, bt_var, value=2.0)
        d_guide.add_(bt_cov.mul_(x - x_mean).sum(1, keepdim=True))
        dx.scatter_add_(1, imax, d_guide).scatter_add_(1, imin, d_guide.neg_())
        return dx, gwx, gv, gbias, None, None


_ONEDNN: dict[str, bool] = {}


def _onednn_linear_ok() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` (oneDNN's matmul) runs here and agrees with ``torch.mm``
    (checked once). On AMD CPUs MKL's float32 GEMM takes its AVX2 path; oneDNN's uses AVX-512 (2× faster)."""
    if "ok" not in _ONEDNN:
        try:
            a, b = torch.randn(3, 5), torch.randn(4, 5)
            got = torch.ops.mkldnn._linear_pointwise(a, b.t().contiguous().t(), None, "none", [], "")
            _ONEDNN["ok"] = bool(torch.allclose(got, a @ b.t(), atol=1e-5))
        except (AttributeError, RuntimeError):
            _ONEDNN["ok"] = False
    return _ONEDNN["ok"]


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for a (M, K), b (N, K) (``b`` may be a transposed view): oneDNN for float32 CPU where it
    works, else ``torch.mm``. Result (M, N), contiguous."""
    if a.dtype == torch.float32 and a.device.type == "cpu" and _onednn_linear_ok():
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


class _DecompositionCppFn(torch.autograd.Function):
    """The decomposition on the fused C++ kernels (:mod:`search_space.cpp_ext`), CPU, float32/float64.

    Unfolded: the kernels compute ``maps = [x, low_1, …, low_E]`` (every guided-filter step of a group of
    channels streamed row by row in cache, both eps sharing the statistics) and the 1×1 reduce is one matrix
    product with the folded weight ``[Wx, V_1, …, V_E]`` (:meth:`GuidedDecomposition.folded_weight`). Backward:
    ``[dx_direct, G_1, …, G_E] = W^T·grad`` (one product), then the kernel's hand-written guided-filter
    backward (the formulas of :class:`_GuidedFilterFn`, sums over eps and channels accumulated per thread)
    and the guide's gradient scattered to the arg-max/arg-min channel. Only ``maps`` and the per-image guide
    statistics are saved; the per-channel window statistics are recomputed in the backward (cheaper than
    storing them: they never leave the cache). The products run per image (:func:`_matmul_nt`).
    Once differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: tuple[float, ...],
                radius: int) -> torch.Tensor:
        ext = cpp_ext.load_extension()
        x = x.contiguous()
        b, _, h, w = x.shape
        co, hw = weight.shape[0], h * w
        guide, mi, s, x_mean, imax, imin = ext.guide_stats(x, list(eps), radius)
        maps = x.new_empty(b, weight.shape[1], h, w)
        ext.forward(x, guide, mi, s, x_mean, maps, radius, 0)
        maps3 = maps.view(b, -1, hw)
        outs = [_matmul_nt(weight, maps3[i].t()) for i in range(b)]
        out = outs[0].view(1, co, h, w) if b == 1 else torch.stack(outs).view(b, co, h, w)
        if bias is not None:
            out.add_(bias.view(1, co, 1, 1))
        ctx.radius, ctx.has_bias = radius, bias is not None
        ctx.save_for_backward(maps, weight, guide, mi, s, x_mean, imax, imin)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        maps, weight, guide, mi, s, x_mean, imax, imin = ctx.saved_tensors
        b, k, h, w = maps.shape
        c, hw = x_mean.shape[1], h * w
        g3 = grad.contiguous().view(b, -1, hw)
        maps3 = maps.view(b, k, hw)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = _matmul_nt(g3[0], maps3[0])
            for i in range(1, b):
                gw.add_(_matmul_nt(g3[i], maps3[i]))
        gbias = g3.sum(dim=(0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            ext = cpp_ext.load_extension()
            wt = weight.t().contiguous()
            dx = maps.new_empty(b, c, h, w)
            for i in range(b):
                one = slice(i, i + 1)
                full = _matmul_nt(wt, g3[i].t()).view(1, k, h, w)     # [dx_direct, G_1, …, G_E]
                ext.backward(maps[one, :c], guide[one], mi[one], s[one], x_mean[one], imax[one], imin[one], full,
                             dx[one], ctx.radius, 0)
        return dx, gw, gbias, None, None


def cpp_usable(x: torch.Tensor, radius: int = RADIUS) -> bool:
    """Whether :func:`decompose_fused` runs ``x`` on the C++ kernels: a CPU float32/float64 tensor, radius >= 1,
    not under ``torch.compile``, ``PAIF_NO_CPP`` unset and the extension built (the first call builds it)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and radius >= 1
            and not torch.compiler.is_compiling() and cpp_ext.load_extension() is not None)


def decompose_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: Sequence[float] = EPS,
                    radius: int = RADIUS, backend: str = "auto") -> torch.Tensor:
    """The decomposition ``conv1x1([low_1 … low_E, x − low_1 … x − low_E]; weight, bias)`` in one pass;
    ``low_e`` is the guided filter of ``x`` by ``max_c x − min_c x`` with ``eps[e]``.

    Backends: ``"cpp"`` the fused C++ kernels (:class:`_DecompositionCppFn`), ``"torch"`` the pure-PyTorch
    function with the conv folded into the filter (:class:`_DecompositionFn`), ``"auto"`` the C++ one where
    :func:`cpp_usable`, else PyTorch (CUDA, ``torch.compile``, no compiler, ``PAIF_NO_CPP=1``).

    Args:
        x: (B, C, H, W) float.
        weight: (C_out, 2·E·C) or (C_out, 2·E·C, 1, 1), the published 1×1 weight (lows first, then highs).
        bias: (C_out,) or None.
        backend: "auto", "cpp" or "torch".
    Returns:
        (B, C_out, H, W).
    """
    _check_4d(x, "decompose_fused")
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"decompose_fused: expected backend 'auto', 'cpp' or 'torch', got {backend!r}")
    eps = tuple(float(e) for e in eps)
    n, c = len(eps), x.shape[1]
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] != 2 * n * c:
        raise ValueError(f"decompose_fused: expected a weight (C_out, {2 * n * c}), got {tuple(weight.shape)}")
    w_low = [weight[:, k * c:(k + 1) * c] for k in range(n)]
    w_high = [weight[:, (n + k) * c:(n + k + 1) * c] for k in range(n)]
    wx = sum(w_high)
    if backend == "cpp" or (backend == "auto" and cpp_usable(x, radius)):
        if not cpp_usable(x, radius):
            raise ValueError(f"decompose_fused: backend 'cpp' needs a CPU float tensor, radius >= 1 and the built "
                             f"extension; got {x.device} {x.dtype}, radius {radius}, build error: "
                             f"{cpp_ext.failure() or ('PAIF_NO_CPP set' if cpp_ext.disabled() else 'none')}")
        folded = torch.cat([wx, *(lo - hi for lo, hi in zip(w_low, w_high))], 1)
        return _DecompositionCppFn.apply(x, folded, bias, eps, radius)
    v = torch.cat([lo - hi for lo, hi in zip(w_low, w_high)], 0)
    return _DecompositionFn.apply(x, wx, v, bias, eps, radius)


class GuidedDecomposition(nn.Module):
    """Split features into low/high frequency with two guided filters and reduce the four maps with a 1×1 conv.

    ``out = conv1x1([low_1, low_2, x − low_1, x − low_2])`` with ``low_e = GF_e(x)`` guided by
    ``max_c x − min_c x`` — the published channel order (all low-frequency maps, then all high-frequency
    ones), so published weights load unchanged. The conv keeps its 4C→C parameterisation (with bias). Eager,
    the filter and the conv run as one autograd function with the conv moved inside the filter
    (:func:`decompose_fused`, identical result up to rounding); under ``torch.compile``, ONNX export and
    :func:`plain_ops` (or r = 0) the plain path: the low maps (:meth:`bands`), then the conv on
    ``[x, low_1, low_2]`` with the folded weight.

    Args:
        channels: C.
        eps: the regularisers (default 1e-3 and 1e-4).
        radius: box radius (default 4, window 9×9).
    """

    def __init__(self, channels: int, eps: Sequence[float] = EPS, radius: int = RADIUS) -> None:
        super().__init__()
        self.eps = tuple(float(e) for e in eps)
        self.radius = radius
        self.channels = channels
        self.reduce = nn.Conv2d(2 * len(self.eps) * channels, channels, 1)

    def bands(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The low-frequency maps, one per eps, each (B, C, H, W), computed in float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            return guided_filter(guidance_from_features(xf), xf, self.eps, self.radius)

    def folded_weight(self) -> torch.Tensor:
        """The 1×1 weight (C, (1+E)·C, 1, 1) acting on ``[x, low_1, …, low_E]``.

        With ``W = [W_low_1 … W_low_E, W_high_1 … W_high_E]`` and ``high_e = x − low_e``:
        ``W·[lows, highs] = (Σ_e W_high_e)·x + Σ_e (W_low_e − W_high_e)·low_e``.
        """
        c, n = self.channels, len(self.eps)
        w = self.reduce.weight
        w_low = [w[:, k * c:(k + 1) * c] for k in range(n)]
        w_high = [w[:, (n + k) * c:(n + k + 1) * c] for k in range(n)]
        return torch.cat([sum(w_high), *(lo - hi for lo, hi in zip(w_low, w_high))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"GuidedDecomposition: expected (B, {self.channels}, H, W), got {tuple(x.shape)}")
        if self.radius > 0 and not uses_plain_ops():
            with torch.autocast(device_type=x.device.type, enabled=False):
                w, bias = self.reduce.weight.float(), self.reduce.bias
                out = decompose_fused(x.float(), w, None if bias is None else bias.float(), self.eps, self.radius)
            return out.to(x.dtype)
        lows = [low.to(x.dtype) for low in self.bands(x)]
        return F.conv2d(torch.cat([x, *lows], 1), self.folded_weight().to(x.dtype), self.reduce.bias)
