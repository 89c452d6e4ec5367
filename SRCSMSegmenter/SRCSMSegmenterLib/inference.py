"""Whole-volume inference: a volume in, a labelmap in the input's exact grid out.

Pipeline (docs/DESIGN.md): source matching (optional) → normalisation of the *source* modality →
σ = 1 mm pre-smoothing and resampling to the world-aligned model grid → the network, as the card's
``inference.strategy`` says: one pass over the whole grid (:mod:`.whole_grid`), or a Gaussian-weighted
sliding window (MONAI's windows and blending; windows that hold no voxel the output reads are
skipped) → softmax probabilities resampled linearly back onto the input grid → argmax → optional clean-up.
The resampling in both directions costs what it produces, not the input's size (:mod:`.resampling`).

Departure from the paper (docs/SRCSM.md, "Our departures" 1): no ground-truth landmark ROI; the
sliding window covers the whole volume, or a user-given ROI.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from .device import autocast, is_out_of_memory, memory_format, resolve_device, resolve_precision
from .errors import CancelledError, InputError, SRCSMError
from .field_of_view import thin_view_warning, thinnest_view
from .image import Volume, validate_array
from .matching import Modality, fit_raw_mapping, guess_modality, source_match
from .modelpackage import ModelPackage
from .network import spec_divisor
from .normalization import Normalization, default_normalization, normalize
from .postprocess import PostProcessing, keep_largest_components  # noqa: F401 (re-exported)
from .postprocess import apply as apply_postprocessing
from .preprocessing import Grid, argmax_in_target_grid, model_grid, needed_mask, to_model_grid
from .sliding_window import PADDING_MODES, sliding_window_probabilities
from .whole_grid import padded_voxels, whole_grid_probabilities

log = logging.getLogger(__name__)

#: progress(fraction in 0..1, message)
ProgressCallback = Callable[[float, str], None]
#: cancel() → True to stop as soon as possible
CancelCallback = Callable[[], bool]


@dataclass
class SegmentationResult:
    labelmap: Volume
    device: str
    precision: str
    source_matching: bool
    normalization: Normalization
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    postprocessing: str = "none"  # the clean-up applied (PostProcessing.cli_value())
    strategy: str = "sliding_window"  # how the network ran: "whole_grid" (one pass) or "sliding_window"
    # the thinnest extent (mm) of the segmented view when it was too thin for the card's measured slabs on
    # ``target_modality`` (the thin-view warning is among ``messages``); None when it was not. Front ends
    # name a better-suited model from these, so the decision is made once, here.
    thin_view_mm: float | None = None
    thin_view_voxel_mm: float = 0.0  # the voxel size along that extent (0: a region of interest's box)
    target_modality: str | None = None  # the modality the source matching and the field-of-view check used


def count_windows(image_size: tuple[int, ...], roi_size: tuple[int, ...], overlap: float) -> int:
    """Number of sliding-window positions MONAI's inferer will visit (for progress reporting)."""
    total = 1
    for img, roi in zip(image_size, roi_size):
        if roi >= img:
            continue
        interval = max(1, int(roi * (1 - overlap)))
        total *= math.ceil((img - roi) / interval) + 1
    return total


