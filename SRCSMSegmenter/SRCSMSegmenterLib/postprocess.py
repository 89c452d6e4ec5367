"""Clean-up of a predicted label map — a property of the model, chosen on its validation cases.

A model's stray islands depend on the model (the cardiac model on LGE leaves blobs far from the heart:
HD95 103 mm without clean-up, 9.9 mm with it), so the model card carries the clean-up that measured
best on its validation / in-domain cases (:class:`PostProcessing`, ``model.json`` field
``postprocessing``), and the front ends apply it unless the user says otherwise. One definition here,
for the CLI, the Slicer module, the web front end and ``train``:

* ``none`` — the argmax as it is;
* ``keep_largest`` — for each label, only its largest 26-connected component;
* ``min_volume`` — for each label, drop the 26-connected components smaller than ``min_volume_mm3``.

A user's choice is one of :data:`CHOICES` (``card`` = the model's default), resolved by :func:`resolve`.
"""

from __future__ import annotations

import argparse
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError

Method = Literal["none", "keep_largest", "min_volume"]
#: What a user may ask for on the command line (``--postprocess``); ``min-volume:MM3`` as well.
CHOICES = ("card", "none", "keep-largest")

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


class PostProcessing(BaseModel):
    """The clean-up of a model's predictions (``model.json`` ``postprocessing``; absent: ``none``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Method = "none"
    min_volume_mm3: float | None = Field(None, gt=0, description="for min_volume: smallest component kept")
    chosen_by: str | None = Field(None, description="the measurement this default was chosen on")

    @model_validator(mode="after")
    def _check(self) -> "PostProcessing":
        if self.method == "min_volume" and self.min_volume_mm3 is None:
            raise ValueError("postprocessing min_volume needs min_volume_mm3 (the smallest component kept, mm³)")
        if self.method != "min_volume" and self.min_volume_mm3 is not None:
            raise ValueError(f"min_volume_mm3 only applies to method min_volume, not {self.method}")
        return self

    def describe(self) -> str:
        """In words, for a user interface."""
        if self.method == "keep_largest":
            return "keep the largest component of each label"
        if self.method == "min_volume":
            return f"remove components smaller than {self.min_volume_mm3:g} mm³"
        return "no clean-up"

    def cli_value(self) -> str:
        """The ``srcsm segment --postprocess`` value that asks for exactly this clean-up."""
        if self.method == "keep_largest":
            return "keep-largest"
        if self.method == "min_volume":
            return f"min-volume:{self.min_volume_mm3:g}"
        return "none"


NONE = PostProcessing()
KEEP_LARGEST = PostProcessing(method="keep_largest")


def parse_choice(text: str) -> str:
    """Validate a user's ``--postprocess`` value (``card``, ``none``, ``keep-largest``, ``min-volume:MM3``)."""
    value = text.strip().lower()
    if value in CHOICES:
        return value
    if value.startswith("min-volume:"):
        try:
            mm3 = float(value.split(":", 1)[1])
        except ValueError:
            mm3 = float("nan")
        if mm3 > 0:
            return f"min-volume:{mm3:g}"
    raise InputError(
        f"Unknown post-processing '{text}'. Use card (the model's default), none, keep-largest, or "
        f"min-volume:MM3 (e.g. min-volume:500 drops islands under 500 mm³).")


def add_arguments(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """The clean-up options every front end that segments takes (``srcsm segment``, ``python -m train
    evaluate``): ``--postprocess`` (default ``card``) and its two shorthands, mutually exclusive."""
    clean = parser.add_mutually_exclusive_group()
    clean.add_argument("--postprocess", default="card", metavar="card|none|keep-largest|min-volume:MM3",
                       help=f"clean-up of {what}: the model card's default (card, the default), none, the "
                            "largest component of each label, or drop components under MM3 cubic millimetres")
    clean.add_argument("--keep-largest", dest="postprocess", action="store_const", const="keep-largest",
                       help="keep only the largest component of each label (= --postprocess keep-largest)")
    clean.add_argument("--no-keep-largest", dest="postprocess", action="store_const", const="none",
                       help="no clean-up, whatever the model card says (= --postprocess none)")


def resolve(card_default: PostProcessing | None, choice: str | PostProcessing = "card") -> PostProcessing:
    """The clean-up to apply: the model card's default for ``card``, else what the user chose."""
    if isinstance(choice, PostProcessing):
        return choice
    value = parse_choice(choice)
    if value == "card":
        return card_default or NONE
    if value == "none":
        return NONE
    if value == "keep-largest":
        return KEEP_LARGEST
    return PostProcessing(method="min_volume", min_volume_mm3=float(value.split(":", 1)[1]))


def _components_per_label(labels: np.ndarray, values: list[int]):
    """For each label value present: (a view of ``labels`` on the value's bounding box, its mask there,
    its 26-connected components there, their number).

    Why the boxes: every voxel of a label lies in its bounding box, so the components are exactly those
    of the whole volume, while a 512×512×300 CT's four organs span a few percent of it — labelling the
    full array per label cost 7.8 s of a 15 s cold ``srcsm segment`` (docs/benchmarks.md)."""
    from scipy import ndimage

    wanted = sorted({int(v) for v in values if int(v) > 0})
    if not wanted or labels.size == 0:
        return
    boxes = ndimage.find_objects(labels, max_label=wanted[-1])  # one pass: the box of every value
    for value in wanted:
        box = boxes[value - 1]
        if box is None:
            continue
        sub = labels[box]  # a view: writes reach ``labels``
        mask = sub == value
        comp, n = ndimage.label(mask, structure=_STRUCTURE)
        yield sub, mask, comp, n


def keep_largest_components(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep, for each label value, only its largest 26-connected component (in place)."""
    for sub, mask, comp, n in _components_per_label(labels, values):
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        sub[(comp != int(np.argmax(sizes))) & mask] = 0
    return labels


def remove_small_components(labels: np.ndarray, values: list[int], min_voxels: float) -> np.ndarray:
    """Drop, for each label value, its 26-connected components of fewer than ``min_voxels`` (in place).

    The largest component of a label always stays, so a small organ is never erased altogether."""
    for sub, mask, comp, n in _components_per_label(labels, values):
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        small = sizes < min_voxels
        small[int(np.argmax(sizes))] = False
        small[0] = False
        sub[small[comp] & mask] = 0
    return labels


def apply(labels: np.ndarray, values: list[int], spec: PostProcessing, spacing: tuple[float, float, float]) -> np.ndarray:
    """Apply ``spec`` to a label array (in place) whose voxels have ``spacing`` (mm, any order)."""
    if spec.method == "keep_largest":
        return keep_largest_components(labels, values)
    if spec.method == "min_volume":
        voxel_mm3 = float(np.prod(spacing))
        return remove_small_components(labels, values, spec.min_volume_mm3 / voxel_mm3)  # type: ignore[operator]
    return labels
