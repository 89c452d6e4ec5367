"""Random intensity shift/scale after normalisation — SRCSM §1.4 "Intensity", per sample, batched.

The reference's order is ``x = normalise(x); x += U(-s, s); x *= 1 + U(-c, c); clamp``:

=====  ======  ===========  ===========
rule   shift   scale        clamp
=====  ======  ===========  ===========
CT     ±0.2    ×(1 ± 0.2)   [-1, 1]
MR     ±0.2    ×(1 ± 0.4)   [-1, +∞)
=====  ======  ===========  ===========

The reference clamps only once, *after* the random part. To match it, normalise **without**
clamping (``normalize_tensor(x, scale, offset, None, None)`` with the affine of
:func:`SRCSMSegmenterLib.normalization.intensity_affine`) and let :func:`random_intensity` clamp.
Clamping twice differs only for voxels outside the normalisation range (e.g. MR below the 5th
percentile after a positive shift). The arithmetic reuses ``normalize_tensor``, the library's single
definition of "affine, then clamp".
"""

from __future__ import annotations

import torch

from SRCSMSegmenterLib.normalization import Normalization, normalize_tensor

from ._common import GeneratorLike, as_generator, check_image, uniform

#: (shift, scale, clamp low, clamp high) per rule.
INTENSITY_RULES: dict[str, tuple[float, float, float | None, float | None]] = {
    "CT": (0.2, 0.2, -1.0, 1.0),
    "MR": (0.2, 0.4, -1.0, None),
}


def intensity_rule(modality: str | Normalization) -> tuple[float, float, float | None, float | None]:
    """``(shift, scale, lo, hi)`` for ``"CT"``/``"MR"`` or a :class:`Normalization` (ct_window → CT)."""
    if isinstance(modality, Normalization):
        key = "CT" if modality.type == "ct_window" else "MR"
    else:
        key = str(modality).upper()
    if key not in INTENSITY_RULES:
        raise ValueError(f"modality must be 'CT' or 'MR' (or a Normalization), got {modality!r}")
    return INTENSITY_RULES[key]


@torch.no_grad()
def random_intensity(image: torch.Tensor, modality: str | Normalization, generator: GeneratorLike = None, *,
                     shift: float | None = None, scale: float | None = None) -> torch.Tensor:
    """``clamp((x + U(±shift)) · (1 + U(±scale)))`` per sample of normalised ``image (B, 1, D, H, W)``.

    ``shift``/``scale`` override the modality's ranges; clamp bounds are the modality's.
    Returns a new float32 tensor.
    """
    check_image(image)
    s_range, c_range, lo, hi = intensity_rule(modality)
    s_range = s_range if shift is None else shift
    c_range = c_range if scale is None else scale
    g = as_generator(generator)
    b = image.shape[0]
    s = uniform((b,), -s_range, s_range, g, image.device).view(b, 1, 1, 1, 1)
    c = 1.0 + uniform((b,), -c_range, c_range, g, image.device).view(b, 1, 1, 1, 1)
    # (x + s)·c = x·c + s·c: one affine, then the clamp
    return normalize_tensor(image.float(), c, s * c, lo, hi)


__all__ = ["INTENSITY_RULES", "intensity_rule", "random_intensity"]
