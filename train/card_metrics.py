"""Model-card metrics from evaluation summaries, so the numbers in a card are never typed by hand.

``python -m train card-metrics NAME=EVAL_DIR [NAME=EVAL_DIR ...] --note TEXT --out metrics.json`` reads
the ``summary.json`` that ``python -m train evaluate`` wrote into each ``EVAL_DIR`` and writes the
``metrics`` block of a model card (``python -m train export … --metrics metrics.json``): per entry the
dataset, split, number of cases, and for each source-matching setting the mean Dice, mean ASSD and the
Dice per label, rounded for reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from SRCSMSegmenterLib.image import atomic_output

from .evaluate import LANDMARK, SETTINGS, card_padding, padded_as_card

# Card keys for the evaluation settings (stable identifiers, not display names).
SETTING_KEYS = {SETTINGS["on"]: "with_source_matching", SETTINGS["off"]: "without_source_matching",
                LANDMARK: "with_source_matching_landmark_roi"}


def setting_metrics(per_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean = per_label["mean"]
    return {"mean_dice": round(mean["dice"], 3),
            "mean_assd_mm": None if mean.get("assd") is None else round(mean["assd"], 2),
            "dice_per_label": {v["name"]: round(v["dice"], 3) for k, v in per_label.items() if k != "mean"}}


def entry_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    if not padded_as_card(summary):
        raise ValueError(f"the evaluation of {summary['model']} on {summary['dataset']} padded with "
                         f"{summary['padding_mode']!r}, not as its card does ({card_padding(summary)!r}); a card's "
                         f"metrics must be what a user gets: evaluate without --padding-mode")
    entry: dict[str, Any] = {"dataset": summary["dataset"], "split": summary["split"], "cases": summary["cases"]}
    if "postprocessing" in summary:  # the clean-up the numbers include (summaries before 2026-12-04: none)
        entry["postprocessing"] = summary["postprocessing"]
    for setting, per_label in summary["settings"].items():
        if setting not in SETTING_KEYS:
            raise ValueError(f"unknown evaluation setting {setting!r} in the summary")
        entry[SETTING_KEYS[setting]] = setting_metrics(per_label)
    return entry


def card_metrics(entries: dict[str, Path], note: str | None = None) -> dict[str, Any]:
    """``entries`` maps a card key (e.g. ``cross_domain_ct_btcv_all30``) to an evaluation folder."""
    out: dict[str, Any] = {"note": note} if note else {}
    for key, folder in entries.items():
        f = Path(folder) / "summary.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: run `python -m train evaluate … --out {folder}` first")
        out[key] = entry_from_summary(json.loads(f.read_text(encoding="utf-8")))
    return out


def write_card_metrics(entries: dict[str, Path], out: Path, note: str | None = None) -> Path:
    data = card_metrics(entries, note)
    with atomic_output(out) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(out)
