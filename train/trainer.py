"""The training loop: random patches, on-device augmentation (SRC and baselines), generalised Dice,
Adam with explicit L2, adaptive gradient clipping, EMA weights, checkpoint/resume, validation, logs,
and multi-process data parallelism (``torchrun``; gloo on CPU, NCCL on GPU).

Checkpoints are safetensors + JSON (no pickles anywhere), written atomically, so a run killed at any
moment resumes from its last checkpoint with ``fit --resume``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from SRCSMSegmenterLib.device import autocast, memory_format, resolve_device, resolve_precision
from SRCSMSegmenterLib.errors import CancelledError, SRCSMError
from SRCSMSegmenterLib.labels import label_table_from_dataset_labels
from SRCSMSegmenterLib.normalization import default_normalization, normalize_tensor
from SRCSMSegmenterLib.network import build_network

from .cache import CachedCase, build_cache, load_cached
from .config import TrainConfig
from .datasets import load_dataset
from .init_weights import load_init_weights
from .losses import l2_penalty, segmentation_loss, soft_dice_per_class

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
#: A run whose every step for this long had a non-finite loss or gradient is stopped: its weights no
#: longer change, so going on only burns compute (fp16 loss scaling skips a handful at most).
MAX_CONSECUTIVE_SKIPS = 100
#: Warn when more than this share of a logging window's steps were skipped.
SKIP_WARNING_SHARE = 0.1


class TrainingStalledError(SRCSMError):
    """Training steps keep failing (non-finite loss or gradients), so the weights no longer change."""


class RunExistsError(SRCSMError):
    """A fresh run was started in a folder that already holds one (which it would have replaced)."""


#: Files that make a folder a run: a fresh run there would overwrite or append to them.
RUN_FILES = (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, "log.csv")
#: Without a terminal (a log file, nohup, CI) the progress bar is off; a status line is logged this often.
STATUS_EVERY_S = 60.0


def refuse_existing_run(out_dir: Path, overwrite: bool, log=print) -> Path | None:
    """Refuse to start a fresh run in ``out_dir`` when it holds one — a second ``fit`` without
    ``--resume`` used to replace a run's checkpoint and append to its log. With ``overwrite`` the old run
    is kept, renamed to ``<out_dir>.replaced-<time>`` (returned), and a fresh folder is made."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return None
    if not overwrite:
        where = ""
        try:
            state = json.loads((out_dir / CHECKPOINT_STATE).read_text(encoding="utf-8"))
            where = f" (checkpoint at iteration {state.get('iteration')})"
        except (OSError, ValueError):
            pass
        raise RunExistsError(
            f"{out_dir} already holds a training run{where}. Continue it with --resume, train into another "
            f"folder with --run-dir DIR, or start afresh with --overwrite (the old run is kept, renamed to "
            f"{out_dir.name}.replaced-<time>).")
    backup = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while backup.exists():
        backup = backup.with_name(f"{backup.name}-{n}")
        n += 1
    os.replace(out_dir, backup)
    out_dir.mkdir(parents=True)
    log(f"--overwrite: the previous run in {out_dir} was moved to {backup}")
    return backup


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s`` — for the ETA of the status line."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s:02d} s" if m else f"{s} s"


# ------------------------------------------------------------------------------ dead episodes
#: A step *looks dead* when its segmentation loss sits at the generalised Dice loss's ceiling with a
#: vanishing gradient: the network predicts one class everywhere and the saturated softmax passes no
#: gradient back. Healthy runs never do this once they have learned (checked on every ablation log);
#: collapsed ones sit at ≈ 0.997 with gradient norms of 10⁻⁴–10⁻².
DEAD_LOSS = 0.95
DEAD_GRAD_NORM = 0.05
#: An untrained network starts at the ceiling too: only a run whose mean loss over a window has been at
#: or below this counts as having learned.
LEARNED_LOSS = 0.9
#: Steps watched; an episode starts when ≥ 90 % of them look dead and ends when ≤ 10 % do.
DEAD_WINDOW = 50


def looks_dead(seg_loss: float, grad_norm: float) -> bool:
    """Whether a step (or a logged window mean) is at the loss ceiling with a vanishing gradient. One
    definition for the trainer's warnings and the ablation's notes."""
    return seg_loss >= DEAD_LOSS and grad_norm <= DEAD_GRAD_NORM


