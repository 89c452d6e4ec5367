"""Preprocessing cache: every case resampled once to the model grid and stored as ``.npy``.

Training memory-maps these arrays, so it never re-reads NIfTI files. The preprocessing is the core
library's :func:`SRCSMSegmenterLib.preprocessing.to_model_grid` — the very function inference uses — so
the network sees training and test images prepared identically (σ = 1 mm smoothing, world-aligned grid,
linear interpolation, image minimum outside the field of view).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SRCSMSegmenterLib.normalization import Normalization, intensity_affine
from SRCSMSegmenterLib.preprocessing import model_grid, to_model_grid

from .datasets import Case, Dataset, read_case

CACHE_VERSION = 1


@dataclass
class CachedCase:
    id: str
    image: np.ndarray  # float32 (K, J, I), raw units on the model grid (memory-mapped)
    label: np.ndarray  # uint8 (K, J, I)
    norm_scale: float
    norm_offset: float
    norm_min: float | None
    norm_max: float | None
    fill_value: float  # raw value outside the field of view
    foreground: dict[int, np.ndarray]  # label value → flat indices of its voxels (for oversampling)


def cache_key(dataset: Dataset, spacing: tuple[float, float, float], pre_smoothing_mm: float,
              normalization: Normalization) -> str:
    norm = normalization.model_dump(mode="json")
    if not norm.get("exclude_minimum"):  # the v1 rule keeps the caches (and keys) it always had
        norm.pop("exclude_minimum", None)
    blob = json.dumps([CACHE_VERSION, dataset.name, list(spacing), pre_smoothing_mm, norm], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.partial.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def build_cache(dataset: Dataset, cases: list[Case], root: Path, spacing: tuple[float, float, float],
                normalization: Normalization, pre_smoothing_mm: float = 1.0, log=print) -> Path:
    """Preprocess ``cases`` into ``root/<dataset>-<key>/`` (skipping cases already there)."""
    folder = Path(root) / f"{dataset.name}-{cache_key(dataset, spacing, pre_smoothing_mm, normalization)}"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"dataset": str(dataset.root), "spacing": list(spacing), "pre_smoothing_mm": pre_smoothing_mm,
            "normalization": normalization.model_dump(mode="json"), "version": CACHE_VERSION}
    (folder / "cache.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    for case in cases:
        meta_path = folder / f"{case.id}.json"
        if meta_path.is_file():
            continue
        image, label = read_case(dataset, case)
        grid = model_grid(image.geometry, image.shape, spacing)
        fill = float(np.min(image.array))
        img = to_model_grid(image, grid, pre_smoothing_mm=pre_smoothing_mm, default_value=fill)
        lab = to_model_grid(label, grid, is_label=True)
        scale, offset, lo, hi = intensity_affine(img.array, normalization, fill)
        _atomic_save(folder / f"{case.id}_img.npy", img.array.astype(np.float32))
        _atomic_save(folder / f"{case.id}_lbl.npy", lab.array.astype(np.uint8))
        meta = {"id": case.id, "shape": list(img.array.shape), "origin": list(grid.geometry.origin),
                "spacing": list(grid.geometry.spacing), "norm": [scale, offset, lo, hi], "fill": fill,
                "labels_present": sorted(int(v) for v in np.unique(lab.array) if v)}
        tmp = meta_path.with_name(f".{meta_path.name}.partial")
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, meta_path)  # written last: its presence marks a complete case
        log(f"cached {case.id}: {tuple(img.array.shape)} voxels at {spacing} mm")
    return folder


def load_cached(folder: Path, case_ids: list[str]) -> list[CachedCase]:
    out = []
    for cid in case_ids:
        meta = json.loads((folder / f"{cid}.json").read_text(encoding="utf-8"))
        image = np.load(folder / f"{cid}_img.npy", mmap_mode="r")
        label = np.load(folder / f"{cid}_lbl.npy", mmap_mode="r")
        flat = np.asarray(label).reshape(-1)
        fg = {int(v): np.flatnonzero(flat == v) for v in meta["labels_present"]}
        scale, offset, lo, hi = meta["norm"]
        out.append(CachedCase(cid, image, label, scale, offset, lo, hi, meta["fill"], fg))
    return out
