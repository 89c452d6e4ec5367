"""Gaussian-blended sliding window that runs only the windows whose output is needed.

Why not MONAI's ``sliding_window_inference`` as is: the model grid is world-aligned, so for an
oblique input (every cardiac short-axis stack) most of its bounding box lies outside the image, and
MONAI runs every window of the box. Here the window positions, the Gaussian importance map, the
padding and the order of accumulation are MONAI's (``dense_patch_slices``, ``compute_importance_map``,
the same scan interval and padding — re-stated below and pinned equal to MONAI's by
``Testing/test_inference.py``, because importing ``monai`` costs 2.6 s of every cold ``srcsm segment``,
40 % of what a user waits), and a window is skipped when it holds no voxel of ``needed``. Every window that covers a needed voxel contains it and so is run, in
MONAI's order: the blended probabilities at needed voxels are bit-identical to MONAI's. Voxels that
no run window covers get probability 1 for the background channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import itertools

import numpy as np
import torch
import torch.nn.functional as F

#: the predictor: a batch of windows (B, 1, *roi) → class probabilities (B, C, *roi)
Predictor = Callable[[torch.Tensor], torch.Tensor]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's scan interval (``monai.inferers.utils._get_scan_interval``), which is private there."""
    return tuple(int(r) if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(image_size, roi_size))


#: How an input smaller than the network's window is padded (``Segmenter(padding_mode=…)``).
PADDING_MODES = ("constant", "replicate")


def pad_image(x: torch.Tensor, pad: Sequence[int], padding_mode: str, cval: float) -> torch.Tensor:
    """``x`` (N, C, K, J, I) padded by ``pad`` (``F.pad`` order) with ``cval`` or by its edge voxels."""
    if padding_mode == "constant":
        return F.pad(x, pad=list(pad), mode="constant", value=cval)
    if padding_mode == "replicate":
        return F.pad(x, pad=list(pad), mode="replicate")
    raise ValueError(f"unknown padding mode {padding_mode!r}; choose one of {', '.join(PADDING_MODES)}")


