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
from .resampling import Convert, argmax_axis_aligned, argmax_general, axis_positions, smooth_and_resample

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
                  default_value: float | None = None, convert: Convert | None = None) -> Volume:
    """Resample a volume onto a model grid.

    Images: optional Gaussian pre-smoothing (σ in mm), linear interpolation, float32; outside the field
    of view ``default_value`` (the image minimum when None — air rather than the paper's 0, which for CT
    would be water). ``convert(values, out)`` maps the voxel values first (source matching's lookup):
    on the fast path slab by slab inside the resampling, else over the whole image (the result is
    the same); ``default_value`` is then required. Labels: nearest neighbour, uint8, background outside.
    """
    if is_label:
        image = sitk.GetImageFromArray(volume.array.astype(np.uint8, copy=False))
        volume.geometry.apply_to(image)
        out = sitk.Resample(image, _reference(grid, sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor,
                            0, sitk.sitkUInt8)
    else:
        if default_value is None:
            if convert is not None:  # the minimum of the converted values is the caller's to know (SM: lut[0])
                raise ValueError("to_model_grid: give default_value together with convert")
            default_value = float(np.min(volume.array))
        fast = smooth_and_resample(volume.array, volume.geometry, grid.geometry, grid.shape_kji, pre_smoothing_mm,
                                   float(default_value), convert)
        if fast is not None:  # axis-aligned input: per-axis banded operator, same result (resampling.py)
            return Volume(fast, grid.geometry)
        if convert is not None:  # SimpleITK path: convert the whole image first
            values = np.empty(volume.shape, dtype=np.float32)
            convert(volume.array, values)
            volume = Volume(values, volume.geometry)
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


def argmax_in_target_grid(probs: np.ndarray, grid: Grid, target: Geometry, target_shape_kji: tuple[int, int, int],
                          background_channel: int = 0, check_cancel=lambda: None) -> np.ndarray:
    """Argmax of class probabilities (C, K, J, I on the model grid) after linear resampling onto a
    target grid, as uint8 labels. Outside the model grid the background channel is 1, the others 0.

    Only where the argmax can change — model cells whose corners disagree — is anything
    interpolated (:mod:`.resampling`); axis-aligned targets use separable indexing, rotated ones a
    per-slab affine map. The labels equal those of per-channel SimpleITK resampling + argmax, with
    no full-resolution float buffer (a 512×512×300 CT: 5 channels would be 1.5 GiB).
    """
    c = probs.shape[0]
    defaults = np.zeros(c, np.float32)
    defaults[background_channel] = 1.0
    positions = axis_positions(grid.geometry, grid.shape_kji, target, target_shape_kji)
    if positions is not None:
        return argmax_axis_aligned(probs, positions, target_shape_kji, defaults, check_cancel=check_cancel)
    return argmax_general(probs, grid.geometry, target, target_shape_kji, defaults, check_cancel=check_cancel)


def needed_mask(grid: Grid, target: Geometry, target_shape_kji: tuple[int, int, int]) -> np.ndarray:
    """Model-grid voxels (bool, K,J,I) that resampling back onto the target can read.

    A target voxel is interpolated from the 8 model voxels around it, each within one model voxel
    per axis, so within √3 · spacing of the box spanned by the target's voxel centres (a box in the
    target's own, orthonormal, axes). Voxels farther than that are never read: the sliding window
    need not compute them (an oblique stack's world-aligned grid is mostly such voxels).
    """
    d = target.direction_matrix
    n = np.array([target_shape_kji[2], target_shape_kji[1], target_shape_kji[0]], float)
    extent = (n - 1) * np.asarray(target.spacing)
    sm, om = np.asarray(grid.geometry.spacing), np.asarray(grid.geometry.origin)
    # world offsets from the target origin along each world axis (the model grid is world-aligned)
    rel = [(om[a] + sm[a] * np.arange(grid.size[a]) - target.origin[a]).astype(np.float32) for a in range(3)]
    limit = np.float32(3.0 * float(sm.max()) ** 2 * (1 + 1e-6))
    dist2 = np.zeros(grid.shape_kji, dtype=np.float32)
    q = np.empty(grid.shape_kji, dtype=np.float32)
    for b in range(3):  # coordinate along the target's axis b: Σ_a d[a, b] · rel_a, separable; in place
        half = np.float32(extent[b] / 2)
        np.add((d[2, b] * rel[2])[:, None, None], (d[1, b] * rel[1])[None, :, None], out=q)
        q += (d[0, b] * rel[0] - half)[None, None, :]
        np.abs(q, out=q)  # distance outside [0, extent] = max(|q − extent/2| − extent/2, 0)
        q -= half
        np.maximum(q, 0, out=q)
        q *= q
        dist2 += q
    return dist2 <= limit
