"""Perturbations that real scans from other hospitals bring, applied to a labelled case.

Each perturbation takes an image and its reference label map (same grid) and returns both on the
perturbed grid. Geometry is changed *physically*: the anatomy stays where it is in the world (LPS, mm)
and the reference follows the image with nearest-neighbour interpolation, so a prediction on the
perturbed image can be scored against the perturbed reference in that image's own grid.

* ``slab_<mm>``  — a partial field of view: only the slices within ±mm/2 of the labelled anatomy's
  centre along the slice axis (world z for axial scans; the stack axis of a cardiac short-axis stack).
  Voxels are not resampled: the slab is a sub-grid of the original.
* ``crop_half``  — an in-plane crop to half the field of view on both in-plane axes, centred on the
  anatomy (moved inside the image where needed).
* ``iso_1mm``, ``iso_3mm``, ``slices_<mm>`` — resampling onto another spacing (same direction, same
  physical extent), with Gaussian anti-aliasing where the spacing grows (a thick slice integrates
  over its thickness; σ = √(new² − old²) / 2.355 per axis).
* ``flip_i``, ``flip_k`` — the voxel array reversed along an axis and the direction matrix and origin
  changed to match: the same physical image stored differently.
* ``oblique_<deg>`` — the image resampled onto a grid rotated by ``deg`` about the world axis halfway
  between x and y, like a doubly oblique acquisition.
* ``scale_1e4``  — float intensities ×10⁴ (header-scaled MR, e.g. Philips scale slopes).
* ``raw_hu``     — a CT published clipped to a HU window turned back into scanner-like raw HU: voxels at
  the window's floor become noisy air (−1024…−880 HU), those at its ceiling bone up to 1500 HU, both a
  continuum (spatially smoothed noise), not one value. Inside the window nothing changes.
* ``pad_500mm``  — the in-plane field of view padded to 500 mm with air (the image's minimum).

Everything is deterministic given the ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SRCSMSegmenterLib.image import Geometry, Volume

#: Raw-HU synthesis: the air and bone ranges the clipped floor and ceiling are replaced by.
AIR_HU = (-1024.0, -880.0)
BONE_MAX_HU = 1500.0


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation: ``apply(image, label, seed) -> (image, label)``; ``modalities`` it
    makes sense for (``scale_1e4`` is an MR header effect, ``raw_hu`` a CT one)."""

    name: str
    description: str
    apply: Callable[[Volume, Volume, int], tuple[Volume, Volume]]
    modalities: tuple[str, ...] = ("CT", "MR")


# ------------------------------------------------------------------------------------ geometry


def foreground_centre(label: Volume) -> np.ndarray:
    """World (LPS) centre of the bounding box of the label map's foreground voxel centres."""
    kji = np.argwhere(label.array > 0)
    if kji.size == 0:
        raise ValueError("the reference label map is empty: there is no anatomy to centre on")
    lo, hi = kji.min(0)[::-1], kji.max(0)[::-1]
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)
    pts = label.geometry.index_to_physical(corners)
    return (pts.min(0) + pts.max(0)) / 2


def _subgrid(volume: Volume, start_ijk: np.ndarray, stop_ijk: np.ndarray) -> Volume:
    """The voxels [start, stop) of a volume (i, j, k), with the origin moved so world positions hold."""
    i0, j0, k0 = (int(v) for v in start_ijk)
    i1, j1, k1 = (int(v) for v in stop_ijk)
    origin = volume.geometry.index_to_physical(np.array([i0, j0, k0], float))
    g = Geometry(tuple(float(v) for v in origin), volume.geometry.spacing, volume.geometry.direction)
    return Volume(np.ascontiguousarray(volume.array[k0:k1, j0:j1, i0:i1]), g, dict(volume.metadata))


def _window_along(axis_len: int, centre_index: float, half_width_voxels: float) -> tuple[int, int]:
    """Index range [start, stop) of voxel centres within ``half_width`` of ``centre`` (clipped)."""
    start = max(0, int(math.ceil(centre_index - half_width_voxels - 1e-6)))
    stop = min(axis_len, int(math.floor(centre_index + half_width_voxels + 1e-6)) + 1)
    if stop <= start:  # thinner than one slice: keep the nearest one
        nearest = int(np.clip(round(centre_index), 0, axis_len - 1))
        start, stop = nearest, nearest + 1
    return start, stop