class Segmenter:
    """Applies one model package to volumes.

    ``progress`` receives (fraction, message); ``cancel`` is polled between sliding-window steps and
    makes :meth:`segment` raise :class:`CancelledError`. On a CUDA out-of-memory error the work is
    redone on the CPU and a message says so (``result.messages``), unless ``fallback_to_cpu=False``.
    ``strategy`` overrides the card's ``inference.strategy`` (comparisons, benchmarks); "card" follows it.
    ``padding_mode`` likewise overrides the card's ``inference.padding_mode``.
    """

    def __init__(self, package: ModelPackage, device: str = "auto", precision: str = "auto",
                 progress: ProgressCallback | None = None, cancel: CancelCallback | None = None,
                 sw_batch_size: int = 1, fallback_to_cpu: bool = True,
                 strategy: Literal["card", "sliding_window", "whole_grid"] = "card",
                 padding_mode: Literal["card", "constant", "replicate"] = "card") -> None:
        self.package = package
        self.card = package.card
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.device, precision)
        self._requested_precision = precision
        self.progress = progress or (lambda f, m: None)
        self.cancel = cancel or (lambda: False)
        self.sw_batch_size = sw_batch_size
        self.fallback_to_cpu = fallback_to_cpu
        if strategy not in ("card", "sliding_window", "whole_grid"):
            raise ValueError(f"unknown inference strategy {strategy!r}: use card, sliding_window or whole_grid")
        self.strategy = self.card.inference.strategy if strategy == "card" else strategy
        if padding_mode != "card" and padding_mode not in PADDING_MODES:
            raise ValueError(f"unknown padding mode {padding_mode!r}: use card, {' or '.join(PADDING_MODES)}")
        #: how a model grid smaller than the window is padded: ``constant`` (the grid's minimum) or
        #: ``replicate`` (its edge voxels), as the card says unless overridden (docs/benchmarks.md
        #: "Padding a thin scan")
        if padding_mode == "card":  # a card from before the field pads constantly (pydantic's default)
            padding_mode = self.card.inference.padding_mode if self.card is not None else "constant"
        self.padding_mode: str = padding_mode
        #: how the network ran in the last :meth:`segment` (the size limit or GPU memory can turn
        #: ``whole_grid`` into ``sliding_window``)
        self.last_strategy = self.strategy
        #: the modality the last :meth:`prepare` took the image for (given, or guessed from its values)
        self.last_modality: Modality | None = None
        self._network: torch.nn.Module | None = None
        self._network_device: torch.device | None = None

    # ---------------------------------------------------------------------------------- helpers
    def _check_cancel(self) -> None:
        if self.cancel():
            raise CancelledError("Segmentation cancelled by the user.")

    def network(self, device: torch.device, precision: str) -> torch.nn.Module:
        if self._network is None:
            self._network = self.package.build_network()
        if self._network_device != device:
            self._network = self._network.to(device)
            self._network_device = device
        return self._network.to(memory_format=memory_format(device, precision, self._network))

    def _normalization_for(self, use_sm: bool, modality: Modality) -> Normalization:
        if use_sm or modality == self.card.source.modality:
            return self.card.normalization
        return default_normalization(modality)

    # ------------------------------------------------------------------------------ main entry
    def prepare(self, volume: Volume, source_matching: bool = True,
                target_modality: Modality | Literal["auto"] = "auto",
                roi_bounds: tuple[np.ndarray, np.ndarray] | None = None,
                timings: dict[str, float] | None = None) -> tuple[np.ndarray, Grid, Normalization]:
        """Model-grid network input (float32, K,J,I) for a volume, its grid and the normalisation used.

        ``timings``, when given, receives ``match_s`` and ``resample_in_s`` (resampling + normalising).
        For an integer image SM's lookup runs inside the resampling, slab by slab (no full matched
        copy), so ``match_s`` is then the histogram and the mapping, and the lookup is in ``resample_in_s``."""
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        validate_array(volume.array, "the input volume")
        modality = guess_modality(volume.array) if target_modality == "auto" else target_modality
        self.last_modality = modality
        fill: float | None = None
        convert = None
        if source_matching:
            self.progress(0.01, "Source matching")
            raw = fit_raw_mapping(volume.array, self.card.source_profile, modality)
            if raw is not None:
                convert, mapping = raw.apply_into, raw.mapping
            else:  # a float image: matched in full (the values of match(), as float32)
                volume, mapping = source_match(volume, self.card.source_profile, modality, dtype=np.float32)
            # the matched minimum, without a pass: the mapping is monotone and the target minimum is present
            fill = float(mapping.lut[0])
        timings["match_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        norm = self._normalization_for(source_matching, modality)
        self._check_cancel()
        grid = model_grid(volume.geometry, volume.shape, self.card.spacing, roi_bounds)
        if roi_bounds is not None and min(grid.size) < 2:
            raise InputError("The region of interest does not overlap the volume. Move or enlarge the ROI.")
        self.progress(0.04, "Resampling to the model grid")
        if fill is None:
            fill = float(np.min(volume.array))
        resampled = to_model_grid(volume, grid, pre_smoothing_mm=self.card.inference.pre_smoothing_mm,
                                  default_value=fill, convert=convert)
        self._check_cancel()
        self.progress(0.10, "Normalising")
        x = normalize(resampled.array, norm, fill)
        timings["resample_in_s"] = time.perf_counter() - t0
        return x, grid, norm

    def runs_whole_grid(self, grid_shape_kji: tuple[int, ...]) -> bool:
        """True when the network will run once over this model grid (strategy and size allow it)."""
        if self.strategy != "whole_grid":
            return False
        divisor = spec_divisor(self.card.network.architecture, dict(self.card.network.parameters))
        return padded_voxels(grid_shape_kji, divisor) <= self.card.inference.max_grid_voxels

    def _predictor(self, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Network input (B, 1, …) → softmax probabilities (float32), with cancellation between calls."""
        net = self.network(device, precision)
        fmt = memory_format(device, precision, net)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            self._check_cancel()
            with torch.inference_mode(), autocast(device, precision):
                logits = net(patch.to(device, memory_format=fmt))
            return torch.softmax(logits.float(), dim=1)

        return predictor

    def _predict_whole(self, x: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
        """One forward pass over the whole model grid (:mod:`.whole_grid`)."""
        self.progress(0.12, "Segmenting (one pass over the whole grid)")
        with torch.inference_mode():
            probs = whole_grid_probabilities(
                torch.from_numpy(x), self._predictor(device, precision), cval=float(x.min()), device=device,
                padding_mode=self.padding_mode,
                divisor=spec_divisor(self.card.network.architecture, dict(self.card.network.parameters)))
        self.progress(0.82, "Segmented (one pass over the whole grid)")
        return probs

    def _predict_sliding(self, x: np.ndarray, device: torch.device, precision: str,
                         needed: np.ndarray | None) -> torch.Tensor:
        """The Gaussian-blended sliding window over the windows holding a ``needed`` voxel."""
        roi = tuple(int(p) for p in reversed(self.card.patch_size))  # x,y,z → K,J,I

        def on_window(done: int, total: int) -> None:
            self.progress(0.12 + 0.70 * done / max(1, total), f"Segmenting (window {done}/{total})")

        with torch.inference_mode():
            return sliding_window_probabilities(
                torch.from_numpy(x), roi, self._predictor(device, precision), overlap=self.card.inference.overlap,
                mode=self.card.inference.blend_mode, cval=float(x.min()), needed=needed,
                sw_batch_size=self.sw_batch_size, sw_device=device, on_window=on_window,
                padding_mode=self.padding_mode,
            )

    def _predict(self, x: np.ndarray, device: torch.device, precision: str,
                 needed: np.ndarray | None = None, messages: list[str] | None = None) -> torch.Tensor:
        """Softmax probabilities (C, K, J, I) on the CPU for a model-grid input.

        ``whole_grid`` (when the grid is small enough): one forward pass; if that pass does not fit in
        GPU memory, the sliding window on the same GPU (said in ``messages``). Else only the windows
        holding a ``needed`` voxel run (:mod:`.sliding_window`); the probabilities there are those of
        MONAI's Gaussian-blended inferer over the whole grid.
        """
        if self.runs_whole_grid(x.shape):
            try:
                probs = self._predict_whole(x, device, precision)
                self.last_strategy = "whole_grid"
                return probs
            except CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — only GPU out-of-memory is handled here
                if device.type == "cpu" or not is_out_of_memory(exc):
                    raise
                msg = (f"One pass over the whole {'×'.join(map(str, reversed(x.shape)))} model grid did not fit "
                       f"in GPU memory; continuing with sliding windows on the GPU.")
                log.warning(msg)
                if messages is not None:
                    messages.append(msg)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                needed = None  # every window: the whole grid was meant to be computed
        self.last_strategy = "sliding_window"
        return self._predict_sliding(x, device, precision, needed)

    def segment(self, volume: Volume, source_matching: bool = True,
                target_modality: Modality | Literal["auto"] = "auto", keep_largest: bool = False,
                roi_bounds: tuple[np.ndarray, np.ndarray] | None = None,
                postprocessing: PostProcessing | None = None) -> SegmentationResult:
        """Segment ``volume``; the labelmap has exactly the input's geometry and shape.

        ``postprocessing`` is the clean-up to apply (front ends pass the card's default, resolved
        against the user's choice by :func:`.postprocess.resolve`); without it, ``keep_largest``.
        """
        timings: dict[str, float] = {}
        messages: list[str] = []
        t0 = time.perf_counter()
        x, grid, norm = self.prepare(volume, source_matching, target_modality, roi_bounds, timings=timings)
        t_mask = time.perf_counter()
        # the voxels the output reads: only the sliding window uses them (to skip windows)
        needed = None if self.runs_whole_grid(grid.shape_kji) else needed_mask(grid, volume.geometry, volume.shape)
        timings["needed_mask_s"] = time.perf_counter() - t_mask
        timings["preprocess_s"] = time.perf_counter() - t0
        extent_mm, axis, voxel_mm = thinnest_view(volume.geometry, volume.shape, roi_bounds)
        thin = thin_view_warning(self.card.field_of_view, self.last_modality, extent_mm, axis, self.card.id, voxel_mm)
        thin_view_mm = extent_mm if thin else None
        if thin:
            log.warning(thin)
            messages.append(thin)

        device, precision = self.device, self.precision
        t1 = time.perf_counter()
        try:
            probs = self._predict(x, device, precision, needed=needed, messages=messages)
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — only GPU out-of-memory is handled, everything else re-raised
            if device.type == "cpu" or not is_out_of_memory(exc):
                raise
            if not self.fallback_to_cpu:
                raise SRCSMError(
                    f"The GPU ran out of memory ({device}). Close other GPU programs, use a smaller ROI, or "
                    f"choose the CPU (--device cpu)."
                ) from exc
            msg = (f"The GPU ran out of memory; continuing on the CPU (slower). Free GPU memory or use a "
                   f"smaller region of interest to stay on the GPU.")
            log.warning(msg)
            messages.append(msg)
            self.progress(0.12, msg)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            device = torch.device("cpu")
            precision = resolve_precision(device, "auto" if self._requested_precision in ("auto", "fp16")
                                          else self._requested_precision)
            probs = self._predict(x, device, precision, needed=needed, messages=messages)
        timings["network_s"] = time.perf_counter() - t1
        del x

        t2 = time.perf_counter()
        self.progress(0.83, "Resampling probabilities to the input grid")
        labels = self._argmax_in_input_grid(probs.numpy(), grid, volume)
        timings["resample_back_s"] = time.perf_counter() - t2
        if postprocessing is None:
            postprocessing = PostProcessing(method="keep_largest" if keep_largest else "none")
        if postprocessing.method != "none":
            self.progress(0.96, f"Clean-up: {postprocessing.describe()}")
            apply_postprocessing(labels, [lab.value for lab in self.card.labels.labels], postprocessing,
                                 volume.geometry.spacing)
        timings["total_s"] = time.perf_counter() - t0
        self.progress(1.0, "Done")
        return SegmentationResult(
            labelmap=Volume(labels, volume.geometry),
            device=str(device), precision=precision, source_matching=source_matching,
            normalization=norm, timings=timings, messages=messages, postprocessing=postprocessing.cli_value(),
            strategy=self.last_strategy, thin_view_mm=thin_view_mm,
            thin_view_voxel_mm=voxel_mm if thin else 0.0, target_modality=self.last_modality,
        )

    def _argmax_in_input_grid(self, probs: np.ndarray, grid: Grid, volume: Volume) -> np.ndarray:
        return argmax_in_target_grid(probs, grid, volume.geometry, volume.shape, check_cancel=self._check_cancel)
