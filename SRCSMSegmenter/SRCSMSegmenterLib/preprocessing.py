"""Geometry preprocessing shared by training and inference: the model grid and resampling onto it.

The model grid is world-aligned (identity direction in LPS, as in SRCSM §3.2) at the model's spacing,
so oblique or flipped inputs are handled by resampling, never by trusting voxel axes. Training caches
and inference both go through :func:`to_model_grid`, so the network sees identical preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .image import Geometry, Volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Grid:
    """A world-aligned sampling grid: geometry plus size (x, y, z voxels)."""

    geometry: Geometry
    size: tuple[int, int, int]

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])


def physical_bounds(volume_geometry: Geometry, shape_kji: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box of the image's voxel *extent* (voxel edges, not centres)."""
    k, j, i = shape_kji
    corners = np.array([[a, b, c] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
    pts = volume_geometry.index_to_physical(corners)
    return pts.min(axis=0), pts.max(axis=0)


def model_grid(volume_geometry: Geometry, shape_kji: tuple[int, int, int], spacing: tuple[float, float, float],
               bounds: tuple[np.ndarray, np.ndarray] | None = None) -> Grid:
    """World-aligned grid at ``spacing`` covering the image (or the given LPS ``bounds``).

    The grid is centred on the covered box so that no side is favoured.
    """
    lo, hi = physical_bounds(volume_geometry, shape_kji) if bounds is None else bounds
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    sp = np.asarray(spacing, dtype=float)
    extent = hi - lo
    size = np.maximum(1, np.ceil(extent / sp - 1e-6)).astype(int)
    centre = (lo + hi) / 2
    origin = centre - (size - 1) * sp / 2
    return Grid(Geometry(tuple(origin), tuple(sp), IDENTITY), tuple(int(s) for s in size))


def _reference(grid: Grid, pixel_type: int) -> sitk.Image:
    ref = sitk.Image([int(s) for s in grid.size], pixel_type)
    return grid.geometry.apply_to(ref)


def smooth(volume: Volume, sigma_mm: float) -> sitk.Image:
    """Float32 SimpleITK image of ``volume``, Gaussian-smoothed with σ in millimetres (§3.4)."""
    image = sitk.GetImageFromArray(volume.array.astype(np.float32, copy=False))
    volume.geometry.apply_to(image)
    if sigma_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    return image


def to_model_grid(volume: Volume, grid: Grid, *, pre_smoothing_mm: float = 0.0, is_label: bool = False,
                  default_value: float | None = None) -> Volume:
    """Resample a volume onto a model grid.

    Images: optional Gaussian pre-smoothing (σ in mm), linear interpolation, float32; outside the field
    of view ``default_value`` (the image minimum when None — air rather than the paper's 0, which for CT
    would be water). Labels: nearest neighbour, uint8, background outside.
    """
    if is_label:
        image = sitk.GetImageFromArray(volume.array.astype(np.uint8, copy=False))
        volume.geometry.apply_to(image)
        out = sitk.Resample(image, _reference(grid, sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor,
                            0, sitk.sitkUInt8)
    else:
        if default_value is None:
            default_value = float(np.min(volume.array))
        image = smooth(volume, pre_smoothing_mm)
        out = sitk.Resample(image, _reference(grid, sitk.sitkFloat32), sitk.Transform(), sitk.sitkLinear,
                            float(default_value), sitk.sitkFloat32)
    return Volume(sitk.GetArrayFromImage(out), grid.geometry)


def resample_channel_to(array_kji: np.ndarray, grid: Grid, target: Geometry, target_shape_kji: tuple[int, int, int],
                        default_value: float) -> np.ndarray:
    """Linearly resample one float channel from a model grid back onto a target image grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=np.float32))
    grid.geometry.apply_to(image)
    ref = sitk.Image([int(target_shape_kji[2]), int(target_shape_kji[1]), int(target_shape_kji[0])],
                     sitk.sitkFloat32)
    target.apply_to(ref)
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, float(default_value), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _axis_positions(target: Geometry, grid: Grid, shape_kji: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Continuous model-grid indices of the target's voxel centres, axis by axis (x, y, z), when the
    target's axes are the world axes up to sign (the common case: no rotation, no axis permutation).
    None for oblique or permuted targets."""
    d = target.direction_matrix
    if not np.allclose(np.abs(d), np.eye(3), atol=1e-9):
        return None
    sizes = (shape_kji[2], shape_kji[1], shape_kji[0])
    out = []
    for a in range(3):
        world = target.origin[a] + d[a, a] * target.spacing[a] * np.arange(sizes[a])
        out.append((world - grid.geometry.origin[a]) / grid.geometry.spacing[a])
    return out


def _linear_axis(pos: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices, upper weight and inside-mask of 1D linear interpolation with SimpleITK's semantics:
    a point is inside when its continuous index is in [-0.5, n − 0.5); neighbours clamp at the border."""
    i0 = np.floor(pos).astype(np.intp)
    w1 = (pos - i0).astype(np.float32)
    inside = (pos >= -0.5) & (pos < n_in - 0.5)
    i1 = np.clip(i0 + 1, 0, n_in - 1)
    return np.clip(i0, 0, n_in - 1), i1, w1, inside


def argmax_in_target_grid(probs: np.ndarray, grid: Grid, target: Geometry, target_shape_kji: tuple[int, int, int],
                          background_channel: int = 0, slab: int = 8,
                          check_cancel=lambda: None) -> np.ndarray:
    """Argmax of class probabilities (C, K, J, I on the model grid) after linear resampling onto a
    target grid, as uint8 labels. Outside the model grid the background channel is 1, the others 0.

    Axis-aligned targets (most CT/MR) use separable interpolation fused with the argmax, slab by slab
    (≈ 3× faster than SimpleITK for a 512×512×300 CT and no full-resolution float buffers); oblique
    targets resample one channel at a time with SimpleITK and keep a running argmax.
    """
    c = probs.shape[0]
    defaults = np.zeros(c, np.float32)
    defaults[background_channel] = 1.0
    positions = _axis_positions(target, grid, target_shape_kji)
    labels = np.zeros(target_shape_kji, dtype=np.uint8)
    if positions is None:
        best = None
        for ch in range(c):
            check_cancel()
            channel = resample_channel_to(probs[ch], grid, target, target_shape_kji, float(defaults[ch]))
            if best is None:
                best = channel
                continue
            better = channel > best
            labels[better] = ch
            np.maximum(best, channel, out=best)
            del channel, better
        return labels
    kg, jg, ig = probs.shape[1:]
    xi0, xi1, xw, xin = _linear_axis(positions[0], ig)
    yi0, yi1, yw, yin = _linear_axis(positions[1], jg)
    zi0, zi1, zw, zin = _linear_axis(positions[2], kg)
    # interpolate along x then y on the (small) model grid: (C, Kg, J, I) float32
    p = probs.astype(np.float32, copy=False)
    a = p[..., xi0] * (1 - xw) + p[..., xi1] * xw
    a = a[:, :, yi0, :] * (1 - yw)[:, None] + a[:, :, yi1, :] * yw[:, None]
    outside_xy = ~(yin[:, None] & xin[None, :])
    any_outside_xy = bool(outside_xy.any())
    for k0 in range(0, target_shape_kji[0], slab):
        check_cancel()
        ks = slice(k0, min(target_shape_kji[0], k0 + slab))
        w = zw[ks][None, :, None, None]
        vals = a[:, zi0[ks]] * (1 - w) + a[:, zi1[ks]] * w  # (C, slab, J, I)
        vals[:, ~zin[ks]] = defaults[:, None, None, None]
        if any_outside_xy:
            vals[:, :, outside_xy] = defaults[:, None, None]
        labels[ks] = np.argmax(vals, axis=0)
    return labels
