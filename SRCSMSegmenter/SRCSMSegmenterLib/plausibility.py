"""Is a segmentation plausible for the model that made it? One check for the CLI and the module.

Why: a model applied to the wrong anatomy still returns *something* — an abdominal model on a cardiac
image paints a small "liver" and "spleen" into the heart and exits 0. The network cannot tell; the
label volumes can. Every model card records, per label, the range of volumes on its training labels
(:class:`TrainingLabelStats`, measured by ``python -m train export``); a result far outside that range,
a structure every training case had but the result lacks, or no structure at all gets a warning that
names the fix (another model, or the region of interest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .image import Volume
from .labels import LabelTable

#: A structure this much smaller than the smallest training case (or larger than the largest) is
#: reported. Generous on purpose: training sets are small, and a real organ may be smaller or larger
#: than any of them; what this catches is a factor, not a few percent.
TOO_SMALL_FACTOR = 0.25
TOO_LARGE_FACTOR = 2.5


class StructureStats(BaseModel):
    """One label's volume over the training labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    volume_ml: tuple[float, float] = Field(description="smallest and largest volume (ml) in a training case")
    present_in: float = Field(ge=0.0, le=1.0, description="share of training cases that contain the label")


class TrainingLabelStats(BaseModel):
    """Per-label volume ranges of a model's training labels (model card ``training_label_stats``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cases: int = Field(ge=1)
    labels: dict[str, StructureStats] = Field(description="by label name, as in the label table")


def voxel_ml(volume: Volume) -> float:
    """The physical volume of one voxel of ``volume``, in millilitres."""
    return float(np.prod(volume.geometry.spacing)) / 1000.0


def label_volumes_ml(labelmap: Volume, table: LabelTable) -> dict[str, float]:
    """Volume (ml) of each label of ``table`` in ``labelmap`` (0 when absent)."""
    ml = voxel_ml(labelmap)
    array = np.asarray(labelmap.array)
    # one comparison per label on the label map's own (small) type: a bincount would first copy a
    # 512×512×300 map to int64 (0.6 GB, most of a second)
    return {lab.name: float(np.count_nonzero(array == lab.value)) * ml for lab in table.labels}


def measure_label_stats(labelmaps: Iterable[Volume], table: LabelTable) -> TrainingLabelStats:
    """The statistics recorded in a model card, from the training label maps."""
    volumes: dict[str, list[float]] = {lab.name: [] for lab in table.labels}
    n = 0
    for labelmap in labelmaps:
        n += 1
        for name, ml in label_volumes_ml(labelmap, table).items():
            volumes[name].append(ml)
    if n == 0:
        raise ValueError("no training label maps to measure")
    stats = {}
    for name, vs in volumes.items():
        present = [v for v in vs if v > 0]
        lo, hi = (min(present), max(present)) if present else (0.0, 0.0)
        stats[name] = StructureStats(volume_ml=(round(lo, 2), round(hi, 2)), present_in=round(len(present) / n, 4))
    return TrainingLabelStats(cases=n, labels=stats)


@dataclass(frozen=True)
class Alternative:
    """Another model a user could choose (for the fix in a warning)."""

    id: str
    anatomy: str
    modality: str


def _fmt_ml(ml: float) -> str:
    return f"{ml:.0f} ml" if ml >= 10 else f"{ml:.1f} ml"


def check_segmentation(labelmap: Volume, table: LabelTable, stats: TrainingLabelStats | None, model_id: str,
                       anatomy: str, roi: bool = False, alternatives: Sequence[Alternative] = ()) -> list[str]:
    """Warnings (empty when plausible) about ``labelmap`` as a result of the model ``model_id``.

    ``roi``: the result covers only a region of interest, so structures may legitimately be cut or
    missing; only an empty result and structures larger than any training case are reported then.
    ``alternatives``: other models to name as the fix (those of another anatomy are named first).
    """
    volumes = label_volumes_ml(labelmap, table)
    others = sorted(alternatives, key=lambda a: (a.anatomy == anatomy, a.id))
    others = [a for a in others if a.id != model_id]
    fix = ""
    if others:
        names = ", ".join(f"`--model {a.id}` ({a.anatomy}, {a.modality})" for a in others[:3])
        fix = f" If the image shows another anatomy, choose a model for it: {names}."
    if not any(v > 0 for v in volumes.values()):
        return [f"The model '{model_id}' ({anatomy}) found none of its structures ({', '.join(volumes)}) in this "
                f"image: is it a {anatomy} image?{fix}"
                + (" Or the region of interest misses them: enlarge it." if roi else "")]
    if stats is None:
        return []
    problems = []
    for name, ml in volumes.items():
        s = stats.labels.get(name)
        if s is None or s.present_in == 0:
            continue
        lo, hi = s.volume_ml
        if ml == 0:
            if not roi and s.present_in >= 0.99:
                problems.append(f"no {name} (every training case had one)")
        elif ml < TOO_SMALL_FACTOR * lo and not roi:
            problems.append(f"{name} {_fmt_ml(ml)}, far smaller than in any training case ({_fmt_ml(lo)}–{_fmt_ml(hi)})")
        elif ml > TOO_LARGE_FACTOR * hi:
            problems.append(f"{name} {_fmt_ml(ml)}, far larger than in any training case ({_fmt_ml(lo)}–{_fmt_ml(hi)})")
    if not problems:
        return []
    return [f"The result looks implausible for the model '{model_id}' ({anatomy}): {'; '.join(problems)}."
            f"{fix} If the field of view cuts the anatomy, this warning can be ignored; check the result."]


__all__ = ["Alternative", "StructureStats", "TrainingLabelStats", "check_segmentation", "label_volumes_ml",
           "measure_label_stats", "voxel_ml"]