def slab(image: Volume, label: Volume, thickness_mm: float) -> tuple[Volume, Volume]:
    """The slices whose centres lie within ±thickness/2 of the anatomy's centre along the slice axis."""
    centre = label.geometry.physical_to_index(foreground_centre(label))
    k = image.shape[0]
    start, stop = _window_along(k, float(centre[2]), thickness_mm / 2 / image.geometry.spacing[2])
    lo = np.array([0, 0, start])
    hi = np.array([image.shape[2], image.shape[1], stop])
    return _subgrid(image, lo, hi), _subgrid(label, lo, hi)


def crop_in_plane(image: Volume, label: Volume, fraction: float = 0.5) -> tuple[Volume, Volume]:
    """Keep ``fraction`` of the field of view on both in-plane axes (i, j), centred on the anatomy and
    shifted inside the image where the anatomy is near a border."""
    centre = label.geometry.physical_to_index(foreground_centre(label))
    lo = np.zeros(3, int)
    hi = np.array([image.shape[2], image.shape[1], image.shape[0]])
    for axis in (0, 1):
        n = int(hi[axis])
        width = max(1, int(round(n * fraction)))
        start = int(round(centre[axis] - width / 2))
        start = min(max(0, start), n - width)
        lo[axis], hi[axis] = start, start + width
    return _subgrid(image, lo, hi), _subgrid(label, lo, hi)


