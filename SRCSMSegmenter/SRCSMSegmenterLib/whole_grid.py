"""One forward pass over the whole model grid (``InferenceSpec.strategy = "whole_grid"``).

Why: the networks are fully convolutional, so nothing forces them to see the scan through
``patch_size`` windows. A sliding window at 50 % overlap evaluates every voxel of a large grid about
eight times, and each window sees only its own 80³ cut of the anatomy, with padding seams at its
borders. One pass over the whole grid evaluates each voxel once, with the whole field of view as
context. Measured with the bundled cardiac model (docs/benchmarks.md): an oblique cine stack's
48 windows → one pass, ≈ 5× less time, and a higher Dice on both bSSFP and LGE. Whether a model
uses it is measured on its validation cases and written in its card (``train choose-postprocessing``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .sliding_window import pad_image

#: the predictor: (1, 1, *grid) → class probabilities (1, C, *grid)
Predictor = Callable[[torch.Tensor], torch.Tensor]


def padding_to_divisor(shape: Sequence[int], divisor: int) -> list[int]:
    """``F.pad`` amounts (last axis first) that bring each axis up to a multiple of ``divisor``,
    split evenly (the extra voxel after), so the grid stays centred in the padded input."""
    if divisor < 1:
        raise ValueError(f"divisor must be positive, got {divisor}")
    pad: list[int] = []
    for size in reversed(list(shape)):
        extra = (-int(size)) % divisor
        pad.extend([extra // 2, extra - extra // 2])
    return pad


def padded_voxels(shape: Sequence[int], divisor: int) -> int:
    """Voxels of the grid once padded to the divisor (what the memory of one pass scales with)."""
    return math.prod(int(s) + (-int(s)) % divisor for s in shape)


def whole_grid_probabilities(image: torch.Tensor, predictor: Predictor, *, divisor: int, cval: float,
                             device: torch.device | None = None, padding_mode: str = "constant") -> torch.Tensor:
    """Class probabilities (C, K, J, I, float32, CPU) of a (K, J, I) image in one forward pass.

    The image is padded with ``cval`` (the value the sliding window pads with: the image's minimum,
    i.e. air or background) — or, with ``padding_mode="replicate"``, by its edge voxels — up to multiples
    of ``divisor``, and the padding is cut off again.
    """
    if image.dim() != 3:
        raise ValueError(f"expected a (K, J, I) image, got shape {tuple(image.shape)}")
    pad = padding_to_divisor(image.shape, divisor)
    x = image[None, None]
    if any(pad):
        x = pad_image(x, pad, padding_mode, cval)
    probs = predictor(x.to(device or torch.device("cpu")))
    if probs.dim() != 5 or probs.shape[0] != 1 or tuple(probs.shape[2:]) != tuple(x.shape[2:]):
        raise RuntimeError(f"the network returned shape {tuple(probs.shape)} for an input {tuple(x.shape)}")
    k0, k1, j0, j1, i0, i1 = pad[4], pad[5], pad[2], pad[3], pad[0], pad[1]
    k, j, i = (int(s) for s in image.shape)
    crop = probs[0, :, k0:k0 + k, j0:j0 + j, i0:i0 + i]
    return crop.to(device="cpu", dtype=torch.float32).contiguous()
