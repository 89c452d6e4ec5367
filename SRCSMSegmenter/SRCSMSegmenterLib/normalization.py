"""Intensity normalisation of a modality — one definition for training, inference and preview.

Two rules, as in SRCSM §3.4 with one deliberate change for CT:

* ``ct_window``: clip to a HU window and map it linearly onto [-1, 1]. The paper divides raw HU by
  2048; our CT training data were published already clipped to [-125, 275] HU, so a model trained on
  them must see every CT (and every CT-matched MR) through that same window. Mapping the window onto
  [-1, 1] instead of /2048 only rescales the input (the network and SRC are insensitive to it) but
  keeps the random intensity shift of ±0.2 meaningful.
* ``mr_robust``: the 5th and 95th percentiles → -1 and +1, affine, clamped below at -1 only. The
  paper takes the percentiles over the landmark ROI; we take them over the whole resampled volume
  (training caches and inference alike), because inference has no ROI. With ``exclude_minimum``
  (recipe v2) voxels at the volume's minimum do not enter them: the model grid is filled with the
  image's minimum outside its field of view and a padded scan carries it too, so without the
  exclusion the percentiles — and the network's input — change with how much empty space surrounds
  the anatomy (an oblique short-axis stack's world-aligned box is mostly empty; a cine padded to a
  500 mm field of view lost all three cardiac structures, docs/robustness.md). Cards without the
  field keep the v1 rule their models were trained with.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

#: At most this many voxels enter the percentile estimate (a regular subsample): exact enough for
#: a robust range, and it keeps normalisation of a 512×512×300 CT well under a second.
_PERCENTILE_SAMPLE = 2_000_000
#: ``exclude_minimum``: voxels within this fraction of the intensity range above the fill count as empty
_EMPTY_TOLERANCE = 1e-3


class Normalization(BaseModel):
    """How raw intensities of one modality become network input."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ct_window", "mr_robust"]
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (5.0, 95.0)
    #: mr_robust: leave the voxels at the volume's minimum (fill outside the field of view, padding,
    #: masked air) out of the percentiles, so the input does not depend on the empty space around it
    exclude_minimum: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Normalization":
        if self.type == "ct_window":
            if self.window is None or not self.window[0] < self.window[1]:
                raise ValueError("ct_window needs window [low, high] with low < high (HU)")
        if self.exclude_minimum and self.type != "mr_robust":
            raise ValueError("exclude_minimum applies to mr_robust percentiles only (a CT window has none)")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


def default_normalization(modality: str) -> Normalization:
    """The normalisation used for a modality when a model does not prescribe one (SM off, target
    modality differs from the source)."""
    if modality.upper() == "CT":
        return Normalization(type="ct_window", window=(-125.0, 275.0))
    return Normalization(type="mr_robust")


def robust_range(array: np.ndarray, percentiles: tuple[float, float] = (5.0, 95.0),
                 exclude_minimum: bool = False, fill: float | None = None) -> tuple[float, float]:
    """Low/high percentiles of a volume (regular subsample of at most 2 M voxels).

    ``exclude_minimum``: only voxels above the empty space count — above ``fill`` (the value written
    outside the field of view; default: the array's minimum) by more than 0.1 % of the intensity range,
    because smoothing before resampling leaves a padded region a hair off its fill value and rings
    slightly below it at its edges."""
    flat = np.asarray(array).reshape(-1)
    if exclude_minimum and flat.size:
        floor = float(flat.min()) if fill is None else float(fill)
        above = flat > floor + _EMPTY_TOLERANCE * (float(flat.max()) - floor)
        if above.any():
            flat = flat[above]
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    lo, hi = np.percentile(flat[::step].astype(np.float32), percentiles)
    if hi <= lo:  # nearly constant image: fall back to the full range so we never divide by zero
        lo, hi = float(flat.min()), float(flat.max())
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def intensity_affine(array: np.ndarray, norm: Normalization,
                     fill: float | None = None) -> tuple[float, float, float | None, float | None]:
    """The affine ``y = x*scale + offset`` and clamp bounds that ``norm`` applies to this volume
    (``fill``: the value outside its field of view, for ``exclude_minimum``).

    Separated from :func:`normalize` so that the trainer can compute it once per cached volume and
    apply it (plus random shift/scale) to patches on the GPU.
    """
    if norm.type == "ct_window":
        lo, hi = norm.window  # type: ignore[misc]
        return 2.0 / (hi - lo), -1.0 - 2.0 * lo / (hi - lo), -1.0, 1.0
    lo, hi = robust_range(array, norm.percentiles, norm.exclude_minimum, fill)
    return 2.0 / (hi - lo), -1.0 - 2.0 * lo / (hi - lo), -1.0, None


def normalize(array: np.ndarray, norm: Normalization, fill: float | None = None) -> np.ndarray:
    """Normalise a whole volume to float32 network input (``fill``: see :func:`intensity_affine`)."""
    scale, offset, lo, hi = intensity_affine(array, norm, fill)
    out = array.astype(np.float32, copy=True)
    out *= np.float32(scale)
    out += np.float32(offset)
    np.clip(out, lo, hi, out=out)
    return out


def normalize_tensor(x: torch.Tensor, scale: torch.Tensor | float, offset: torch.Tensor | float,
                     lo: float | None, hi: float | None) -> torch.Tensor:
    """Torch twin of :func:`normalize` for batched patches (scale/offset broadcast per sample)."""
    y = x * scale + offset
    if lo is None and hi is None:
        return y
    return torch.clamp(y, min=lo, max=hi)
