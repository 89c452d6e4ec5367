"""Cross-domain evaluation of a model package on a labelled (target) dataset.

Every case is segmented through the core library's :class:`~SRCSMSegmenterLib.inference.Segmenter`
— exactly what the Slicer module and ``srcsm`` run — with and without source matching, and scored in
the case's original grid (Dice, ASSD, HD95, max surface distance per label). Writes ``metrics.csv``,
``summary.csv``, ``summary.md``, box plots, an overlay of each setting's median case, the predictions,
and ``summary.json`` (mean Dice/ASSD per setting, for the model card).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.image import Volume, read_volume, write_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.postprocess import PostProcessing
from SRCSMSegmenterLib.postprocess import resolve as resolve_postprocessing

from .datasets import load_dataset
from .metrics import evaluate_case, read_label_map
from .report import summarize, tag_rows, write_reports

SETTINGS = {"on": "with SM", "off": "without SM"}
LANDMARK = "with SM, landmark ROI"


def landmark_bounds(reference: Volume, extent_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's test ROI (SRCSM §3.3): a box of the model's patch extent centred on the centre of
    the reference foreground's bounding box, in LPS. It uses the ground truth — for measuring what our
    whole-volume sliding window costs, never for clinical use."""
    kji = np.argwhere(reference.array > 0)
    if kji.size == 0:
        raise ValueError("the reference is empty; a landmark cannot be derived")
    lo, hi = kji.min(0)[::-1].astype(float), kji.max(0)[::-1].astype(float)  # i, j, k
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    pts = reference.geometry.index_to_physical(corners)
    centre = (pts.min(0) + pts.max(0)) / 2
    return centre - extent_mm / 2, centre + extent_mm / 2


def check_label_values(package, dataset) -> dict[int, str]:
    """The model's label names by value, after checking that the dataset uses the same values (a
    model scored against another label numbering would measure nothing)."""
    model_names = {lab.value: lab.name for lab in package.card.labels.labels}
    target_names = dataset.label_values
    if sorted(model_names) != sorted(target_names):
        raise ValueError(
            f"the model predicts labels {model_names} but the dataset has {target_names}; evaluate on a dataset "
            f"with the same label values"
        )
    return model_names


def card_padding(record: dict) -> str:
    """The padding the evaluated card prescribes, from an evaluation summary or a robustness run's meta
    (records made before cards had one: constant, the only padding then)."""
    return record.get("card_padding_mode", "constant")


def padded_as_card(record: dict) -> bool:
    """Whether an evaluation or robustness run padded thin grids as the model's card does — the only
    measurements a card may carry (a card describes what a user gets)."""
    return record.get("padding_mode", "constant") == card_padding(record)


def evaluate_model(model: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   split: str = "all", sm: str = "both", device: str = "auto", limit: int | None = None,
                   keep_largest: bool = False, landmark: bool = False, log=print,
                   postprocess: str | PostProcessing = "card", padding_mode: str = "card") -> dict:
    """Segment every case of ``split`` with/without SM (``sm``: both/on/off) and, with ``landmark``,
    also with SM inside the paper's ground-truth-centred ROI; write the reports into ``out_dir``.

    ``postprocess``: the clean-up, as ``srcsm segment --postprocess`` takes it — the model card's
    default (``card``: what a user gets), ``none`` (the network's own labels), ``keep-largest`` or
    ``min-volume:MM3``; ``keep_largest=True`` is ``keep-largest``. The summary records it, and
    ``padding_mode`` (:class:`~SRCSMSegmenterLib.inference.Segmenter`'s: ``card``, the card's, is what a user
    gets) with the card's own, so a tool writing a card can refuse a measurement padded otherwise."""
    package = Catalog().resolve(model)
    cleanup = resolve_postprocessing(package.card.postprocessing, "keep-largest" if keep_largest else postprocess)
    dataset = load_dataset(dataset_dir)
    cases = dataset.split(split)[: limit or None]
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    model_names = check_label_values(package, dataset)
    settings = [SETTINGS[s] for s in (("on", "off") if sm == "both" else (sm,))]
    if landmark:
        settings.append(LANDMARK)
    extent = np.asarray(package.card.patch_size, float) * np.asarray(package.card.spacing, float)
    segmenter = Segmenter(package, device=device, padding_mode=padding_mode)  # type: ignore[arg-type]
    rows: list[dict] = []
    seconds: list[float] = []
    for case in cases:
        image = read_volume(case.image)
        reference = read_label_map(case.label)
        for setting in settings:
            t = time.perf_counter()
            roi = landmark_bounds(reference, extent) if setting == LANDMARK else None
            result = segmenter.segment(image, source_matching=setting != SETTINGS["off"],
                                       target_modality=dataset.modality,  # type: ignore[arg-type]
                                       roi_bounds=roi, postprocessing=cleanup)
            seconds.append(time.perf_counter() - t)
            pred_path = out / "predictions" / _slug(setting) / f"{case.id}.nii.gz"
            pred_path.parent.mkdir(parents=True, exist_ok=True)
            write_volume(result.labelmap, pred_path)
            case_rows = evaluate_case(result.labelmap, reference, model_names)
            rows += tag_rows(case_rows, case=case.id, setting=setting)
            mean = np.nanmean([r["dice"] for r in case_rows])
            log(f"{case.id} [{setting}]: mean Dice {mean:.3f} ({seconds[-1]:.1f} s)")

    images = {c.id: c for c in cases}

    def case_loader(case_id: str, setting: str) -> tuple[Volume, Volume, Volume]:
        c = images[case_id]
        return (read_volume(c.image), read_label_map(c.label),
                read_label_map(out / "predictions" / _slug(setting) / f"{case_id}.nii.gz"))

    colors = {lab.value: lab.color for lab in package.card.labels.labels}
    title = f"{package.card.name} ({package.id}) on {dataset.name} [{split}]"
    notes = (f"Model trained on {package.card.source.modality} ({package.card.provenance.augmentation}, "
             f"{package.card.provenance.iterations} iterations); target modality {dataset.modality}; "
             f"{len(cases)} cases; the whole volume (no landmark ROI), {segmenter.strategy.replace('_', ' ')}; "
             f"clean-up: {cleanup.describe()}; device {segmenter.device}"
             + ("." if segmenter.padding_mode == package.card.inference.padding_mode
                else f"; {segmenter.padding_mode} padding of a grid smaller than the window (the card's: "
                     f"{package.card.inference.padding_mode})."))
    write_reports(rows, out, settings=settings, title=title, case_loader=case_loader, colors=colors, notes=notes)
    summary = {"model": package.id, "weights_sha256": package.card.weights.sha256, "dataset": dataset.name,
               "split": split, "cases": len(cases), "postprocessing": cleanup.cli_value(),
               "inference": segmenter.strategy, "padding_mode": segmenter.padding_mode,
               "card_padding_mode": package.card.inference.padding_mode,
               "mean_seconds_per_case": float(np.mean(seconds)) if seconds else None, "settings": {}}
    for row in summarize(rows, settings):
        entry = summary["settings"].setdefault(row["setting"], {})
        entry[str(row["label"]) if row["label"] != "mean" else "mean"] = {
            "name": row.get("name"), "dice": row.get("dice_mean"), "assd": row.get("assd_mean"),
            "hd95": row.get("hd95_mean"), "max_sd": row.get("max_sd_mean")}
    tmp = out / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    log(f"reports in {out}")
    return summary


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
