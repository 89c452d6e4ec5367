"""Small shared pieces of the augmentation package: random draws, Gaussian kernels, B-spline bases.

Random numbers are drawn on the generator's device (a CPU ``torch.Generator`` by default) and then
moved to the data's device. The draws are tiny (kernel weights, control points, a few scalars per
sample), so the copy costs nothing measurable, and a given seed produces the same augmentation on the
CPU and on a GPU — which is what makes the tests' seeds meaningful on every machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GeneratorLike = torch.Generator | int | None


def as_generator(generator: GeneratorLike) -> torch.Generator:
    """A ``torch.Generator`` from a generator, an integer seed, or ``None`` (fresh, randomly seeded)."""
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Standard normal float32 draws, made on the generator's device, returned on ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device, torch.float32)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator,
            device: torch.device | str) -> torch.Tensor:
    """U(low, high) float32 draws, made on the generator's device, returned on ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device).to(device, torch.float32)
    return low + (high - low) * u


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator,
            device: torch.device | str) -> torch.Tensor:
    """Integers uniform in [0, high), int64, returned on ``device``."""
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)


def expand_first_layer(device: torch.device) -> bool:
    """Whether random-network first layers should read one channels-last image copy per group.

    On CPU, oneDNN's grouped 3D convolution is 2-3× faster channels-last, and a one-channel input
    cannot be channels-last (it falls back to a slow native kernel), so there the first layer gets
    one copy of the image per network/output channel. Elsewhere the image is read once per sample.
    Measured on a 2-core EPYC with torch 2.13 (``Testing/benchmarks/bench_src.py``).
    """
    return device.type == "cpu"


def gaussian_kernel_1d(sigma: float, radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian, ``2*radius+1`` taps at integer offsets (sums to one)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (k / k.sum()).to(device=device, dtype=torch.float32)


def separable_gaussian_3d(x: torch.Tensor, sigma: float, radius: int, padding: str = "zeros") -> torch.Tensor:
    """Per-channel 3D Gaussian blur of ``x (B, C, D, H, W)`` as three 1D passes.

    ``padding="zeros"`` is the TF 'SAME' zero padding that SRC's mask smoothing uses; because the
    Gaussian is a product of 1D kernels and zeros stay zeros, three zero-padded 1D passes give exactly
    the zero-padded 3D convolution. ``padding="replicate"`` is skimage's default ``mode='nearest'``
    (the paper's label smoothing).

    Each pass is a weighted sum of shifted views (``2·radius + 1`` in-place multiply-adds): on CPU
    this is ~10× faster than ``conv3d`` with a 5×1×1 kernel, on GPU it is a handful of
    bandwidth-bound kernels.
    """
    if padding not in ("zeros", "replicate"):
        raise ValueError(f"padding must be 'zeros' or 'replicate', got {padding!r}")
    taps = gaussian_kernel_1d(sigma, radius).tolist()
    y = x
    for dim in (2, 3, 4):
        y = _gaussian_pass(y, taps, dim, padding)
    return y


def _gaussian_pass(y: torch.Tensor, taps: list[float], dim: int, padding: str) -> torch.Tensor:
    r, n = (len(taps) - 1) // 2, y.shape[dim]
    if padding == "replicate":
        pad = [0] * 6  # F.pad order: W, H, D
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = r
        yp = F.pad(y, pad, mode="replicate")
        out = yp.narrow(dim, 0, n) * taps[0]
        for t in range(1, 2 * r + 1):
            out.add_(yp.narrow(dim, t, n), alpha=taps[t])
        return out
    out = y * taps[r]
    for off in range(1, min(r, n - 1) + 1):  # zero padding: shifted-out samples simply drop
        out.narrow(dim, 0, n - off).add_(y.narrow(dim, off, n - off), alpha=taps[r + off])
        out.narrow(dim, off, n - off).add_(y.narrow(dim, 0, n - off), alpha=taps[r - off])
    return out


def _bspline_basis(u: torch.Tensor, order: int) -> torch.Tensor:
    """Centred cardinal B-spline of degree ``order`` (2 or 3) evaluated at ``u``."""
    a = u.abs()
    if order == 3:
        return torch.where(a < 1, 2.0 / 3.0 - a * a + 0.5 * a ** 3,
                           torch.where(a < 2, (2.0 - a).clamp(min=0) ** 3 / 6.0, torch.zeros_like(a)))
    if order == 2:
        return torch.where(a < 0.5, 0.75 - a * a,
                           torch.where(a < 1.5, 0.5 * (1.5 - a).clamp(min=0) ** 2, torch.zeros_like(a)))
    raise ValueError(f"B-spline order must be 2 or 3, got {order}")


def bspline_matrix(n_out: int, n_ctrl: int, order: int = 3,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Weights ``(n_out, n_ctrl)`` evaluating a uniform B-spline at ``n_out`` voxel centres.

    ``n_ctrl - order`` mesh cells span the full extent of the voxels, [-0.5, n_out - 0.5], and
    ``order`` extra control points lie outside it — the layout of ITK's ``BSplineTransform`` (mesh size
    5 ⇒ 8 nodes for a cubic spline). Rows sum to one (partition of unity), so the interpolated
    field never exceeds the largest control value.
    """
    cells = n_ctrl - order
    if cells < 1:
        raise ValueError(f"need more than {order} control points for an order-{order} B-spline, got {n_ctrl}")
    t = (torch.arange(n_out, dtype=torch.float64) + 0.5) / n_out * cells
    centres = torch.arange(n_ctrl, dtype=torch.float64) - (order - 1) / 2.0
    w = _bspline_basis(t[:, None] - centres[None, :], order)
    return w.to(device=device, dtype=torch.float32)


def bspline_upsample(coeffs: torch.Tensor, out_shape: tuple[int, int, int], order: int = 3) -> torch.Tensor:
    """Evaluate B-spline control values ``(B, C, n0, n1, n2)`` on a ``(D, H, W)`` voxel grid.

    Exact, separable (three small matrix products), no approximation.
    """
    d, h, w = out_shape
    md = bspline_matrix(d, coeffs.shape[2], order, coeffs.device)
    mh = bspline_matrix(h, coeffs.shape[3], order, coeffs.device)
    mw = bspline_matrix(w, coeffs.shape[4], order, coeffs.device)
    return torch.einsum("bcijk,di,hj,wk->bcdhw", coeffs.float(), md, mh, mw)


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norm over all but the first dimension, float32, shape (B,)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1).float(), dim=1)


def check_image(image: torch.Tensor, name: str = "image") -> None:
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, D, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {image.dtype}")


def check_labels(labels: torch.Tensor, image: torch.Tensor | None = None) -> None:
    if labels.dim() != 4:
        raise ValueError(f"labels must have shape (B, D, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if image is not None and (labels.shape[0] != image.shape[0] or labels.shape[1:] != image.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match image {tuple(image.shape)}: expected "
                         f"(B, D, H, W) = {(image.shape[0], *image.shape[2:])}")


__all__ = ["GeneratorLike", "as_generator", "bspline_matrix", "bspline_upsample", "check_image",
           "check_labels", "expand_first_layer", "frobenius", "gaussian_kernel_1d", "randint", "randn",
           "separable_gaussian_3d", "uniform"]
