"""The pipeline a user would write with the field's libraries — the reference for our fast path.

SimpleITK σ-mm smoothing + linear resampling to the model grid → MONAI ``sliding_window_inference``
over the whole grid → every probability channel resampled back with SimpleITK → argmax. Same model
package, same source matching and normalisation (our library's), same network settings (precision,
channels-last), so the only differences from ``Segmenter.segment`` are the resampling and the
window scheduling. The tests use it to check that ``Segmenter`` gives today's labels; the side-by-side
benchmark times it against ``Segmenter``. It is deliberately not in the library: it is the slow
baseline, not a second implementation for users.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch

from SRCSMSegmenterLib.device import autocast, memory_format
from SRCSMSegmenterLib.image import Volume
from SRCSMSegmenterLib.matching import match
from SRCSMSegmenterLib.modelpackage import ModelPackage
from SRCSMSegmenterLib.normalization import normalize
from SRCSMSegmenterLib.preprocessing import model_grid


def plain_segment(volume: Volume, package: ModelPackage, *, modality: str = "CT", precision: str = "fp32",
                  network: torch.nn.Module | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """(uint8 labels on the input grid, seconds per step) — source matching on, CPU."""
    from monai.inferers import sliding_window_inference

    card = package.card
    device = torch.device("cpu")
    net = network if network is not None else package.build_network()
    fmt = memory_format(device, precision, net)
    net = net.to(memory_format=fmt)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    matched = match(volume, card.source_profile, modality)
    t["match_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    image = sitk.GetImageFromArray(matched.array.astype(np.float32))
    matched.geometry.apply_to(image)
    image = sitk.SmoothingRecursiveGaussian(image, card.inference.pre_smoothing_mm)
    grid = model_grid(volume.geometry, volume.shape, card.spacing)
    ref = grid.geometry.apply_to(sitk.Image([int(s) for s in grid.size], sitk.sitkFloat32))
    resampled = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, float(matched.array.min()),
                              sitk.sitkFloat32)
    x = normalize(sitk.GetArrayFromImage(resampled), card.normalization)
    t["resample_in_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    roi = tuple(int(p) for p in reversed(card.patch_size))
    pad = card.inference.padding_mode

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return torch.softmax(net(patch.to(memory_format=fmt)).float(), dim=1)

    with torch.inference_mode():
        probs = sliding_window_inference(torch.from_numpy(x)[None, None], roi, 1, predictor,
                                         overlap=card.inference.overlap, mode=card.inference.blend_mode,
                                         # a grid thinner than the window is padded as the card says (torch
                                         # takes a fill value only for constant padding)
                                         padding_mode=pad, cval=float(x.min()) if pad == "constant" else 0.0
                                         )[0].numpy()
    t["network_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    target = volume.geometry.apply_to(sitk.Image([int(s) for s in reversed(volume.shape)], sitk.sitkFloat32))
    channels = []
    for c in range(probs.shape[0]):
        channel = sitk.GetImageFromArray(np.ascontiguousarray(probs[c]))
        grid.geometry.apply_to(channel)
        channels.append(sitk.GetArrayFromImage(sitk.Resample(channel, target, sitk.Transform(), sitk.sitkLinear,
                                                             1.0 if c == 0 else 0.0, sitk.sitkFloat32)))
    labels = np.argmax(np.stack(channels), axis=0).astype(np.uint8)
    t["resample_back_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    return labels, t
