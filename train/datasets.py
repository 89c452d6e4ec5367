"""nnU-Net v2 raw datasets (``dataset.json``, ``imagesTr``, ``labelsTr``, optional ``splits.json``).

Validation happens before any training starts, so a broken case is reported by name in seconds rather
than crashing an hours-long run: image/label shape or geometry mismatch, undeclared label values, empty
label maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Geometry, Volume, read_volume


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    modality: str  # "CT" or "MR"
    channel: str  # e.g. "CT", "T2", "bSSFP"
    labels: dict[str, int]
    cases: tuple[Case, ...]
    splits: dict[str, list[str]]
    description: str = ""

    def split(self, name: str | None) -> list[Case]:
        """Cases of a split (``train``/``val``/``test``), or all cases for ``None``/``all``."""
        if name in (None, "all"):
            return list(self.cases)
        if name not in self.splits:
            raise InputError(
                f"Dataset '{self.name}' has no split '{name}' (splits.json has: "
                f"{', '.join(self.splits) or 'none'}). Use one of those or 'all'."
            )
        by_id = {c.id: c for c in self.cases}
        missing = [i for i in self.splits[name] if i not in by_id]
        if missing:
            raise InputError(f"splits.json of '{self.name}' lists unknown cases: {', '.join(missing[:5])}.")
        return [by_id[i] for i in self.splits[name]]

    @property
    def label_values(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items() if v != 0}


def load_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"'{root}' is not an nnU-Net raw dataset: dataset.json is missing.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names", {})
    if len(channels) != 1:
        raise InputError(f"'{root}': SRCSM models take one input channel; dataset.json lists {len(channels)}.")
    channel = str(next(iter(channels.values())))
    modality = str(meta.get("modality") or ("CT" if channel.upper() == "CT" else "MR")).upper()
    if modality not in ("CT", "MR"):
        raise InputError(f"'{root}': modality '{modality}' is not supported (CT or MR).")
    labels = {str(k): int(v) for k, v in meta["labels"].items()}
    if labels.get("background", 0) != 0:
        raise InputError(f"'{root}': the background label must be 0.")
    cases = []
    for img in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        cid = img.name[: -len(f"_0000{ending}")]
        lab = root / "labelsTr" / f"{cid}{ending}"
        if not lab.is_file():
            raise InputError(f"'{root}': case '{cid}' has an image but no label file ({lab.name}).")
        cases.append(Case(cid, img, lab))
    if not cases:
        raise InputError(f"'{root}/imagesTr' holds no images ending in _0000{ending}.")
    splits_path = root / "splits.json"
    splits = json.loads(splits_path.read_text(encoding="utf-8")) if splits_path.is_file() else {}
    if isinstance(splits, list):  # nnU-Net's splits_final.json: list of folds; take fold 0
        splits = {"train": splits[0]["train"], "val": splits[0]["val"]}
    return Dataset(root, root.name, modality, channel, labels, tuple(cases), splits, meta.get("description", ""))


def read_case(dataset: Dataset, case: Case) -> tuple[Volume, Volume]:
    """Read image and label of a case and check they belong together."""
    image = read_volume(case.image)
    try:
        label_img = sitk.ReadImage(str(case.label))
    except RuntimeError as exc:
        raise InputError(f"Case '{case.id}': label file '{case.label.name}' is unreadable ({exc}).") from exc
    label = Volume(sitk.GetArrayFromImage(label_img), Geometry.from_sitk(label_img))
    validate_case(dataset, case, image, label)
    return image, label


def validate_case(dataset: Dataset, case: Case, image: Volume, label: Volume) -> None:
    if image.shape != label.shape:
        raise InputError(
            f"Case '{case.id}': image shape {image.shape} ≠ label shape {label.shape}. Re-export the label "
            f"on the image's grid."
        )
    if not image.geometry.almost_equal(label.geometry, tol=1e-3):
        raise InputError(
            f"Case '{case.id}': image and label geometry differ (origin/spacing/direction). Resample the label "
            f"onto the image grid."
        )
    if label.array.dtype.kind == "f" and not np.all(np.mod(label.array, 1) == 0):
        raise InputError(f"Case '{case.id}': the label map holds non-integer values.")
    present = set(np.unique(label.array).astype(int).tolist())
    declared = set(dataset.labels.values())
    undeclared = sorted(present - declared)
    if undeclared:
        raise InputError(
            f"Case '{case.id}': label values {undeclared} are not declared in dataset.json "
            f"(declared: {sorted(declared)}). Fix the label map or dataset.json."
        )
    if present <= {0}:
        raise InputError(f"Case '{case.id}': the label map is empty (background only). Remove the case or fix it.")


def validate_dataset(dataset: Dataset, cases: list[Case] | None = None) -> None:
    """Read every case once and validate it (raises on the first problem, naming the case)."""
    for case in cases or dataset.cases:
        read_case(dataset, case)
