"""Source matching (SM): map a target image's intensities onto the source training distribution.

Implements SRCSM §2 (docs/SRCSM.md) from its description:

* per-image preprocessing — CT clipped to [-1023, 1024] HU, MR scaled so that its maximum is 2048
  (in floating point first, so float MR is never truncated), then rounded to integers;
* mask — voxels equal to the image's minimum or maximum are excluded;
* histogram — one bin per integer value, the top two values merged (numpy's closed last bin, kept
  for fidelity); the source *profile* pools these counts over all training images into one CDF;
* mapping — a step-function quantile mapping ``out = G⁻¹(F_t(v))``: ``out = s_k`` where
  ``G(s_k) == p`` exactly, else the largest ``s_k`` with ``G(s_k) < p``; the target minimum maps to the
  source's overall minimum, the target maximum to the source's top key.

Everything is a lookup table over the integer values of the image. An integer image (what scanners
write: int16 CT, uint16 MR) is counted and mapped through its *raw* values — one histogram pass and one
lookup pass, both over slabs in threads — because the per-image rule above is a function of the raw
value alone; the result is identical to preprocessing the whole image first. Float images take the
general path (preprocess, then look up, slab by slab in place). A 512×512×300 CT is matched in about
0.2 s on 2 cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError
from .image import Volume

Modality = Literal["CT", "MR"]

CT_MATCH_RANGE = (-1023, 1024)
MR_MATCH_MAX = 2048
#: Voxels per slab when streaming over a volume (keeps temporaries to a few tens of MB).
_SLAB_VOXELS = 4_000_000
#: Voxels per slab of a lookup (small enough that a resampling block of a few slices still splits
#: over the threads)
_LOOKUP_SLAB_VOXELS = 1_000_000


def _slabs(n: int, step: int = _SLAB_VOXELS) -> Iterable[slice]:
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


_T = TypeVar("_T")


def _threads() -> int:
    """Worker threads for the slab loops (numpy releases the GIL in bincount and take)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _map_slabs(n: int, fn: Callable[[slice], _T], step: int = _SLAB_VOXELS) -> list[_T]:
    """``fn`` over the slabs of ``range(n)``, in threads when there is more than one slab."""
    slabs = list(_slabs(n, step))
    workers = min(_threads(), len(slabs))
    if workers <= 1:
        return [fn(s) for s in slabs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, slabs))


#: Below this minimum an image is taken for CT: Hounsfield units go negative (air -1000, fat -100),
#: MR magnitudes do not. -50 also catches CT published already windowed (e.g. to [-125, 275] HU).
CT_MINIMUM_BELOW = -50.0


def guess_modality(array: np.ndarray) -> Modality:
    """CT if the image has clearly negative values (Hounsfield units), else MR.

    The SM preprocessing rule and, with SM off, the normalisation depend on this; pass the modality
    explicitly (``--target-modality``) for unusual data, e.g. MR that was z-score normalised.
    """
    return "CT" if float(np.min(array)) < CT_MINIMUM_BELOW else "MR"


