"""Choose how a model pads a model grid thinner than its window — ``constant`` or ``replicate`` — on
slabs of its own validation cases, and write the choice into its card (``inference.padding_mode``).

``python -m train choose-padding MODEL DATASET --split val [--write-card]``

Why a choice at all: a slab thinner than the network's window (80 voxels at 4.8 mm = 384 mm for the
abdominal models) is padded to the window. The grid's minimum (``constant``) is what the v2 recipes
trained with; continuing the edge slices (``replicate``, MONAI's ``padding_mode``) held some models
better on thin slabs and cost others (docs/benchmarks.md, "Padding a thin scan"). Which one a model
gets must not be decided on its test cases, nor on the target domain it will meet: it is measured on
the source domain's validation cases, as the inference strategy and the clean-up are.

How: the robustness benchmark (:func:`train.robustness.run_robustness`) runs each case unperturbed and
cut to the slabs of :data:`SLABS`, once per padding, through the card's strategy and clean-up with
source matching on; every result is scored inside the slab. The rule: ``constant`` stays (what the
networks were trained with, unless a recipe says ``fov_padding``) unless ``replicate`` on these cases
leaves no more structures empty, raises the mean slab Dice by at least :data:`MIN_GAIN`, and costs the
whole volumes at most :data:`MAX_WHOLE_LOSS` — whole scans are padded too when they are thinner than the
window. The measurements go into the card's ``inference.padding_chosen_by``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SRCSMSegmenterLib.modelpackage import MODEL_JSON, InferenceSpec, read_card_bytes

from .card_edit import set_card_fields

#: The slab perturbations (train/perturbations.py) a padding is judged on: those the card's field of
#: view is measured on.
SLABS: tuple[str, ...] = ("slab_40mm", "slab_60mm", "slab_90mm", "slab_150mm")
PADDINGS: tuple[str, ...] = ("constant", "replicate")
#: ``replicate`` must raise the mean slab Dice by this much to replace ``constant``
MIN_GAIN = 0.01
#: ... and may cost the whole (unperturbed) volumes at most this much mean Dice.
MAX_WHOLE_LOSS = 0.005
UNPERTURBED = "none"


def _scores(result: dict) -> dict:
    """Mean Dice of the whole volumes and of the slabs (over cases, labels in view and slab
    thicknesses), structures left empty in view, and the mean Dice per slab."""
    from .robustness import summarize

    s = summarize(result)
    per_slab = {p: s[p]["dice"] for p in SLABS if p in s}
    finite = [v for v in per_slab.values() if not math.isnan(v)]
    return {"whole": s[UNPERTURBED]["dice"], "slabs": float(np.mean(finite)) if finite else math.nan,
            "empty": int(sum(s[p]["empty"] for p in SLABS if p in s)), "per_slab": per_slab,
            "in_view": int(sum(s[p]["in_view"] for p in SLABS if p in s))}


def measure(model: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
            split: str = "val", cases: int | None = None, device: str = "cpu", log=print) -> dict:
    """Run both paddings (module docstring) into ``out_dir/<padding>`` and return their scores."""
    from .robustness import run_robustness

    out = Path(out_dir)
    scores: dict[str, dict] = {}
    meta: dict = {}
    for padding in PADDINGS:
        result = run_robustness(model, dataset_dir, out / padding, split=split, cases=cases or 0,
                                perturbations=list(SLABS), device=device, padding_mode=padding, log=log,
                                command=f"python -m train choose-padding ({padding})")
        scores[padding] = _scores(result)
        meta = result["meta"]
    return {"model": meta["model"], "weights_sha256": meta["weights_sha256"], "dataset": meta["dataset"],
            "split": split, "cases": meta["cases"], "scores": scores}


@dataclass(frozen=True)
class PaddingChoice:
    padding_mode: str
    chosen_by: str


def choose(measured: dict) -> PaddingChoice:
    """The padding for a :func:`measure` result (the rule in the module docstring)."""
    c, r = measured["scores"]["constant"], measured["scores"]["replicate"]
    better = (r["empty"] <= c["empty"] and r["slabs"] >= c["slabs"] + MIN_GAIN
              and r["whole"] >= c["whole"] - MAX_WHOLE_LOSS)
    words = "; ".join(
        f"{p}: slabs {', '.join(f'{k[5:]} {v:.3f}' for k, v in s['per_slab'].items())} (mean {s['slabs']:.3f}), "
        f"{s['empty']} of {s['in_view']} structures empty, whole volumes {s['whole']:.3f}"
        for p, s in measured["scores"].items())
    where = (f"python -m train choose-padding on {len(measured['cases'])} {measured['dataset']} {measured['split']} "
             f"cases, {_dt.date.today().isoformat()} (SM on; replicate needs +{MIN_GAIN} on slabs, no more empty, "
             f"≤ {MAX_WHOLE_LOSS} lost on whole volumes)")
    return PaddingChoice("replicate" if better else "constant", f"{where} — {words}")


def write_card(package_dir: str | os.PathLike[str], choice: PaddingChoice) -> Path:
    """Set ``inference.padding_mode`` and ``inference.padding_chosen_by`` of a package folder's card (a
    text edit, atomic; every other field stays). A card whose padding changes no longer matches the
    metrics and field of view measured before: measure them again (``train release`` runs this step
    before its evaluations)."""
    path = Path(package_dir) / MODEL_JSON
    if not path.is_file():
        raise ValueError(f"'{package_dir}' is not a model package folder (no model.json); only folders can be edited")
    current = read_card_bytes(path.read_bytes(), str(path)).inference
    inference = InferenceSpec.model_validate({**current.model_dump(mode="json"), "padding_mode": choice.padding_mode,
                                              "padding_chosen_by": choice.chosen_by})
    return set_card_fields(package_dir, {"inference": inference.model_dump(mode="json")})