def pad_in_plane(image: Volume, label: Volume, fov_mm: float = 500.0) -> tuple[Volume, Volume]:
    """Pad both in-plane axes (symmetrically) to at least ``fov_mm`` with the image's minimum (air)."""
    sp = image.geometry.spacing
    pads = []
    for axis, n in ((0, image.shape[2]), (1, image.shape[1])):
        total = max(0, int(math.ceil(fov_mm / sp[axis])) - n)
        pads.append((total // 2, total - total // 2))
    (pi0, pi1), (pj0, pj1) = pads
    fill = image.array.min()
    img = np.pad(image.array, ((0, 0), (pj0, pj1), (pi0, pi1)), constant_values=fill)
    lab = np.pad(label.array, ((0, 0), (pj0, pj1), (pi0, pi1)), constant_values=0)
    origin = image.geometry.index_to_physical(np.array([-pi0, -pj0, 0], float))
    g = Geometry(tuple(float(v) for v in origin), image.geometry.spacing, image.geometry.direction)
    return Volume(img, g, dict(image.metadata)), Volume(lab, g, dict(label.metadata))


def flip(image: Volume, label: Volume, axis: str = "i") -> tuple[Volume, Volume]:
    """Reverse the voxel order along ``axis`` (i, j or k) and negate that direction column, moving
    the origin to the former last voxel: the same physical image, stored the other way round."""
    a = "ijk".index(axis)
    n = image.shape[2 - a]
    g = image.geometry
    d = g.direction_matrix.copy()
    d[:, a] *= -1
    last = np.zeros(3)
    last[a] = n - 1
    origin = g.index_to_physical(last)
    ng = Geometry(tuple(float(v) for v in origin), g.spacing, tuple(float(v) for v in d.ravel()))
    img = np.ascontiguousarray(np.flip(image.array, axis=2 - a))
    lab = np.ascontiguousarray(np.flip(label.array, axis=2 - a))
    return Volume(img, ng, dict(image.metadata)), Volume(lab, ng, dict(label.metadata))


def _covering_grid(source: Volume, direction: np.ndarray, spacing: np.ndarray) -> tuple[Geometry, tuple[int, int, int]]:
    """A grid with ``direction`` and ``spacing`` whose voxels cover the source's physical extent,
    centred on it (so no side is favoured)."""
    k, j, i = source.shape
    corners = np.array([[a, b, c] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
    world = source.geometry.index_to_physical(corners)
    local = world @ direction  # coordinates along the new axes (direction columns are orthonormal)
    lo, hi = local.min(0), local.max(0)
    size = np.maximum(1, np.ceil((hi - lo) / spacing - 1e-6)).astype(int)
    centre_local = (lo + hi) / 2
    origin_local = centre_local - (size - 1) * spacing / 2
    origin = direction @ origin_local
    g = Geometry(tuple(float(v) for v in origin), tuple(float(s) for s in spacing),
                 tuple(float(v) for v in direction.ravel()))
    return g, (int(size[2]), int(size[1]), int(size[0]))


def resample_pair(image: Volume, label: Volume, geometry: Geometry, shape_kji: tuple[int, int, int],
                  antialias: bool = True) -> tuple[Volume, Volume]:
    """Resample image (linear, float32) and label (nearest neighbour) physically onto a new grid.

    With ``antialias`` the image is first smoothed along each of its axes whose sampling gets coarser
    (σ = √(new² − old²)/2.355 in mm), as a scanner's thicker slice or larger pixel would integrate.
    Outside the source the image gets its minimum (air), the label background.
    """
    src = sitk.GetImageFromArray(image.array.astype(np.float32, copy=False))
    image.geometry.apply_to(src)
    if antialias:
        old = np.asarray(image.geometry.spacing, float)
        # the new spacing measured along the *old* axes (matters for oblique grids)
        new_along_old = np.abs(image.geometry.direction_matrix.T @ geometry.direction_matrix) @ np.asarray(
            geometry.spacing, float)
        sigma = np.sqrt(np.maximum(new_along_old**2 - old**2, 0.0)) / 2.355
        if np.any(sigma > 0.05 * old):
            # per-axis σ in voxels, so that an axis that keeps its spacing is left alone
            src = sitk.GetImageFromArray(ndimage.gaussian_filter(
                image.array.astype(np.float32), sigma=tuple((sigma / old)[::-1]), mode="nearest"))
            image.geometry.apply_to(src)
    ref = sitk.Image([shape_kji[2], shape_kji[1], shape_kji[0]], sitk.sitkFloat32)
    geometry.apply_to(ref)
    fill = float(image.array.min())
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
    lab = sitk.GetImageFromArray(label.array.astype(np.uint8, copy=False))
    label.geometry.apply_to(lab)
    lref = sitk.Image([shape_kji[2], shape_kji[1], shape_kji[0]], sitk.sitkUInt8)
    geometry.apply_to(lref)
    lout = sitk.Resample(lab, lref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return (Volume(sitk.GetArrayFromImage(out), geometry, dict(image.metadata)),
            Volume(sitk.GetArrayFromImage(lout), geometry, dict(label.metadata)))


def respace(image: Volume, label: Volume, spacing: tuple[float | None, float | None, float | None]) -> tuple[Volume, Volume]:
    """Resample onto a new spacing (None keeps an axis's spacing), same direction and extent."""
    sp = np.array([image.geometry.spacing[a] if s is None else s for a, s in enumerate(spacing)], float)
    g, shape = _covering_grid(image, image.geometry.direction_matrix, sp)
    return resample_pair(image, label, g, shape)


def rotation(angle_deg: float, axis: tuple[float, float, float] = (1.0, 1.0, 0.0)) -> np.ndarray:
    """Rotation by ``angle_deg`` about a world ``axis`` (default: halfway between x and y, so both the
    in-plane and the slice direction tilt — a doubly oblique acquisition). Rodrigues' formula."""
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def oblique(image: Volume, label: Volume, angle_deg: float = 25.0) -> tuple[Volume, Volume]:
    """Resample onto a grid whose axes are the image's rotated by ``angle_deg`` in the world, at the
    image's own spacing, covering its extent (no anti-aliasing: the sampling does not get coarser)."""
    d = rotation(angle_deg) @ image.geometry.direction_matrix
    g, shape = _covering_grid(image, d, np.asarray(image.geometry.spacing, float))
    return resample_pair(image, label, g, shape, antialias=False)


# ----------------------------------------------------------------------------------- intensity


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: float = 1.5) -> np.ndarray:
    """Spatially correlated noise, rescaled to [0, 1] (a continuum, like scanner noise after the
    reconstruction kernel)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    lo, hi = float(n.min()), float(n.max())
    return (n - lo) / (hi - lo if hi > lo else 1.0)


def raw_hu(image: Volume, seed: int = 0, floor: float | None = None, ceiling: float | None = None) -> Volume:
    """A CT clipped to [floor, ceiling] HU (default: its own min and max) as a scanner would store it.

    Voxels at the floor become air between −1024 and −880 HU, voxels at the ceiling bone between the
    ceiling and 1500 HU (denser towards the middle of a bright region: the noise is weighted by the
    distance to the region's border); everything inside the window is unchanged. int16, like DICOM.
    """
    a = image.array
    floor = float(a.min()) if floor is None else floor
    ceiling = float(a.max()) if ceiling is None else ceiling
    rng = np.random.default_rng(seed)
    out = a.astype(np.float32, copy=True)
    low = a <= floor
    high = a >= ceiling
    air = _smooth_noise(a.shape, rng)
    out[low] = AIR_HU[0] + (AIR_HU[1] - AIR_HU[0]) * air[low]
    if high.any():
        depth = ndimage.distance_transform_edt(high, sampling=image.geometry.spacing[::-1])
        depth = np.clip(depth / 3.0, 0.0, 1.0)  # reaches full density 3 mm inside
        bone = _smooth_noise(a.shape, rng)
        value = ceiling + (BONE_MAX_HU - ceiling) * (0.3 * bone + 0.7 * depth) * (0.5 + 0.5 * bone)
        out[high] = np.maximum(value[high], ceiling)
    return Volume(np.rint(out).astype(np.int16), image.geometry, dict(image.metadata))


def scale_intensities(image: Volume, factor: float = 1e4) -> Volume:
    """Float intensities multiplied by ``factor`` (a header scale slope the reader applied)."""
    return Volume(image.array.astype(np.float32) * np.float32(factor), image.geometry, dict(image.metadata))


def _seeded(fn: Callable[[Volume, Volume], tuple[Volume, Volume]]) -> Callable[[Volume, Volume, int], tuple[Volume, Volume]]:
    return lambda image, label, seed: fn(image, label)


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in [
    Perturbation("slab_40mm", "40 mm slab around the anatomy (slice axis)", _seeded(lambda i, l: slab(i, l, 40))),
    Perturbation("slab_60mm", "60 mm slab around the anatomy", _seeded(lambda i, l: slab(i, l, 60))),
    Perturbation("slab_90mm", "90 mm slab around the anatomy", _seeded(lambda i, l: slab(i, l, 90))),
    Perturbation("slab_150mm", "150 mm slab around the anatomy", _seeded(lambda i, l: slab(i, l, 150))),
    Perturbation("crop_half", "in-plane crop to half the field of view", _seeded(crop_in_plane)),
    Perturbation("iso_1mm", "resampled to 1 mm isotropic", _seeded(lambda i, l: respace(i, l, (1.0, 1.0, 1.0)))),
    Perturbation("iso_3mm", "resampled to 3 mm isotropic", _seeded(lambda i, l: respace(i, l, (3.0, 3.0, 3.0)))),
    Perturbation("slices_10mm", "10 mm slices (in-plane kept)", _seeded(lambda i, l: respace(i, l, (None, None, 10.0)))),
    Perturbation("flip_i", "voxel order reversed along i (direction matrix follows)",
                 _seeded(lambda i, l: flip(i, l, "i"))),
    Perturbation("flip_k", "voxel order reversed along k (direction matrix follows)",
                 _seeded(lambda i, l: flip(i, l, "k"))),
    Perturbation("oblique_25deg", "resampled onto a grid tilted by 25°", _seeded(lambda i, l: oblique(i, l, 25.0))),
    Perturbation("scale_1e4", "float intensities ×10⁴ (header-scaled MR)",
                 lambda i, l, s: (scale_intensities(i), l), modalities=("MR",)),
    Perturbation("raw_hu", "raw HU: clipped floor → noisy air, ceiling → bone up to 1500 HU",
                 lambda i, l, s: (raw_hu(i, seed=s), l), modalities=("CT",)),
    Perturbation("pad_500mm", "field of view padded to 500 mm with air", _seeded(pad_in_plane)),
]}


def perturbations_for(modality: str, names: list[str] | None = None) -> list[Perturbation]:
    """The perturbations that apply to a target modality (all of them, or ``names`` in that order)."""
    if names is None:
        return [p for p in PERTURBATIONS.values() if modality in p.modalities]
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; choose from {', '.join(PERTURBATIONS)}")
    return [PERTURBATIONS[n] for n in names if modality in PERTURBATIONS[n].modalities]


def follow_labels(labels: Volume, geometry: Geometry, shape_kji: tuple[int, int, int]) -> Volume:
    """A label map carried onto another grid physically (nearest neighbour), e.g. an unperturbed
    prediction onto a perturbed image's grid, to compare like with like."""
    lab = sitk.GetImageFromArray(labels.array.astype(np.uint8, copy=False))
    labels.geometry.apply_to(lab)
    ref = sitk.Image([shape_kji[2], shape_kji[1], shape_kji[0]], sitk.sitkUInt8)
    geometry.apply_to(ref)
    out = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return Volume(sitk.GetArrayFromImage(out), geometry)
