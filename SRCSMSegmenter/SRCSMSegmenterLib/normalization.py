"""Intensity normalisation of a modality — one definition for training, inference and preview.

Two rules, as in SRCSM §3.4 with one deliberate change for CT:

* ``ct_window``: clip to a HU window and map it linearly onto [-1, 1]. The paper divides raw HU by
  2048; our CT training data were published already clipped to [-125, 275] HU, so a model trained on
  them must see every CT (and every CT-matched MR) through that same window. Mapping the window onto
  [-1, 1] instead of /2048 only rescales the input (the network and SRC are insensitive to it) but
  keeps the random intensity shift of ±0.2 meaningful.
* ``mr_robust``: the 5th and 95th percentiles → -1 and +1, affine, clamped below at -1 only. The
  paper takes the percentiles over the landmark ROI; we take them over the whole resampled volume
  (training caches and inference alike), because inference has no ROI.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

#: At most this many voxels enter the percentile estimate (a regular subsample): exact enough for
#: a robust range, and it keeps normalisation of a 512×512×300 CT well under a second.
_PERCENTILE_SAMPLE = 2_000_000


class Normalization(BaseModel):
    """How raw intensities of one modality become network input."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ct_window", "mr_robust"]
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (5.0, 95.0)

    @model_validator(mode="after")
    def _check(self) -> "Normalization":
        if self.type == "ct_window":
            if self.window is None or not self.window[0] < self.window[1]:
                raise ValueError("ct_window needs window [low, high] with low < high (HU)")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


def default_normalization(modality: str) -> Normalization:
    """The normalisation used for a modality when a model does not prescribe one (SM off, target
    modality differs from the source)."""
    if modality.upper() == "CT":
        return Normalization(type="ct_window", window=(-125.0, 275.0))
    return Normalization(type="mr_robust")


def robust_range(array: np.ndarray, percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[float, float]:
    """Low/high percentiles of a volume (regular subsample of at most 2 M voxels)."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    lo, hi = np.percentile(flat[::step].astype(np.float32), percentiles)
    if hi <= lo:  # nearly constant image: fall back to the full range so we never divide by zero
        lo, hi = float(flat.min()), float(flat.max())
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def intensity_affine(array: np.ndarray, norm: Normalization) -> tuple[float, float, float | None, float | None]:
    """The affine ``y = x*scale + offset`` and clamp bounds that ``norm`` applies to this volume.

    Separated from :func:`normalize` so that the trainer can compute it once per cached volume and
    apply it (plus random shift/scale) to patches on the GPU.
    """
    if norm.type == "ct_window":
        lo, hi = norm.window  # type: ignore[misc]
        return 2.0 / (hi - lo), -1.0 - 2.0 * lo / (hi - lo), -1.0, 1.0
    lo, hi = robust_range(array, norm.percentiles)
    return 2.0 / (hi - lo), -1.0 - 2.0 * lo / (hi - lo), -1.0, None


def normalize(array: np.ndarray, norm: Normalization) -> np.ndarray:
    """Normalise a whole volume to float32 network input."""
    scale, offset, lo, hi = intensity_affine(array, norm)
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