def _padding(image_size: Sequence[int], roi_size: Sequence[int]) -> list[int]:
    """MONAI's symmetric padding (in ``F.pad`` order: last axis first) of an image smaller than the window."""
    pad: list[int] = []
    for s, r in zip(reversed(list(image_size)), reversed(list(roi_size))):
        diff = max(r - s, 0)
        pad.extend([diff // 2, diff - diff // 2])
    return pad


def dense_window_slices(image_size: Sequence[int], roi_size: Sequence[int],
                        interval: Sequence[int]) -> list[tuple[slice, ...]]:
    """MONAI's ``dense_patch_slices``: per axis, starts every ``interval`` voxels until a window reaches
    the end, the last one moved back to end exactly at the border; all combinations, first axis slowest."""
    starts_per_axis = []
    for size, roi, step in zip(image_size, roi_size, interval):
        starts = [0]
        while starts[-1] + roi < size:
            starts.append(starts[-1] + step)
        starts_per_axis.append([min(s, size - roi) for s in starts])
    return [tuple(slice(s, s + r) for s, r in zip(corner, roi_size)) for corner in itertools.product(*starts_per_axis)]


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's ``compute_importance_map(mode="gaussian")``: the outer product of one 1-D Gaussian per axis
    (σ = ``sigma_scale`` × window size, centred between the middle voxels), floored at its minimum or 1e-3."""
    weight: torch.Tensor | None = None
    for axis, size in enumerate(roi_size):
        x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x ** 2 / (-2 * (size * sigma_scale) ** 2))
        weight = g if weight is None else weight.unsqueeze(-1) * g[(None,) * axis]
    assert weight is not None
    return torch.clamp_(weight, min=max(float(weight.min()), 1e-3))


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Window positions in the (padded) image, in the order MONAI visits them."""
    padded = tuple(max(s, r) for s, r in zip(image_size, roi_size))
    return dense_window_slices(padded, tuple(roi_size), scan_interval(padded, roi_size, overlap))


def _pad_mask(needed: np.ndarray, roi_size: Sequence[int]) -> np.ndarray:
    """The mask padded as MONAI pads the image."""
    pad = _padding(needed.shape, roi_size)
    if not any(pad):
        return needed
    return np.pad(needed, list(zip(pad[::2][::-1], pad[1::2][::-1])), constant_values=False)


def needed_windows(needed: np.ndarray, roi_size: Sequence[int], overlap: float) -> tuple[list[tuple[slice, ...]], int]:
    """(MONAI's windows that hold at least one needed voxel, number of windows MONAI would run)."""
    slices = window_slices(needed.shape, roi_size, overlap)
    padded = _pad_mask(needed, roi_size)
    return [s for s in slices if padded[s].any()], len(slices)


def sliding_window_probabilities(image: torch.Tensor, roi_size: Sequence[int], predictor: Predictor, *,
                                 overlap: float, mode: str = "gaussian", cval: float = 0.0,
                                 needed: np.ndarray | None = None, sw_batch_size: int = 1,
                                 sw_device: torch.device | None = None,
                                 on_window: Callable[[int, int], None] | None = None,
                                 padding_mode: str = "constant") -> torch.Tensor:
    """Blended class probabilities (C, K, J, I) on the CPU for a (K, J, I) float32 image.

    ``needed`` (bool, same shape; None = all) marks the voxels whose probabilities are used;
    ``on_window(done, total)`` is called after each batch of windows (progress, cancellation).
    ``padding_mode`` pads an image smaller than the window as MONAI's ``padding_mode`` does: ``constant``
    (with ``cval``, what the models were trained with) or ``replicate`` (the edge voxels continued).
    """
    sw_device = sw_device or torch.device("cpu")
    roi = tuple(int(r) for r in roi_size)
    image_size_ = tuple(int(s) for s in image.shape)
    if needed is None:
        needed = np.ones(image_size_, dtype=bool)
    if needed.shape != image_size_:
        raise ValueError(f"needed mask {needed.shape} does not match the image {image_size_}")
    windows, _ = needed_windows(needed, roi, overlap)
    pad = _padding(image_size_, roi)
    x = image[None, None]
    if any(pad):
        x = pad_image(x, pad, padding_mode, cval)
    size = tuple(x.shape[2:])
    if mode == "gaussian":
        weight = gaussian_importance_map(roi)[None, None].to(sw_device)
    elif mode == "constant":
        weight = torch.ones((1, 1, *roi), dtype=torch.float32, device=sw_device)
    else:
        raise ValueError(f"unknown blending mode {mode!r}: use 'gaussian' or 'constant'")
    weight_cpu = weight.to("cpu")
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, *size), dtype=torch.float32)
    total = len(windows)
    for start in range(0, total, sw_batch_size):
        batch = windows[start:start + sw_batch_size]
        data = torch.cat([x[(slice(None), slice(None), *s)] for s in batch]).to(sw_device)
        probs = predictor(data)
        probs = (probs * weight).to("cpu")
        if out is None:
            out = torch.zeros((1, probs.shape[1], *size), dtype=torch.float32)
        for b, s in enumerate(batch):
            out[(slice(0, 1), slice(None), *s)] += probs[b:b + 1]
            count[(slice(None), slice(None), *s)] += weight_cpu
        if on_window is not None:
            on_window(min(total, start + len(batch)), total)
    if out is None:  # nothing needed: all background
        raise ValueError("no voxel of the image is needed: the region to segment is empty")
    covered = count > 0
    if not bool(covered[0, 0][torch.from_numpy(_pad_mask(needed, roi))].all()):  # a tiling bug, never data
        raise RuntimeError("sliding window: some needed voxels are in no window")
    out /= torch.where(covered, count, torch.ones_like(count))
    if not bool(covered.all()):
        uncovered = ~covered[0, 0]
        out[0, :, uncovered] = 0.0
        out[0, 0, uncovered] = 1.0
    if any(pad):
        crop = tuple(slice(before, before + n) for before, n in zip(pad[::2][::-1], image_size_))
        out = out[(slice(None), slice(None), *crop)]
    return out[0]
