"""Choose a model's default clean-up on its validation / in-domain cases, and write it into its card.

``python -m train choose-postprocessing MODEL DATASET --split val [--write-card]``

Every case is segmented once through the core library's :class:`~SRCSMSegmenterLib.inference.Segmenter`
(source matching on, no clean-up — what the module runs), then each candidate clean-up of
:mod:`SRCSMSegmenterLib.postprocess` is applied to that prediction and scored with
:func:`train.metrics.evaluate_case` in the case's own grid. The choice: the best mean Dice; among
candidates within ``DICE_TIE`` of it, the lowest mean HD95 (misses count as a Dice of 0 and are left
out of the distance means, as in ``evaluate``); among those, the first in :data:`CANDIDATES` order
(``none`` first: no clean-up unless it measurably helps).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import numpy as np

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.modelpackage import MODEL_JSON, read_card_bytes
from SRCSMSegmenterLib.postprocess import PostProcessing, apply

from .datasets import load_dataset
from .metrics import evaluate_case, read_label_map

CANDIDATES: tuple[PostProcessing, ...] = (
    PostProcessing(method="none"),
    PostProcessing(method="keep_largest"),
    *(PostProcessing(method="min_volume", min_volume_mm3=v) for v in (100.0, 500.0, 2000.0, 10000.0)),
)
#: Mean Dice differences below this are ties (decided by HD95).
DICE_TIE = 0.002


def _name(spec: PostProcessing) -> str:
    return spec.cli_value()


def measure(model: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], splits: list[str],
            device: str = "cpu", limit: int | None = None, log=print) -> dict:
    """Mean Dice and HD95 of every candidate clean-up on the cases of ``splits`` (see module docstring)."""
    package = Catalog().resolve(str(model))
    dataset = load_dataset(dataset_dir)
    cases = [c for s in splits for c in dataset.split(s)][: limit or None]
    if not cases:
        raise ValueError(f"no cases in split(s) {splits} of {dataset.name}")
    names = {lab.value: lab.name for lab in package.card.labels.labels}
    segmenter = Segmenter(package, device=device)
    rows: dict[str, list[dict]] = {_name(c): [] for c in CANDIDATES}
    for case in cases:
        image = read_volume(case.image)
        reference = read_label_map(case.label)
        raw = segmenter.segment(image, target_modality=dataset.modality,  # type: ignore[arg-type]
                                postprocessing=PostProcessing(method="none")).labelmap
        for spec in CANDIDATES:
            labels = apply(raw.array.copy(), list(names), spec, raw.geometry.spacing)
            case_rows = evaluate_case(raw.with_array(labels), reference, names)
            rows[_name(spec)] += [dict(r, case=case.id) for r in case_rows]
        log(f"{case.id}: " + ", ".join(
            f"{k} {np.nanmean([r['dice'] for r in v if r['case'] == case.id]):.3f}" for k, v in rows.items()))
    summary = {}
    for key, rs in rows.items():
        dice = [r["dice"] for r in rs if not math.isnan(r["dice"])]
        hd = [r["hd95"] for r in rs if not math.isnan(r["hd95"])]
        summary[key] = {"dice": float(np.mean(dice)) if dice else math.nan,
                        "hd95": float(np.mean(hd)) if hd else math.nan}
    return {"model": package.id, "weights_sha256": package.card.weights.sha256, "dataset": dataset.name,
            "splits": splits, "cases": [c.id for c in cases], "candidates": summary}


def choose(summary: dict) -> PostProcessing:
    """The chosen clean-up for a :func:`measure` result (rule in the module docstring)."""
    cands = summary["candidates"]
    best = max(v["dice"] for v in cands.values())
    tied = [spec for spec in CANDIDATES if cands[_name(spec)]["dice"] >= best - DICE_TIE]
    low = min(cands[_name(s)]["hd95"] for s in tied)
    pick = next(s for s in tied if cands[_name(s)]["hd95"] <= low + 1e-9)
    words = "; ".join(f"{k}: Dice {v['dice']:.3f}, HD95 {v['hd95']:.1f} mm" for k, v in cands.items())
    chosen_by = (f"python -m train choose-postprocessing on {len(summary['cases'])} {summary['dataset']} "
                 f"{'+'.join(summary['splits'])} cases, {_dt.date.today().isoformat()} (SM on) — {words}")
    return pick.model_copy(update={"chosen_by": chosen_by})


def write_card(package_dir: str | os.PathLike[str], spec: PostProcessing) -> Path:
    """Set the ``postprocessing`` field of a package folder's model.json, atomically, as a text edit:
    every other byte of the card stays as it was (other fields may be edited by other tools); a new
    field goes before ``provenance``."""
    path = Path(package_dir) / MODEL_JSON
    if not path.is_file():
        raise ValueError(f"'{package_dir}' is not a model package folder (no model.json); only folders can be edited")
    text = path.read_text(encoding="utf-8")
    lines = json.dumps(spec.model_dump(mode="json"), indent=2, ensure_ascii=False).splitlines()
    block = '  "postprocessing": ' + "\n".join([lines[0]] + ["  " + line for line in lines[1:]])
    key = '\n  "postprocessing": {'
    if key in text:
        begin = text.index(key) + 1
        end = text.index("\n  }", begin) + len("\n  }")
        text = text[:begin] + block + text[end:]
    else:
        anchor = '\n  "provenance": '
        if anchor not in text:
            raise ValueError(f"{path}: no top-level 'provenance' field to insert before; is it a model card?")
        at = text.index(anchor) + 1
        text = text[:at] + block + ",\n" + text[at:]
    if json.loads(text).get("postprocessing") != spec.model_dump(mode="json"):
        raise ValueError(f"{path}: the card's layout is unexpected; set 'postprocessing' by hand")
    read_card_bytes(text.encode("utf-8"), str(path))  # still a valid card, before anything is replaced
    tmp = path.with_name(f".{MODEL_JSON}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
