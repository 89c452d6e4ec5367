"""Choose how a model runs by default — inference strategy and clean-up — on its validation cases,
and write the choice into its card.

``python -m train choose-postprocessing MODEL DATASET --split val [--write-card]``

Every case is segmented through the core library's :class:`~SRCSMSegmenterLib.inference.Segmenter`
(source matching on, no clean-up — what the module runs) once per inference strategy
(:data:`STRATEGIES`: one pass over the whole model grid, or the sliding window), then each candidate
clean-up of :mod:`SRCSMSegmenterLib.postprocess` is applied to that prediction and scored with
:func:`train.metrics.evaluate_case` in the case's own grid. The choice: the best mean Dice over all
(strategy, clean-up) pairs; among pairs within ``DICE_TIE`` of it, the lowest mean HD95 (misses count
as a Dice of 0 and are left out of the distance means, as in ``evaluate``); among those, the first in
:data:`STRATEGIES` × :data:`CANDIDATES` order (``whole_grid`` first: it is never slower; ``none``
first: no clean-up unless it measurably helps).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
import math
import os
from pathlib import Path

import numpy as np

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.modelpackage import MODEL_JSON, InferenceSpec, read_card_bytes
from SRCSMSegmenterLib.postprocess import PostProcessing, apply

from .card_edit import set_card_fields
from .datasets import load_dataset
from .metrics import evaluate_case, read_label_map

CANDIDATES: tuple[PostProcessing, ...] = (
    PostProcessing(method="none"),
    PostProcessing(method="keep_largest"),
    *(PostProcessing(method="min_volume", min_volume_mm3=v) for v in (100.0, 500.0, 2000.0, 10000.0)),
)
#: The inference strategies compared (``InferenceSpec.strategy``), in tie-break order.
STRATEGIES: tuple[str, ...] = ("whole_grid", "sliding_window")
#: Mean Dice differences below this are ties (decided by HD95).
DICE_TIE = 0.002


def _name(spec: PostProcessing) -> str:
    return spec.cli_value()


def measure(model: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], splits: list[str],
            device: str = "cpu", limit: int | None = None, log=print,
            strategies: tuple[str, ...] = STRATEGIES) -> dict:
    """Mean Dice and HD95 of every (strategy, clean-up) pair on the cases of ``splits``, and the network
    time of each strategy (see module docstring)."""
    package = Catalog().resolve(str(model))
    dataset = load_dataset(dataset_dir)
    cases = [c for s in splits for c in dataset.split(s)][: limit or None]
    if not cases:
        raise ValueError(f"no cases in split(s) {splits} of {dataset.name}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown inference strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    names = {lab.value: lab.name for lab in package.card.labels.labels}
    segmenters = {s: Segmenter(package, device=device, strategy=s) for s in strategies}  # type: ignore[arg-type]
    rows: dict[str, dict[str, list[dict]]] = {s: {_name(c): [] for c in CANDIDATES} for s in strategies}
    network_s: dict[str, list[float]] = {s: [] for s in strategies}
    for case in cases:
        image = read_volume(case.image)
        reference = read_label_map(case.label)
        for strategy, segmenter in segmenters.items():
            result = segmenter.segment(image, target_modality=dataset.modality,  # type: ignore[arg-type]
                                       postprocessing=PostProcessing(method="none"))
            raw = result.labelmap
            network_s[strategy].append(result.timings["network_s"])
            for spec in CANDIDATES:
                labels = apply(raw.array.copy(), list(names), spec, raw.geometry.spacing)
                case_rows = evaluate_case(raw.with_array(labels), reference, names)
                rows[strategy][_name(spec)] += [dict(r, case=case.id) for r in case_rows]
            log(f"{case.id} {strategy}: " + ", ".join(
                f"{k} {np.nanmean([r['dice'] for r in v if r['case'] == case.id]):.3f}"
                for k, v in rows[strategy].items()))
    summary: dict[str, dict] = {}
    for strategy in strategies:
        cands = {}
        for key, rs in rows[strategy].items():
            dice = [r["dice"] for r in rs if not math.isnan(r["dice"])]
            hd = [r["hd95"] for r in rs if not math.isnan(r["hd95"])]
            cands[key] = {"dice": float(np.mean(dice)) if dice else math.nan,
                          "hd95": float(np.mean(hd)) if hd else math.nan}
        summary[strategy] = {"network_s_median": float(np.median(network_s[strategy])), "candidates": cands}
    return {"model": package.id, "weights_sha256": package.card.weights.sha256, "dataset": dataset.name,
            "splits": splits, "cases": [c.id for c in cases], "device": device, "strategies": summary}


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` picked: the inference strategy (with how it was chosen) and the clean-up."""

    strategy: str
    strategy_chosen_by: str
    postprocessing: PostProcessing


def choose(summary: dict) -> Choice:
    """The chosen (strategy, clean-up) for a :func:`measure` result (rule in the module docstring)."""
    strategies = [s for s in STRATEGIES if s in summary["strategies"]]
    pairs = [(s, spec) for s in strategies for spec in CANDIDATES]

    def score(pair: tuple[str, PostProcessing]) -> dict:
        return summary["strategies"][pair[0]]["candidates"][_name(pair[1])]

    best = max(score(p)["dice"] for p in pairs)
    tied = [p for p in pairs if score(p)["dice"] >= best - DICE_TIE]
    low = min(score(p)["hd95"] for p in tied)
    strategy, pick = next(p for p in tied if score(p)["hd95"] <= low + 1e-9)
    where = (f"python -m train choose-postprocessing on {len(summary['cases'])} {summary['dataset']} "
             f"{'+'.join(summary['splits'])} cases, {_dt.date.today().isoformat()} (SM on)")
    words = "; ".join(f"{k}: Dice {v['dice']:.3f}, HD95 {v['hd95']:.1f} mm"
                      for k, v in summary["strategies"][strategy]["candidates"].items())
    per_strategy = "; ".join(
        f"{s}: best Dice {max(v['dice'] for v in summary['strategies'][s]['candidates'].values()):.3f}, "
        f"network {summary['strategies'][s]['network_s_median']:.2f} s/case (median, {summary.get('device', 'cpu')})"
        for s in strategies)
    return Choice(strategy=strategy, strategy_chosen_by=f"{where} — {per_strategy}",
                  postprocessing=pick.model_copy(update={"chosen_by": f"{where}, with {strategy} inference — {words}"}))


def write_card(package_dir: str | os.PathLike[str], spec: PostProcessing, strategy: str | None = None,
               strategy_chosen_by: str | None = None) -> Path:
    """Set the ``postprocessing`` field (and, with ``strategy``, ``inference.strategy``) of a package
    folder's model.json, atomically, as a text edit: every other byte of the card stays as it was
    (other fields may be edited by other tools)."""
    wanted = {"postprocessing": spec.model_dump(mode="json")}
    if strategy is not None:
        path = Path(package_dir) / MODEL_JSON
        current = read_card_bytes(path.read_bytes(), str(path)).inference if path.is_file() else None
        if current is not None:
            wanted["inference"] = InferenceSpec.model_validate(
                {**current.model_dump(mode="json"), "strategy": strategy, "chosen_by": strategy_chosen_by}
            ).model_dump(mode="json")
    return set_card_fields(package_dir, wanted)