class DeadEpisodeMonitor:
    """Tells when a learned run falls dead (one class everywhere, vanishing gradient) and when it
    recovers, so that a run of hours is not left to burn unnoticed — or stopped too early: runs have
    recovered from such an episode (CT→MR global RCNet, after ≈ 270 iterations) and have not (CT→MR
    RandConv, 910 iterations to the end of its budget), so this warns and never stops a run."""

    def __init__(self, learned: bool = False, window: int = DEAD_WINDOW) -> None:
        from collections import deque

        self.learned = learned
        self._losses: deque[float] = deque(maxlen=window)
        self._dead: deque[bool] = deque(maxlen=window)
        self.started: int | None = None  # first dead step of the current episode

    def state_dict(self) -> dict[str, Any]:
        """The window and the episode in progress, for the checkpoint: a resumed run then goes on with the
        same window instead of an empty one (which would date an episode ongoing at the checkpoint to the
        resume and keep quiet about it for a whole window)."""
        return {"learned": self.learned, "started": self.started, "window": self._losses.maxlen,
                "losses": list(self._losses), "dead": list(self._dead)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a window of another length keeps its latest steps)."""
        self.learned = bool(state.get("learned", self.learned))
        started = state.get("started")
        self.started = None if started is None else int(started)
        self._losses.clear()
        self._dead.clear()
        self._losses.extend(float(v) for v in state.get("losses", []))
        self._dead.extend(bool(v) for v in state.get("dead", []))

    def update(self, iteration: int, seg_loss: float, grad_norm: float) -> str | None:
        """Feed one step; returns a message when an episode starts or ends."""
        if not (math.isfinite(seg_loss) and math.isfinite(grad_norm)):
            return None
        self._losses.append(seg_loss)
        full = len(self._losses) == self._losses.maxlen
        if full and sum(self._losses) / len(self._losses) <= LEARNED_LOSS:
            self.learned = True
        self._dead.append(self.learned and looks_dead(seg_loss, grad_norm))
        share = sum(self._dead) / self._dead.maxlen
        if self.started is None and full and share >= 0.9:
            self.started = iteration - len(self._dead) + 1 + self._dead.index(True)
            return (f"WARNING: training looks dead since iteration {self.started}: {share:.0%} of the last "
                    f"{self._dead.maxlen} steps had the loss at its ceiling (≥ {DEAD_LOSS}) with a gradient norm "
                    f"≤ {DEAD_GRAD_NORM}, i.e. the network predicts one class everywhere. Runs have recovered "
                    f"from this after a few hundred steps, and have not (`python -m train diagnose RUN_DIR` on its "
                    f"checkpoint tells which); if it lasts, restart with another `seed` or use `loss: gdl_ce`, "
                    f"whose cross-entropy term keeps a gradient.")
        if self.started is not None and share <= 0.1:
            message = (f"training recovered by iteration {iteration} from the dead episode that began at "
                       f"iteration {self.started}")
            self.started = None
            return message
        return None


# ----------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class FieldOfView:
    """Field-of-view augmentation (recipe v2): before a patch is cut, the case is cropped to a random
    box — a slab as thin as ``min_slab_mm`` along z and/or a partial in-plane view down to
    ``min_inplane`` of each in-plane extent — and everything outside the box becomes what inference
    sees outside a scan: the image's fill value (its minimum) and background.

    Why: clinical scans often show only part of the anatomy (a 60 mm MR slab of the kidneys, a CT cut
    above the spleen). A network trained only on whole abdomens has never seen anatomy end at a border
    and returned nothing on such slabs (the robustness benchmark). ``probability`` is the share of
    patches cut from such a box; the box always contains the patch centre."""

    probability: float = 0.0
    min_slab_mm: float = 40.0
    min_inplane: float = 0.5
    #: how a box's extent is drawn between its smallest and the full extent: ``uniform`` (recipe v2) or
    #: ``log_uniform`` (recipe v3 lead), which shows thin views as often as their share of the range's
    #: ratio, not of its length: on a 300 mm CT a slab of ≤ 60 mm is 8 % of uniform draws, 20 % of
    #: log-uniform ones — and the benchmark's losses are on those thinnest slabs (docs/recipe-v2.md).
    length_sampling: Literal["uniform", "log_uniform"] = "uniform"

    def _length(self, smallest: int, full: int, rng: np.random.Generator) -> int:
        if self.length_sampling == "uniform":  # one integer draw, as recipe v2 runs were drawn (they resume)
            return int(rng.integers(smallest, full + 1))
        # log-uniform over [smallest, full + 1): each octave of extents equally likely
        return min(full, int(np.exp(rng.uniform(np.log(smallest), np.log(full + 1)))))

    def box(self, shape: tuple[int, ...], centre: np.ndarray, spacing_kji: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """A random box ``[lo, hi)`` (K, J, I voxel indices) inside ``shape`` containing ``centre``, or
        None (no crop) with probability ``1 - probability``."""
        if self.probability <= 0 or rng.random() >= self.probability:
            return None
        shape_a = np.asarray(shape)
        lo, hi = np.zeros(3, int), shape_a.copy()
        crop_z, crop_xy = [(True, True), (True, False), (False, True)][rng.integers(3)]
        for axis in range(3):
            full = int(shape_a[axis])
            if axis == 0 and crop_z:
                smallest = min(full, max(1, int(round(self.min_slab_mm / spacing_kji[0]))))
            elif axis > 0 and crop_xy:
                smallest = min(full, max(1, int(round(self.min_inplane * full))))
            else:
                continue
            length = self._length(smallest, full, rng)
            c = int(np.clip(centre[axis], 0, full - 1))
            first = max(0, c - length + 1)
            last = min(c, full - length)
            start = int(rng.integers(first, last + 1))
            lo[axis], hi[axis] = start, start + length
        return lo, hi


class PatchSampler:
    """Random crops (larger than the patch, for spatial warping) with foreground oversampling.

    With probability ``landmark_prob`` the crop is centred on the foreground's bounding box (the paper's
    ROI); else with probability ``fg_prob`` on a voxel of a label drawn uniformly from the labels present
    in the case (class-balanced, as nnU-Net does); otherwise anywhere in the volume, so that patches
    reach the volume's borders and the padding beyond them (what a sliding window over a whole scan
    sees). ``fov`` crops the case to a random field of view first (:class:`FieldOfView`); ``norm`` is
    then recomputed on what the box shows, as inference computes it on what the scan shows. Beyond what
    the case or box shows, a patch is filled as inference pads: ``paddings`` (one drawn per patch when
    several) — ``constant`` (fill value, background) or ``replicate`` (edge voxels and labels continued).
    """

    def __init__(self, cases: list[CachedCase], crop_kji: tuple[int, int, int], fg_prob: float,
                 rng: np.random.Generator, landmark_prob: float = 0.0, fov: FieldOfView | None = None,
                 spacing_kji: tuple[float, float, float] = (1.0, 1.0, 1.0), norm: Any = None,
                 paddings: Sequence[str] = ("constant",)) -> None:
        if not paddings or any(p not in ("constant", "replicate") for p in paddings):
            raise ValueError(f"paddings must be constant and/or replicate, got {list(paddings)!r}")
        self.paddings = tuple(paddings)
        self.cases, self.crop, self.fg_prob, self.rng = cases, crop_kji, fg_prob, rng
        self.landmark_prob = landmark_prob
        self.landmarks = {c.id: _landmark(c) for c in cases}
        self.fov = fov or FieldOfView()
        self.spacing_kji = np.asarray(spacing_kji, float)
        self.norm = norm

    def _centre(self, case: CachedCase) -> np.ndarray:
        shape = np.array(case.image.shape)
        u = self.rng.random()
        if u < self.landmark_prob:
            # the paper's training ROI: centred on the foreground's bounding box (jittered later by the
            # spatial augmentation's ±20 mm translation), so every label is in the patch
            return self.landmarks[case.id]
        if case.foreground and (u - self.landmark_prob) / max(1e-9, 1 - self.landmark_prob) < self.fg_prob:
            value = self.rng.choice(sorted(case.foreground))
            flat = case.foreground[value][self.rng.integers(len(case.foreground[value]))]
            return np.array(np.unravel_index(flat, case.image.shape))
        return (self.rng.random(3) * shape).astype(int)

    def crop_case(self, case: CachedCase, centre: np.ndarray,
                  box: tuple[np.ndarray, np.ndarray] | None = None,
                  padding: str = "constant") -> tuple[np.ndarray, np.ndarray]:
        """The crop around ``centre``; outside the volume (or outside ``box``) the fill value and
        background, exactly as inference pads a scan — or, with ``padding="replicate"``, the nearest
        voxel inside and its label, as inference with ``padding_mode="replicate"`` continues the edge
        slices (the label follows the image, so an organ cut by the border is not taught as background
        where it looks like organ)."""
        size = np.array(self.crop)
        start = centre - size // 2
        vol_lo, vol_hi = (np.zeros(3, int), np.array(case.image.shape)) if box is None else box
        if padding == "replicate":
            index = np.ix_(*(np.clip(np.arange(a, a + n), lo, hi - 1)
                             for a, n, lo, hi in zip(start, size, vol_lo, vol_hi)))
            return np.asarray(case.image[index], dtype=np.float32), np.asarray(case.label[index], dtype=np.uint8)
        if padding != "constant":
            raise ValueError(f"unknown padding {padding!r}: constant or replicate")
        img = np.full(self.crop, case.fill_value, dtype=np.float32)
        lab = np.zeros(self.crop, dtype=np.uint8)
        src_lo = np.maximum(start, vol_lo)
        src_hi = np.minimum(start + size, vol_hi)
        if np.all(src_hi > src_lo):
            dst_lo = src_lo - start
            dst_hi = dst_lo + (src_hi - src_lo)
            s = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
            d = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
            img[d] = case.image[s]
            lab[d] = case.label[s]
        return img, lab

    def _box_norm(self, case: CachedCase, box: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
        """The normalisation affine of what the box shows (percentile-based MR normalisation depends on
        the field of view; a CT window does not)."""
        if self.norm is None or self.norm.type == "ct_window":
            return case.norm_scale, case.norm_offset
        from SRCSMSegmenterLib.normalization import intensity_affine

        lo, hi = box
        view = case.image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        scale, offset, _, _ = intensity_affine(view, self.norm, case.fill_value)
        return scale, offset

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        imgs, labs, norms, fills = [], [], [], []
        for _ in range(batch):
            case = self.cases[self.rng.integers(len(self.cases))]
            centre = self._centre(case)
            box = self.fov.box(case.image.shape, centre, self.spacing_kji, self.rng)
            # drawn only when there is a choice: a one-mode recipe keeps its random sequence (and resumes)
            padding = self.paddings[self.rng.integers(len(self.paddings))] if len(self.paddings) > 1 \
                else self.paddings[0]
            img, lab = self.crop_case(case, centre, box, padding)
            imgs.append(img)
            labs.append(lab)
            norms.append(list(self._box_norm(case, box)) if box is not None else [case.norm_scale, case.norm_offset])
            fills.append(case.fill_value)
        return np.stack(imgs)[:, None], np.stack(labs), np.array(norms, np.float32), np.array(fills, np.float32)


def _landmark(case: CachedCase) -> np.ndarray:
    """Centre of the foreground bounding box in voxel indices (K, J, I), or the volume centre."""
    if not case.foreground:
        return np.array(case.image.shape) // 2
    flat = np.concatenate(list(case.foreground.values()))
    kji = np.array(np.unravel_index(flat, case.image.shape))
    return (kji.min(axis=1) + kji.max(axis=1)) // 2


def centre_crop(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    d, h, w = x.shape[-3:]
    a, b, c = ((d - size[0]) // 2, (h - size[1]) // 2, (w - size[2]) // 2)
    return x[..., a:a + size[0], b:b + size[1], c:c + size[2]]


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(out_dir: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write the weights and the JSON state as one pair.

    Both files are written in full to temporaries first and then renamed back to back, and the weights
    carry the state's iteration in their metadata: a run killed while checkpointing (a session ending)
    keeps the previous pair, and a pair torn between the two renames is refused at load instead of
    resuming weights of one iteration with the counters and RNG of another.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{name}"] = val.detach().cpu().contiguous().reshape(val.shape)
    for name, val in state.pop("_tensors", {}).items():
        tensors[f"rng.{name}"] = val
    state = dict(state, param_groups=opt_state["param_groups"])
    pairs = [(out_dir / CHECKPOINT_WEIGHTS, save(tensors, metadata={"iteration": str(state.get("iteration"))})),
             (out_dir / CHECKPOINT_STATE, json.dumps(state, indent=1, default=str).encode())]
    partials = []
    for path, data in pairs:
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        partials.append((tmp, path))
    for tmp, path in partials:
        os.replace(tmp, path)


def load_checkpoint(out_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The checkpoint pair of ``out_dir``, refused with a clear error when its two files disagree."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = out_dir / CHECKPOINT_WEIGHTS
    tensors = load_file(str(weights))
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "opt": {}, "rng": {}}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        groups[head][rest] = v
    state = json.loads((out_dir / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    with safe_open(str(weights), framework="pt") as f:
        saved_at = (f.metadata() or {}).get("iteration")
    if saved_at is not None and saved_at != str(state.get("iteration")):
        raise ValueError(f"{out_dir}: {CHECKPOINT_WEIGHTS} is from iteration {saved_at} but {CHECKPOINT_STATE} "
                         f"says {state.get('iteration')} (the run was stopped while checkpointing). Restart the "
                         f"run in a new folder, or restore a matching pair from a backup.")
    return groups, state


def restore_optimizer(optimizer: torch.optim.Optimizer, opt_tensors: dict[str, torch.Tensor],
                      param_groups: list[dict[str, Any]], device: torch.device) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in opt_tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val if name == "step" else val.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# ---------------------------------------------------------------------------------- trainer
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_name != "cpu" and torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    return info


def validation_collapsed(best: float, current: float) -> bool:
    """Whether validation mean Dice ``current`` means the run collapsed: below half its ``best``, which
    was at least 0.3 (the run had learned). The generalised Dice loss can saturate — one class predicted
    everywhere, vanishing gradient (:class:`DeadEpisodeMonitor`) — and a run validated while dead scores
    near 0 (seen: CT→MR RandConv, dead from iteration ≈ 3 090 to its budget). One rule for the trainer's
    warning and the ablation's records."""
    return best >= 0.3 and current < best / 2