def preprocess_for_matching(array: np.ndarray, modality: Modality,
                            window: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """The per-image rule of SRCSM §2.1 → (int16 array, scale applied before rounding).

    The scale (2048/max for MR, 1 for CT) lets a caller express values back in the image's own units.
    ``window`` (CT only) replaces the [-1023, 1024] HU clip by a narrower one: see :func:`match_window`.
    """
    if modality == "CT":
        lo, hi = CT_MATCH_RANGE if window is None else window
        out = np.empty(array.shape, dtype=np.int16)
        flat_in, flat_out = array.reshape(-1), out.reshape(-1)
        for s in _slabs(flat_in.size):
            chunk = flat_in[s]
            if chunk.dtype.kind == "f":
                chunk = np.rint(chunk)
            flat_out[s] = np.clip(chunk, lo, hi)
        return out, 1.0
    vmax = float(np.max(array))
    if not vmax > 0:
        raise InputError(
            f"MR source matching needs positive intensities, but the image maximum is {vmax}. "
            f"Check the input (or pass the right modality)."
        )
    scale = MR_MATCH_MAX / vmax
    out = np.empty(array.shape, dtype=np.int16)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for s in _slabs(flat_in.size):
        chunk = np.rint(flat_in[s].astype(np.float64) * scale)
        flat_out[s] = np.clip(chunk, np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    return out, scale


@dataclass(frozen=True)
class Histogram:
    """Masked per-integer histogram of one preprocessed image (SRCSM §2.1)."""

    keys: np.ndarray  # int64 sorted values (the top unique value merged into the one below)
    counts: np.ndarray  # int64
    minimum: int
    maximum: int

    def cdf(self) -> np.ndarray:
        c = np.cumsum(self.counts, dtype=np.float64)
        return c / c[-1]


def histogram(values: np.ndarray) -> Histogram:
    """Histogram of an integer image with its min and max excluded and the top two bins merged."""
    flat = values.reshape(-1)
    vmin, vmax = int(flat.min()), int(flat.max())
    size = vmax - vmin + 1
    counts = sum(_map_slabs(flat.size, lambda s: np.bincount(flat[s].astype(np.int64) - vmin, minlength=size)))
    return histogram_from_counts(np.asarray(counts, dtype=np.int64), vmin)


def histogram_from_counts(counts: np.ndarray, first_value: int) -> Histogram:
    """:func:`histogram` from the count of every integer value ``first_value, first_value + 1, …``
    (leading and trailing empty values allowed)."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise InputError("The image is empty: it has no voxels to match.")
    counts = np.array(counts[present[0]:present[-1] + 1], dtype=np.int64)
    vmin = int(first_value) + int(present[0])
    vmax = vmin + counts.size - 1
    counts[0] = 0
    counts[-1] = 0
    present = np.flatnonzero(counts)
    if present.size < 2:
        raise InputError(
            "The image has fewer than two intensity levels besides its minimum and maximum, so its "
            "histogram cannot be matched (is it a label map or a binary mask?). Use a grey-value image."
        )
    keys = present[:-1]
    kc = counts[keys].copy()
    kc[-1] += counts[present[-1]]
    return Histogram(keys=keys + vmin, counts=kc, minimum=vmin, maximum=vmax)


#: integer images whose values span at most this many levels are counted and mapped by raw value
_RAW_LEVELS_MAX = 1 << 20


def _unsigned_view(dtype: np.dtype) -> type | None:
    """The unsigned type of the same width for 8- and 16-bit integers (their raw values index a table
    of 256 or 65 536 entries directly, with no subtraction), else None."""
    if dtype.kind in "iu" and dtype.itemsize in (1, 2):
        return np.uint8 if dtype.itemsize == 1 else np.uint16
    return None


def integer_value_counts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(raw values present, ascending int64; their voxel counts) of an integer image, or None for a
    float image or one whose values span more than 2²⁰ levels."""
    if array.dtype.kind not in "iu" or array.size == 0:
        return None
    flat = np.ascontiguousarray(array).reshape(-1)
    unsigned = _unsigned_view(array.dtype)
    if unsigned is not None:
        levels = 1 << (8 * array.dtype.itemsize)
        codes = flat.view(unsigned)
        counts = sum(_map_slabs(flat.size, lambda s: np.bincount(codes[s], minlength=levels),
                                step=_LOOKUP_SLAB_VOXELS))
        values = np.arange(levels, dtype=np.int64).astype(unsigned).view(array.dtype).astype(np.int64)
    else:
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo >= _RAW_LEVELS_MAX:
            return None
        counts = sum(_map_slabs(flat.size, lambda s: np.bincount(flat[s].astype(np.int64) - lo,
                                                                  minlength=hi - lo + 1)))
        values = np.arange(lo, hi + 1, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    keep = counts > 0
    return values[keep], counts[keep]


class SourceProfile(BaseModel):
    """Pooled intensity distribution of the source training images (the SM target), stored in the
    model package. ``values``/``cdf`` are the keys and the inclusive CDF of the pooled histogram."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modality: Modality
    values: list[int] = Field(min_length=2)
    cdf: list[float] = Field(min_length=2)
    overall_min: int
    num_images: int = Field(ge=1)
    num_voxels: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> "SourceProfile":
        v, c = np.asarray(self.values), np.asarray(self.cdf)
        if v.size != c.size:
            raise ValueError("values and cdf must have the same length")
        if np.any(np.diff(v) <= 0):
            raise ValueError("profile values must be strictly increasing")
        if np.any(np.diff(c) < 0) or not (0 < c[0] and abs(c[-1] - 1) < 1e-9):
            raise ValueError("profile cdf must be non-decreasing and end at 1")
        if self.overall_min > v[0]:
            raise ValueError("overall_min must not exceed the smallest profile value")
        return self

    @classmethod
    def fit(cls, images: Iterable[np.ndarray], modality: Modality) -> "SourceProfile":
        """Pool the masked histograms of source training images (counts summed, not CDFs averaged)."""
        pooled = np.zeros(0, dtype=np.int64)
        base = 0
        overall_min = None
        n_images = 0
        for array in images:
            values, _ = preprocess_for_matching(np.asarray(array), modality)
            h = histogram(values)
            overall_min = h.minimum if overall_min is None else min(overall_min, h.minimum)
            lo, hi = int(h.keys[0]), int(h.keys[-1])
            if pooled.size == 0:
                base, pooled = lo, np.zeros(hi - lo + 1, dtype=np.int64)
            if lo < base:
                pooled = np.concatenate([np.zeros(base - lo, dtype=np.int64), pooled])
                base = lo
            if hi >= base + pooled.size:
                pooled = np.concatenate([pooled, np.zeros(hi - base - pooled.size + 1, dtype=np.int64)])
            np.add.at(pooled, h.keys - base, h.counts)
            n_images += 1
        if n_images == 0 or overall_min is None:
            raise InputError("Cannot fit a source profile from zero images.")
        keys = np.flatnonzero(pooled)
        counts = pooled[keys]
        cdf = np.cumsum(counts, dtype=np.float64)
        n = int(cdf[-1])
        cdf /= cdf[-1]
        return cls(
            modality=modality,
            values=(keys + base).astype(int).tolist(),
            cdf=cdf.tolist(),
            overall_min=int(overall_min),
            num_images=n_images,
            num_voxels=n,
        )

    def quantile(self, p: np.ndarray) -> np.ndarray:
        """G⁻¹ as SRCSM §2.3 defines it (exact match, else largest key with G < p, else overall_min)."""
        s = np.asarray(self.values, dtype=np.int64)
        g = np.asarray(self.cdf, dtype=np.float64)
        idx = np.searchsorted(g, np.asarray(p, dtype=np.float64), side="right") - 1
        return np.where(idx >= 0, s[np.clip(idx, 0, None)], self.overall_min)


@dataclass(frozen=True)
class QuantileMapping:
    """The mapping of one target image onto a profile, as a lookup table over its integer values.

    ``lut[v - minimum]`` is the source value for preprocessed target value ``v``; ``scale`` converts
    the target's own units to preprocessed values (``v = round(x * scale)``).
    """

    minimum: int
    lut: np.ndarray  # int16
    scale: float
    target_modality: Modality
    target_histogram: Histogram

    def apply_inplace(self, values: np.ndarray) -> np.ndarray:
        """Replace preprocessed target values by source values, slab by slab, in place."""
        flat = values.reshape(-1)
        for s in _slabs(flat.size):
            chunk = flat[s].astype(np.intp)
            chunk -= self.minimum
            flat[s] = self.lut[chunk]
        return values

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(target intensity in its own units, matched source intensity) for plotting."""
        v = np.arange(self.lut.size) + self.minimum
        return v / self.scale, self.lut.astype(np.float64)


#: A profile side within this many HU of SM's own CT limit counts as unwindowed (a raw-CT profile's
#: top key sits a few HU below 1024, because the histogram drops the maximum and merges the top bins).
_WINDOW_SLACK_HU = 16


def match_window(profile: SourceProfile, target_modality: Modality) -> tuple[int, int] | None:
    """The HU range a CT target is clipped to before matching onto a CT ``profile`` — the source
    data's own intensity range, when it is narrower than SM's [-1023, 1024] — or None (no change).

    Why (our departure from SRCSM §2.1, docs/departures.md): the bundled CT model's source data
    were published clipped to [-125, 275] HU, so in its profile everything below -125 HU is one value
    (the image minimum, left out of the histogram). A raw scanner CT ranked against that profile puts
    its air and lung into the source's soft tissue and shifts every tissue upwards (soft tissue 40 HU →
    ~110). Clipping the target to the source's range first gives it the same structure — its air and
    fat at the floor, left out like the source's — and makes SM of such a CT close to the identity.
    The range is the profile's ``overall_min`` and its top value (the histogram's top key; SM's
    histogram drops the maximum itself, so that is a few HU below the window's ceiling: a voxel
    above it maps to the source's top value either way). For a source of raw CT the range is
    SM's own and nothing changes; MR targets and MR sources are never clipped.
    """
    if target_modality != "CT" or profile.modality != "CT":
        return None
    lo, hi = CT_MATCH_RANGE
    if int(profile.overall_min) > lo + _WINDOW_SLACK_HU:
        lo = int(profile.overall_min)
    if int(profile.values[-1]) < hi - _WINDOW_SLACK_HU:
        hi = int(profile.values[-1])
    if (lo, hi) == CT_MATCH_RANGE or hi <= lo:
        return None
    return lo, hi


def fit_mapping(array: np.ndarray, profile: SourceProfile, target_modality: Modality | Literal["auto"] = "auto",
                values: np.ndarray | None = None, scale: float | None = None) -> QuantileMapping:
    """Compute the quantile mapping of a target image onto ``profile`` (§2.3), after the target's
    preprocessing (with the source's window for a CT target, :func:`match_window`)."""
    modality: Modality = guess_modality(array) if target_modality == "auto" else target_modality
    if values is None or scale is None:
        raw = fit_raw_mapping(array, profile, modality)
        if raw is not None:
            return raw.mapping
        values, scale = preprocess_for_matching(array, modality, match_window(profile, modality))
    return mapping_from_histogram(histogram(values), profile, modality, scale)


def mapping_from_histogram(h: Histogram, profile: SourceProfile, modality: Modality, scale: float) -> QuantileMapping:
    """The lookup table of §2.3 for a target's (preprocessed) histogram."""
    f_t = h.cdf()
    v = np.arange(h.minimum, h.maximum + 1, dtype=np.int64)
    # snap each integer value to its nearest histogram key, ties to the upper key
    pos = np.searchsorted(h.keys, v, side="left")
    upper = h.keys[np.clip(pos, 0, h.keys.size - 1)]
    lower = h.keys[np.clip(pos - 1, 0, h.keys.size - 1)]
    use_upper = (pos < h.keys.size) & ((pos == 0) | (upper - v <= v - lower))
    snapped_index = np.where(use_upper, np.clip(pos, 0, h.keys.size - 1), np.clip(pos - 1, 0, None))
    p = f_t[snapped_index]
    p[0] = -1.0  # the target minimum maps to the source's overall minimum
    lut = profile.quantile(p)
    info = np.iinfo(np.int16)
    return QuantileMapping(
        minimum=h.minimum,
        lut=np.clip(lut, info.min, info.max).astype(np.int16),
        scale=float(scale),
        target_modality=modality,
        target_histogram=h,
    )


@dataclass(frozen=True)
class RawMapping:
    """A quantile mapping expressed over the raw values of an integer image: ``mapped[i]`` is the
    source value of every voxel whose raw value is ``keys[i]``.

    Why: SM's per-image rule (clip, or scale and round) is a function of the raw value, so the
    histogram of the preprocessed image follows from the raw values' counts, and preprocessing plus
    lookup collapse into one table — two passes over the voxels instead of four, no int16 copy."""

    mapping: QuantileMapping
    keys: np.ndarray  # int64, ascending
    mapped: np.ndarray  # int16
    _tables: dict = field(default_factory=dict, repr=False, compare=False)  # lookup tables by dtypes

    def apply(self, array: np.ndarray, dtype: type = np.int16) -> np.ndarray:
        """The matched image (``dtype``: int16, or float32 for the network), in threads over slabs."""
        out = np.empty(array.shape, dtype=dtype)
        self.apply_into(array, out)
        return out

    def apply_into(self, array: np.ndarray, out: np.ndarray) -> None:
        """Write the matched values of ``array`` (raw values of the fitted image) into ``out`` (same
        shape, contiguous, any numeric dtype); in threads over slabs. Resampling calls this on each
        input slab (:func:`.resampling.smooth_and_resample`), so no full matched copy is made."""
        table = self._table(array.dtype, out.dtype)
        unsigned = _unsigned_view(array.dtype)
        if unsigned is not None and array.size <= _LOOKUP_SLAB_VOXELS:  # a small (maybe strided) block
            np.take(table, array.view(unsigned), out=out)
            return
        flat, out_flat = np.ascontiguousarray(array).reshape(-1), out.reshape(-1)
        if unsigned is not None:
            codes = flat.view(unsigned)

            def look_up(s: slice) -> None:
                np.take(table, codes[s], out=out_flat[s])
        else:
            lo = int(self.keys[0])

            def look_up(s: slice) -> None:
                index = flat[s].astype(np.intp)
                index -= lo
                np.take(table, index, out=out_flat[s])

        _map_slabs(flat.size, look_up, step=_LOOKUP_SLAB_VOXELS)

    def _table(self, in_dtype: np.dtype, out_dtype: np.dtype) -> np.ndarray:
        key = (np.dtype(in_dtype).str, np.dtype(out_dtype).str)
        cached = self._tables.get(key)
        if cached is not None:
            return cached
        unsigned = _unsigned_view(np.dtype(in_dtype))
        if unsigned is not None:
            table = np.zeros(1 << (8 * np.dtype(in_dtype).itemsize), dtype=out_dtype)
            table[self.keys.astype(in_dtype).view(unsigned)] = self.mapped
        else:
            table = np.zeros(int(self.keys[-1]) - int(self.keys[0]) + 1, dtype=out_dtype)
            table[self.keys - int(self.keys[0])] = self.mapped
        self._tables[key] = table
        return table


def fit_raw_mapping(array: np.ndarray, profile: SourceProfile, modality: Modality) -> RawMapping | None:
    """SM of an integer image through its raw values (:class:`RawMapping`), or None for a float image
    or one with more than 2²⁰ levels (then: :func:`preprocess_for_matching`, :func:`histogram`)."""
    counted = integer_value_counts(array)
    if counted is None:
        return None
    keys, counts = counted
    # the per-image rule on the raw values present (for MR the maximum is the image's own)
    pre, scale = preprocess_for_matching(keys, modality, match_window(profile, modality))
    pre = pre.astype(np.int64)
    first = int(pre.min())
    pooled = np.zeros(int(pre.max()) - first + 1, dtype=np.int64)
    np.add.at(pooled, pre - first, counts)
    mapping = mapping_from_histogram(histogram_from_counts(pooled, first), profile, modality, scale)
    return RawMapping(mapping=mapping, keys=keys, mapped=mapping.lut[pre - mapping.minimum])


def source_match(volume: Volume, profile: SourceProfile, target_modality: Modality | Literal["auto"] = "auto",
                 dtype: type = np.int16) -> tuple[Volume, QuantileMapping]:
    """Source-match a target volume → (the matched volume, same geometry, in the source's intensity
    scale as ``dtype``; the mapping). The one definition of SM that segmentation (float32, straight
    into resampling), ``srcsm match`` and the module's preview (int16) all call."""
    modality: Modality = guess_modality(volume.array) if target_modality == "auto" else target_modality
    raw = fit_raw_mapping(volume.array, profile, modality)
    if raw is not None:
        return Volume(raw.apply(volume.array, dtype), volume.geometry, dict(volume.metadata)), raw.mapping
    values, scale = preprocess_for_matching(volume.array, modality, match_window(profile, modality))
    mapping = fit_mapping(volume.array, profile, modality, values=values, scale=scale)
    mapping.apply_inplace(values)
    out = values if np.dtype(dtype) == np.int16 else values.astype(dtype)
    return Volume(out, volume.geometry, dict(volume.metadata)), mapping


def match(volume: Volume, profile: SourceProfile,
          target_modality: Modality | Literal["auto"] = "auto") -> Volume:
    """Source-match a target volume: same geometry, int16 voxels in the source's intensity scale
    (:func:`source_match`)."""
    return source_match(volume, profile, target_modality)[0]
