"""How thin a field of view a model still segments reliably: measured, carried by the card, checked.

Why: clinical scans often cover only a slab of the anatomy (an abdominal MR of the kidneys, a few
short-axis slices of the heart), and a model's accuracy falls as the slab thins — on CT slabs the
abdominal CT model lost 0.18 Dice at 40 mm and 0.08 at 60 mm, and held from 90 mm on
(docs/robustness.md). A segmentation that is silently worse is what a clinician must not meet. The
robustness benchmark (``python -m train robustness``) measures each slab thickness against the same
view of the unperturbed scan; ``python -m train release`` (or ``python -m train robustness
--write-card``) records the slabs in the card (``field_of_view``: :class:`FieldOfViewLimits`), and the
:class:`~SRCSMSegmenterLib.inference.Segmenter` warns when the image — or the region of interest — is
thinner than the thinnest slab from which on the model held the bar (:func:`thin_view_warning`): the
CLI, the Slicer module and the web page show the warning with the result.

The bar is issue 15's: at most :data:`MAX_DICE_LOSS` mean Dice lost and no structure empty where it
is in view. Cards without the field (models released before it) give no warning.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .image import Geometry
from .matching import Modality
from .preprocessing import physical_bounds

#: The Dice a perturbation may cost against the same view of the unperturbed scan (issue 15's bar).
MAX_DICE_LOSS = 0.05


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlabMeasurement(_Strict):
    """One slab thickness of the robustness benchmark on one dataset."""

    thickness_mm: float = Field(gt=0)
    delta_dice: float | None = Field(
        description="mean Dice on the slab minus the same view's unperturbed Dice (None: nothing in view)")
    empty: int = Field(ge=0, description="structures left empty where they are in view (over all cases)")
    in_view: int = Field(ge=0, description="structures in view (over all cases)")

    def held(self, max_loss: float) -> bool:
        """Whether this slab met the bar: at most ``max_loss`` Dice lost and nothing empty."""
        return self.empty == 0 and (self.delta_dice is None or self.delta_dice >= -max_loss - 1e-9)

    def describe(self) -> str:
        if self.delta_dice is None:
            parts = ["nothing in view"]
        elif self.delta_dice < 0:
            parts = [f"lost {-self.delta_dice:.3f} Dice"]
        else:
            parts = [f"gained {self.delta_dice:.3f} Dice"]
        if self.empty:
            parts.append(f"left {self.empty} structure{'s' if self.empty > 1 else ''} empty")
        return f"{self.thickness_mm:g} mm " + " and ".join(parts)


class DomainSlabs(_Strict):
    """The slab measurements of a model on one dataset (its own domain or the other one)."""

    dataset: str
    modality: Modality
    cases: int = Field(ge=1)
    slabs: tuple[SlabMeasurement, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _sorted(self) -> "DomainSlabs":
        thick = [s.thickness_mm for s in self.slabs]
        if thick != sorted(set(thick)):
            raise ValueError(f"field_of_view slabs of {self.dataset} must be distinct and sorted by thickness, got {thick}")
        return self

    def held_from_mm(self, max_loss: float) -> float | None:
        """The thinnest measured slab from which on every thicker slab met the bar (None: the thickest
        measured failed it, so no measured thickness is known to be safe)."""
        held_from = None
        for slab in reversed(self.slabs):
            if not slab.held(max_loss):
                break
            held_from = slab.thickness_mm
        return held_from


class FieldOfViewLimits(_Strict):
    """A model card's ``field_of_view``: the robustness benchmark's slabs, per dataset."""

    max_dice_loss: float = Field(MAX_DICE_LOSS, gt=0, description="the Dice loss the bar allows")
    domains: tuple[DomainSlabs, ...] = Field(min_length=1)
    measured_by: str = Field(description="the command, date and cases the slabs were measured with")

    def limiting_domain(self, modality: Modality) -> DomainSlabs | None:
        """Of the datasets of ``modality``, the one that needs the thickest field of view (bSSFP and LGE are
        both MR: an image cannot say which sequence it is, so the stricter one speaks)."""
        candidates = [d for d in self.domains if d.modality == modality]
        if not candidates:
            return None

        def need(d: DomainSlabs) -> float:
            held = d.held_from_mm(self.max_dice_loss)
            return float("inf") if held is None else held

        return max(candidates, key=need)

    def summary(self) -> str:
        """In one line, for the model card a user reads: the thinnest reliable view per dataset."""
        parts = []
        for d in self.domains:
            held = d.held_from_mm(self.max_dice_loss)
            parts.append(f"{d.modality} ({d.dataset}): " + (f"slabs from {held:g} mm" if held is not None
                                                             else f"no slab up to {d.slabs[-1].thickness_mm:g} mm"))
        return (f"reliable (at most {self.max_dice_loss:g} Dice lost, nothing empty) on " + "; ".join(parts)
                + "; thinner images get a warning")


def format_mm(mm: float) -> str:
    """A length for a message, to 0.1 mm and without a trailing ``.0`` (89.6 stays below a 90 mm bar in
    words too)."""
    return f"{mm:.1f}".removesuffix(".0")


def covers_slab(extent_mm: float, slab_mm: float, voxel_mm: float = 0.0) -> bool:
    """Whether a view ``extent_mm`` thick (``voxel_mm``: its voxel size along that axis; 0 for a region
    of interest's box) is at least as thick as the robustness benchmark's slab of ``slab_mm``.

    The benchmark's slab keeps the slices whose centres lie within ±slab/2 of the anatomy
    (:func:`train.perturbations.slab`): at least ``floor(slab / voxel)`` slices of that spacing, so a
    "40 mm" slab of 9.99 mm slices covers 39.96 mm and a "60 mm" slab of 7.7 mm slices 53.9 mm. A scan of
    as many slices is what the benchmark measured, and must not be told it is thinner.
    """
    if voxel_mm <= 0:
        return extent_mm >= slab_mm - 1e-6
    return extent_mm >= voxel_mm * math.floor(slab_mm / voxel_mm + 1e-6) - 1e-6


def thinnest_view(geometry: Geometry, shape_kji: Sequence[int],
                  roi_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, str, float]:
    """:func:`thinnest_extent_mm` and the voxel size along that axis (0 where a region of interest's box
    is the thinnest: its width is not counted in slices)."""
    k, j, i = (int(n) for n in shape_kji)
    extents = {"i": i * geometry.spacing[0], "j": j * geometry.spacing[1], "k": k * geometry.spacing[2]}
    voxels = {"i": float(geometry.spacing[0]), "j": float(geometry.spacing[1]), "k": float(geometry.spacing[2])}
    names = {"i": "i (column)", "j": "j (row)", "k": "k (slice)"}
    axis = min(extents, key=extents.__getitem__)
    extent, name, voxel = extents[axis], names[axis], voxels[axis]
    if roi_bounds is not None:
        lo_img, hi_img = physical_bounds(geometry, (k, j, i))
        lo = np.maximum(np.asarray(roi_bounds[0], dtype=float), lo_img)
        hi = np.minimum(np.asarray(roi_bounds[1], dtype=float), hi_img)
        widths = np.maximum(hi - lo, 0.0)
        w = int(np.argmin(widths))
        if widths[w] < extent:
            extent, name, voxel = float(widths[w]), f"{'LPS'[w]} (region of interest)", 0.0
    return float(extent), name, voxel


def thinnest_extent_mm(geometry: Geometry, shape_kji: Sequence[int],
                       roi_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, str]:
    """The thinnest physical extent of what the network gets to see, and which axis it is.

    Each voxel axis spans ``size × spacing`` (the field of view along it, whatever its direction); a
    region of interest (LPS ``(lo, hi)``) cuts the image to its box, whose world-axis widths count too.
    """
    extent, name, _ = thinnest_view(geometry, shape_kji, roi_bounds)
    return extent, name


def thin_view_warning(limits: FieldOfViewLimits | None, modality: Modality | None, extent_mm: float, axis: str,
                      model_id: str, voxel_mm: float = 0.0) -> str | None:
    """A warning when ``extent_mm`` is thinner than the thinnest slab from which on the model held the
    bar on images of ``modality`` (None: thick enough, or the card measured nothing for it);
    ``voxel_mm``: the voxel size along that axis (:func:`covers_slab`)."""
    if limits is None or modality is None:
        return None
    domain = limits.limiting_domain(modality)
    if domain is None:
        return None
    held = domain.held_from_mm(limits.max_dice_loss)
    thickest = domain.slabs[-1].thickness_mm
    if held is not None and covers_slab(extent_mm, held, voxel_mm):
        return None
    if held is None and covers_slab(extent_mm, thickest, voxel_mm):
        return None  # thicker than anything measured: nothing known either way
    failing = [s for s in domain.slabs if held is None or s.thickness_mm < held]
    measured = ("; ".join(s.describe() for s in failing) if failing else
                f"nothing as thin was measured (the thinnest slab, {domain.slabs[0].thickness_mm:g} mm, held)")
    after = (f"from {held:g} mm on it held the bar (at most {limits.max_dice_loss:g} Dice lost, nothing empty)"
             if held is not None else f"it missed the bar (at most {limits.max_dice_loss:g} Dice lost, nothing "
                                      f"empty) on every slab measured, up to {thickest:g} mm")
    return (f"The image covers only {format_mm(extent_mm)} mm along its {axis} axis. On slabs this thin the model "
            f"'{model_id}' lost accuracy in its robustness benchmark ({domain.dataset}, {domain.cases} cases, "
            f"against the same view of the whole scan): {measured}; {after}. Check the result closely, or "
            f"segment a scan that covers more of the anatomy.")


def models_holding_at(extent_mm: float, modality: Modality, anatomy: str, cards: Iterable[Any],
                      exclude_id: str, voxel_mm: float = 0.0) -> list[tuple[str, float]]:
    """Other models of ``anatomy`` (cards: objects with ``id``, ``anatomy`` and ``field_of_view``) whose
    measured slabs on ``modality`` held the bar at ``extent_mm``: ``(id, held from mm)``, the thinnest
    first — the fix a thin-view warning can name."""
    out = []
    for card in cards:
        limits = getattr(card, "field_of_view", None)
        if card.id == exclude_id or card.anatomy != anatomy or limits is None:
            continue
        domain = limits.limiting_domain(modality)
        held = None if domain is None else domain.held_from_mm(limits.max_dice_loss)
        if held is not None and covers_slab(extent_mm, held, voxel_mm):
            out.append((card.id, held))
    return sorted(out, key=lambda x: (x[1], x[0]))


__all__ = ["DomainSlabs", "FieldOfViewLimits", "MAX_DICE_LOSS", "SlabMeasurement", "covers_slab", "format_mm",
           "models_holding_at", "thin_view_warning", "thinnest_extent_mm", "thinnest_view"]