@contextmanager
def stop_requests(enabled: bool = True) -> Iterator[list[str]]:
    """Turn SIGINT (Ctrl-C) and SIGTERM into a request to stop *after the current step*, so the trainer
    can write a checkpoint at that iteration instead of losing the steps since the last one. Yields a list
    that receives the signal's name. Only in the main thread of a single process (``enabled``): with
    several DDP ranks a rank that stops alone would leave the others waiting in a collective."""
    requested: list[str] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, _frame: Any) -> None:
        if requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def learning_rate_at(cfg: TrainConfig, iteration: int) -> float:
    """The learning rate of step ``iteration`` (0-based): a linear warm-up from 1 % over
    ``warmup_iterations``, then ``lr_schedule`` over the rest of ``iterations``. A pure function of the
    iteration, so a resumed run continues the schedule exactly."""
    base = cfg.learning_rate
    warm = cfg.warmup_iterations
    if warm and iteration < warm:
        return base * (0.01 + 0.99 * iteration / warm)
    if cfg.lr_schedule == "constant":
        return base
    t = min(1.0, (iteration - warm) / max(1, cfg.iterations - warm))
    if cfg.lr_schedule == "poly":
        return base * (1.0 - t) ** 0.9
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, log=None, overwrite: bool = False) -> None:
        self.cfg = config
        self.overwrite = overwrite
        self.dist = init_distributed(config.device)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(self.device, config.precision)
        if self.device.type == "cuda" and config.precision == "auto" and torch.cuda.is_bf16_supported():
            self.precision = "bf16"  # no loss scaling needed, same speed on Ampere/Hopper
        self.out_dir = Path(config.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dataset = load_dataset(config.dataset)
        self.modality = self.dataset.modality
        self.num_classes = len(self.dataset.label_values) + 1
        self.norm = config.normalization or default_normalization(self.modality)
        self.patch_kji = tuple(int(p) for p in reversed(config.patch_size))
        margin = config.crop_margin if config.spatial_augmentation else 1.0
        self.crop_kji = tuple(int(math.ceil(p * margin / 2) * 2) for p in self.patch_kji)
        self.resume = resume

    # -------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        cfg = self.cfg
        train_cases = self.dataset.split(cfg.train_split)
        val_cases = self.dataset.split(cfg.val_split) if cfg.val_split else []
        if self.dist.main:
            self.cache_folder = build_cache(self.dataset, train_cases + val_cases, Path(cfg.cache_dir), cfg.spacing,
                                            self.norm, cfg.pre_smoothing_mm, log=self.log)
        if self.dist.world > 1:
            dist.barrier()
            if not self.dist.main:
                self.cache_folder = build_cache(self.dataset, [], Path(cfg.cache_dir), cfg.spacing, self.norm,
                                                cfg.pre_smoothing_mm, log=self.log)
        self.train_data = load_cached(self.cache_folder, [c.id for c in train_cases])
        self.val_data = load_cached(self.cache_folder, [c.id for c in val_cases])

    # ------------------------------------------------------------------------------- model
    def build(self) -> None:
        cfg = self.cfg
        params = dict(cfg.network.get("parameters", {}))
        params.setdefault("out_channels", self.num_classes)
        params.setdefault("in_channels", 1)
        self.network_spec = {"architecture": cfg.network["architecture"], "parameters": params}
        torch.manual_seed(cfg.seed)
        self.model = build_network(self.network_spec["architecture"], params).to(self.device)
        self.model = self.model.to(memory_format=memory_format(self.device, self.precision, self.model))
        self.ddp_model = self.model
        if self.dist.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, eps=1e-7)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.iteration = 0
        self.clip_m = 10.0
        self.rng = np.random.default_rng([cfg.seed, self.dist.rank])
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.dist.rank + 1)
        self.history: list[dict[str, Any]] = []
        self.dead_monitor = DeadEpisodeMonitor()
        self.init_info: dict[str, Any] | None = None
        if self.resume and (self.out_dir / CHECKPOINT_WEIGHTS).is_file():
            self._restore()
        elif cfg.init_weights:
            self._init_from_package(cfg.init_weights)

    def _init_from_package(self, path: str) -> None:
        """Network and EMA from a released package's weights (fine-tuning; train/init_weights.py)."""
        tensors, self.init_info = load_init_weights(
            path, self.network_spec, label_table_from_dataset_labels(self.dataset.labels),
            sha256=self.cfg.init_weights_sha256)
        self.model.load_state_dict(tensors, strict=True)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.log(f"network and EMA start from {self.init_info['id']} {self.init_info['version']} "
                 f"({self.init_info['iterations']} iterations, weights {self.init_info['weights_sha256'][:12]}…)")

    def _restore(self) -> None:
        groups, state = load_checkpoint(self.out_dir)
        self.model.load_state_dict(groups["model"])
        self.ema = {k: v.to(self.device) for k, v in groups["ema"].items()}
        restore_optimizer(self.optimizer, groups["opt"], state["param_groups"], self.device)
        self.iteration = int(state["iteration"])
        self.clip_m = float(state["clip_m"])
        rng_state = state.get("numpy_rng", {}).get(str(self.dist.rank))
        if rng_state:
            self.rng.bit_generator.state = rng_state
        gen_state = groups["rng"].get(f"torch{self.dist.rank}")
        if gen_state is not None:
            self.gen.set_state(gen_state)
        self.history = state.get("history", [])
        self.init_info = state.get("init_weights")
        if "dead_monitor" in state:
            self.dead_monitor.load_state_dict(state["dead_monitor"])
        else:  # a checkpoint from before the monitor was saved: at least remember that the run had learned
            self.dead_monitor.learned = any(r.get("gdl", 1.0) <= LEARNED_LOSS for r in self.history)
        if self.dist.main:
            dropped = _truncate_csv(self.out_dir / "log.csv", self.iteration)
            if dropped:
                self.log(f"log.csv: dropped {dropped} row(s) logged after the checkpoint (they are redone)")
        self.log(f"resumed from iteration {self.iteration}")

    def checkpoint(self) -> None:
        # every rank's RNG state goes into the checkpoint, so a resumed DDP run continues each stream
        rngs = [None] * self.dist.world
        gens = [None] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(rngs, self.rng.bit_generator.state)
            dist.all_gather_object(gens, self.gen.get_state())
        else:
            rngs, gens = [self.rng.bit_generator.state], [self.gen.get_state()]
        if not self.dist.main:
            return
        state = {"iteration": self.iteration, "clip_m": self.clip_m,
                 "numpy_rng": {str(r): s for r, s in enumerate(rngs)},
                 "config": self.cfg.model_dump(mode="json"), "network": self.network_spec,
                 "history": self.history[-2000:], "dead_monitor": self.dead_monitor.state_dict(),
                 "precision": self.precision, "device": str(self.device),
                 "world_size": self.dist.world, "init_weights": self.init_info,
                 "_tensors": {f"torch{r}": g for r, g in enumerate(gens)}}
        save_checkpoint(self.out_dir, self.model, self.ema, self.optimizer, state)

    # ---------------------------------------------------------------------------- one step
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .augment import random_intensity, random_spatial

        cfg = self.cfg
        img, lab, norm, fill = self.sampler.sample(cfg.batch_size)
        img_t = torch.from_numpy(img).to(self.device)
        lab_t = torch.from_numpy(lab).to(self.device).long()
        fill_t = torch.from_numpy(fill).to(self.device).view(-1, 1, 1, 1, 1)
        if cfg.spatial_augmentation:
            # warp with zero padding around (image − fill) so outside the FOV becomes the image minimum
            img_t, lab_t = random_spatial(img_t - fill_t, lab_t, self.patch_kji, cfg.spacing, self.gen,
                                          pad_value=0.0, num_classes=self.num_classes)
            img_t = img_t + fill_t
        else:
            img_t, lab_t = centre_crop(img_t, self.patch_kji), centre_crop(lab_t, self.patch_kji)
        scale = torch.from_numpy(norm[:, 0]).to(self.device).view(-1, 1, 1, 1, 1)
        offset = torch.from_numpy(norm[:, 1]).to(self.device).view(-1, 1, 1, 1, 1)
        if cfg.intensity_augmentation:
            # as the paper: normalise, shift/scale at random, then clamp once (random_intensity clamps)
            x = random_intensity(normalize_tensor(img_t, scale, offset, None, None), self.norm, self.gen)
        else:
            x = normalize_tensor(img_t, scale, offset, -1.0, 1.0 if self.norm.type == "ct_window" else None)
        return x, lab_t

    def step(self) -> dict[str, float]:
        from .augment import apply_appearance, gin_consistency_loss

        cfg = self.cfg
        lr = learning_rate_at(cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, lab = self._batch()
        with torch.no_grad():
            views = apply_appearance(cfg.augmentation, x, lab, self.num_classes, self.gen)
        views = views if isinstance(views, tuple) else (views,)
        fmt = memory_format(self.device, self.precision, self.model)
        self.ddp_model.train()
        with autocast(self.device, self.precision):
            # all views in one forward pass (GIN-IPA: three), as their recipe does
            logits_all = self.ddp_model(torch.cat(views).contiguous(memory_format=fmt))
        logits = logits_all.chunk(len(views))
        # the segmentation loss goes on the first view only (for GIN-IPA: the IPA view "a")
        seg = segmentation_loss(logits[0], lab, cfg.loss)
        loss = seg + cfg.l2 * l2_penalty(self.model.conv_kernels())
        cons = None
        if len(logits) > 1:
            cons = gin_consistency_loss(list(logits), weight=cfg.consistency_weight)
            loss = loss + cons
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float("nan"), "skipped": 1.0}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.clip_factor * self.clip_m
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if math.isfinite(norm):
            self.scaler.step(self.optimizer)
            self.clip_m = 0.01 * min(norm, clip) + 0.99 * self.clip_m
        else:
            self.scaler.update()  # skip this step (non-finite gradients), as the paper's loss scaler does
            return {"loss": float(loss.detach()), "skipped": 1.0, "grad_norm": norm}
        self.scaler.update()
        with torch.no_grad():
            d = cfg.ema_decay
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].lerp_(v.float(), 1 - d)
                else:
                    self.ema[k].copy_(v)
        out = {"loss": float(loss.detach()), "gdl": float(seg.detach()), "grad_norm": norm, "skipped": 0.0,
               "lr": lr}
        if cons is not None:
            out["consistency"] = float(cons.detach())
        return out

    # --------------------------------------------------------------------------- validation
    def ema_network(self) -> torch.nn.Module:
        net = build_network(self.network_spec["architecture"], self.network_spec["parameters"])
        net.load_state_dict({k: v.cpu() for k, v in self.ema.items()})
        return net.eval()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice of the EMA weights on the validation cases, on the model grid (sliding window)."""
        from monai.inferers import sliding_window_inference

        if not self.val_data:
            return {}
        net = self.ema_network().to(self.device)
        net = net.to(memory_format=memory_format(self.device, self.precision, net))
        dices = []
        for case in self.val_data:
            x = normalize_tensor(torch.from_numpy(np.array(case.image, dtype=np.float32)), case.norm_scale,
                                 case.norm_offset, -1.0, 1.0 if self.norm.type == "ct_window" else None)

            def predictor(p: torch.Tensor) -> torch.Tensor:
                with autocast(self.device, self.precision):
                    return torch.softmax(net(p.to(self.device)).float(), 1)

            probs = sliding_window_inference(x[None, None], self.patch_kji, 1, predictor, overlap=0.25,
                                             mode="gaussian", cval=float(x.min()), sw_device=self.device,
                                             device=torch.device("cpu"))
            pred = probs[0].argmax(0)
            dices.append(soft_dice_per_class(pred, torch.from_numpy(np.array(case.label)).long(), self.num_classes))
        per_class = torch.nanmean(torch.stack(dices), 0)
        names = [self.dataset.label_values[v] for v in sorted(self.dataset.label_values)]
        out = {f"val_dice_{n}": float(d) for n, d in zip(names, per_class)}
        out["val_dice_mean"] = float(torch.nanmean(per_class))
        return out

    def _warn_if_collapsed(self, dice: float) -> None:
        """Say so when validation Dice has collapsed against its best of this process
        (:func:`validation_collapsed`)."""
        best = getattr(self, "_best_val_dice", float("nan"))
        if math.isfinite(dice) and not dice <= best:
            self._best_val_dice = dice
        elif validation_collapsed(best, dice):
            self.log(f"WARNING: validation mean Dice fell from {best:.3f} to {dice:.3f}: the run has probably "
                     f"collapsed (loss near 1, vanishing gradient). Restart from an earlier checkpoint or use "
                     f"`loss: gdl_ce`, whose cross-entropy term keeps a per-voxel gradient.")

    # -------------------------------------------------------------------------------- loop
    def fit(self, time_limit_s: float | None = None, until_iteration: int | None = None) -> dict[str, Any]:
        """Train to ``until_iteration`` (default: the recipe's ``iterations``). ``time_limit_s`` counts
        the training loop only, not the one-off preprocessing cache, so a session's budget is spent on
        steps."""
        cfg = self.cfg
        if self.dist.main and not self.resume:
            refuse_existing_run(self.out_dir, self.overwrite, log=self.log)
        t0 = time.monotonic()
        self.prepare_data()
        self.build()
        if self.dist.main:
            end_at = min(cfg.iterations, until_iteration or cfg.iterations)
            self.log(f"data ready in {format_duration(time.monotonic() - t0)}: {len(self.train_data)} training, "
                     f"{len(self.val_data)} validation cases; training {cfg.model.id} [{cfg.augmentation}] from "
                     f"iteration {self.iteration} to {end_at} on {self.device} ({self.precision}, "
                     f"{torch.get_num_threads()} threads)")
        fov = FieldOfView(cfg.fov_augmentation, cfg.fov_min_slab_mm, cfg.fov_min_inplane, cfg.fov_length_sampling)
        self.sampler = PatchSampler(self.train_data, self.crop_kji, cfg.foreground_oversampling, self.rng,
                                    cfg.landmark_sampling, fov=fov, spacing_kji=tuple(reversed(cfg.spacing)),
                                    norm=self.norm, paddings=cfg.fov_padding)
        if self.dist.main:
            (self.out_dir / "config.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
        writer = None
        if self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 — TensorBoard is optional
                writer = None
        csv_path = self.out_dir / "log.csv"
        end = min(cfg.iterations, until_iteration or cfg.iterations)
        bar = None
        if self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.iteration, desc=f"{cfg.model.id} [{cfg.augmentation}]",
                       dynamic_ncols=True, file=sys.stderr, disable=None)
        try:
            with stop_requests(self.dist.world == 1) as stop:
                self._loop(end, time_limit_s, writer, csv_path, bar, stop)
        finally:
            if bar:
                bar.close()
            if writer:
                writer.close()
        if stop:
            raise CancelledError(f"training stopped by {stop[0]} at iteration {self.iteration}; its checkpoint is "
                                 f"written: resume with --resume")
        if self.dist.world > 1:
            dist.barrier()
        return {"iteration": self.iteration, "history": self.history}

    def _loop(self, end: int, time_limit_s: float | None, writer: Any, csv_path: Path, bar: Any,
              stop: list[str]) -> None:
        cfg = self.cfg
        start = time.monotonic()
        t_last = time.monotonic()
        running: dict[str, float] = {}
        n_running = 0
        first_iteration = self.iteration
        status_at = start + STATUS_EVERY_S
        consecutive_skips = 0
        last_skip_warning = -10 ** 9
        dead = self.dead_monitor
        while self.iteration < end:
            stats = self.step()
            self.iteration += 1
            consecutive_skips = consecutive_skips + 1 if stats.get("skipped") else 0
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingStalledError(
                    f"the last {consecutive_skips} training steps (to iteration {self.iteration}) all had a "
                    f"non-finite loss or gradient (last: loss {stats.get('loss')}, gradient norm "
                    f"{stats.get('grad_norm')}), so the weights stopped changing; stopped without writing "
                    f"a checkpoint, so {self.out_dir / CHECKPOINT_STATE} still holds the last good state. "
                    f"Check the data for NaN/Inf voxels, lower the learning rate or use precision 'fp32' "
                    f"(fp16 can overflow), then resume with --resume.")
            if "gdl" in stats and "grad_norm" in stats:
                message = dead.update(self.iteration, stats["gdl"], stats["grad_norm"])
                stats["dead"] = float(dead.started is not None)
                if message and self.dist.main:
                    self.log(message)
            for k, v in stats.items():
                if math.isfinite(v):
                    running[k] = running.get(k, 0.0) + v
            n_running += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats.get('lr', 0):.1e}")
            now = time.monotonic()
            if self.dist.main and (bar is None or bar.disable) and now >= status_at:
                # no terminal, no bar: say how far the run is, how fast and how long it still takes
                status_at = now + STATUS_EVERY_S
                rate = (self.iteration - first_iteration) / max(1e-9, now - start)
                eta = (end - self.iteration) / max(1e-9, rate)
                self.log(f"iteration {self.iteration}/{end} ({self.iteration / end:.0%}): loss {stats['loss']:.4f}, "
                         f"{rate:.2f} it/s, ETA {format_duration(eta)}")
            row: dict[str, Any] | None = None
            if self.iteration % cfg.log_every == 0 or self.iteration == end:
                now = time.monotonic()
                row = {"iteration": self.iteration, "s_per_it": (now - t_last) / max(1, n_running),
                       **{k: v / max(1, n_running) for k, v in running.items()}}
                t_last, running, n_running = now, {}, 0
                share = row.get("skipped", 0.0)
                if share > SKIP_WARNING_SHARE and self.iteration - last_skip_warning >= 10 * cfg.log_every:
                    last_skip_warning = self.iteration
                    self.log(f"WARNING: {share:.0%} of the steps logged at iteration {self.iteration} were "
                             f"skipped (non-finite loss or gradient); a skipped step does not train.")
            if self.dist.main and cfg.val_every and (self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations):
                val = self.validate()
                row = (row or {"iteration": self.iteration}) | val
                if val:
                    self.log(f"iteration {self.iteration}: " + ", ".join(f"{k}={v:.3f}" for k, v in val.items()))
                    self._warn_if_collapsed(val["val_dice_mean"])
            if row and self.dist.main:
                self.history.append(row)
                _append_csv(csv_path, row)
                if writer:
                    for k, v in row.items():
                        if k != "iteration" and isinstance(v, float) and math.isfinite(v):
                            writer.add_scalar(k, v, self.iteration)
            timed_out = time_limit_s is not None and time.monotonic() - start > time_limit_s
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == end or timed_out or stop:
                self.checkpoint()
            if timed_out:
                self.log(f"time limit reached at iteration {self.iteration}; resume with --resume")
                break
            if stop:
                self.log(f"{stop[0]}: checkpoint written at iteration {self.iteration}; resume with --resume")
                break


def _truncate_csv(path: Path, iteration: int) -> int:
    """Drop the rows of ``path`` logged after ``iteration`` (a run killed between two checkpoints logged
    steps that its resume redoes); return how many. Rewritten atomically."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = list(reader.fieldnames or [])
    kept = [r for r in rows if int(r["iteration"]) <= iteration]
    if len(kept) == len(rows):
        return 0
    _rewrite_csv(path, fields, kept)
    return len(rows) - len(kept)


def _rewrite_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` under header ``fields`` to a temporary beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    existing: list[dict[str, Any]] = []
    fields: list[str] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            existing = list(reader)
            fields = list(reader.fieldnames or [])
    new_fields = fields + [k for k in row if k not in fields]
    if new_fields == fields and fields:
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        return
    _rewrite_csv(path, new_fields, existing + [row])
