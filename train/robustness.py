"""Robustness benchmark: a model package on real labelled cases, unperturbed and under the perturbations
real scans from other hospitals bring (:mod:`train.perturbations`).

``python -m train robustness MODEL DATASET --split test --cases 3 --out DIR`` segments each case and
each perturbed copy through the core library's :class:`~SRCSMSegmenterLib.inference.Segmenter` (what
``srcsm segment`` and the Slicer module run, with the card's default clean-up unless told otherwise)
and scores it with :func:`train.metrics.evaluate_case` in the perturbed image's own grid, against the
reference carried through the same perturbation (nearest neighbour) — so a slab is scored inside the
slab. Next to each perturbed Dice it records

* ``dice_unperturbed`` — the unperturbed prediction carried onto the perturbed grid and scored the
  same way: what the model achieves on *the same view* without the perturbation;
* ``agreement`` — Dice between the perturbed and the carried unperturbed prediction (1 = the
  perturbation changed nothing; a raw-HU CT must give its clipped twin's result);
* ``empty_in_view`` — the label is in the reference's view but the prediction has none of it;
* ``ref_ml`` and ``organ_ml`` — how much of the label the view holds and the whole label in the
  unperturbed case (mL), so that the report can say whether an empty label was a sliver at the view's
  edge or the whole organ (the bar counts both).

It writes ``DIR/robustness.json`` (meta + rows) and ``DIR/rows.csv``. Each finished case is kept in
``DIR/partial/`` until the run completes, keyed on what decides its rows (the card's measured fields,
clean-up, padding, perturbations, seed, source matching, device and precision): a run that stopped — the
cardiac model's sliding window takes ≈ 5 min per case and its 14 perturbations on a 2-core CPU — resumes
at the first unfinished case when it is run again with the same settings.

``python -m train robustness --report DIR [DIR …] --markdown docs/robustness.md --figures docs/figures``
turns any number of such folders into one Markdown report with one figure per model
(``robustness_<model>.png``), an overview
against the bar a released model must clear (:func:`bar_failures`) and, with ``--previous DIR …``, an
earlier version's run on the same cases beside each result; the report depends only on the JSON
files, so regenerating it from the same results gives the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.field_of_view import MAX_DICE_LOSS, DomainSlabs, FieldOfViewLimits, SlabMeasurement
from SRCSMSegmenterLib.image import Volume, atomic_output, read_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.plausibility import voxel_ml
from SRCSMSegmenterLib.postprocess import resolve as resolve_postprocessing

from .card_edit import MEASURED_CARD_FIELDS
from .datasets import load_dataset
from .evaluate import card_padding, check_label_values, padded_as_card
from .metrics import evaluate_case, read_label_map
from .perturbations import PERTURBATIONS, follow_labels, perturbations_for
from .report import _new_figure, _save, write_csv

UNPERTURBED = "none"
RESULT_FILE = "robustness.json"


def case_seed(case_id: str, seed: int) -> int:
    """A per-case seed that does not depend on Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:4], "little")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()}"


def _agreement(a: np.ndarray, b: np.ndarray, value: int) -> float:
    ma, mb = a == value, b == value
    n = int(ma.sum()) + int(mb.sum())
    return math.nan if n == 0 else 2.0 * int((ma & mb).sum()) / n


def _rows_for(prediction: Volume, reference: Volume, baseline: Volume, names: dict[int, str],
              organ_ml: dict[int, float] | None = None) -> list[dict]:
    """Scores of one (perturbed) prediction: evaluate_case rows plus the same-view baseline, the
    agreement with it and how much of each label is in view (``organ_ml``: the whole label in the
    unperturbed case; None for the unperturbed case itself, whose view holds all of it)."""
    rows = evaluate_case(prediction, reference, names)
    base = {r["label"]: r for r in evaluate_case(baseline, reference, names)}
    ml = voxel_ml(reference)
    for r in rows:
        r["ref_ml"] = r["ref_voxels"] * ml
        r["organ_ml"] = r["ref_ml"] if organ_ml is None else organ_ml[int(r["label"])]
        r["dice_unperturbed"] = base[r["label"]]["dice"]
        r["hd95_unperturbed"] = base[r["label"]]["hd95"]
        r["agreement"] = _agreement(prediction.array, baseline.array, r["label"])
        r["empty_in_view"] = bool(r["ref_voxels"] > 0 and r["pred_voxels"] == 0)
    return rows


PARTIAL_DIR = "partial"


def _settings_key(package, **settings) -> str:
    """sha256 over what decides a case's rows: the card's measured fields and the run's settings."""
    card = package.card.model_dump(mode="json")
    blob = json.dumps({"card": {k: card.get(k) for k in MEASURED_CARD_FIELDS}, **settings}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Partial:
    """The finished cases of a run not yet complete (``DIR/partial/<case>.json``), each with the key of the
    settings it was measured under; a case measured under other settings is measured again."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def _file(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.json"

    def rows(self, case_id: str) -> list[dict] | None:
        try:
            saved = json.loads(self._file(case_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved["rows"] if saved.get("key") == self.key and saved.get("case") == case_id else None

    def keep(self, case_id: str, rows: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(self._file(case_id)) as tmp:
            Path(tmp).write_text(json.dumps({"key": self.key, "case": case_id, "rows": rows},
                                            default=_json_default) + "\n", encoding="utf-8")

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_robustness(model: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   split: str = "test", cases: int | None = 3, case_ids: Sequence[str] | None = None,
                   perturbations: Sequence[str] | None = None, device: str = "cpu", postprocess: str = "card",
                   source_matching: bool = True, target_modality: str = "auto", seed: int = 0,
                   command: str | None = None, log=print, padding_mode: str = "card") -> dict:
    """Run the benchmark of one model on one dataset (module docstring) and write ``out_dir``."""
    package = Catalog().resolve(str(model))
    dataset = load_dataset(dataset_dir)
    names = check_label_values(package, dataset)
    chosen = dataset.split(split)
    if case_ids:
        by_id = {c.id: c for c in dataset.split("all")}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise ValueError(f"cases {missing} are not in {dataset.name}")
        chosen = [by_id[c] for c in case_ids]
    chosen = chosen[: cases or None]
    if not chosen:
        raise ValueError(f"split '{split}' of {dataset.name} has no cases; choose another --split")
    perts = perturbations_for(dataset.modality, list(perturbations) if perturbations else None)
    post = resolve_postprocessing(package.card.postprocessing, postprocess)
    segmenter = Segmenter(package, device=device, padding_mode=padding_mode)  # type: ignore[arg-type]
    rows: list[dict] = []
    t_start = time.perf_counter()

    def segment(image: Volume) -> Volume:
        return segmenter.segment(image, source_matching=source_matching, target_modality=target_modality,  # type: ignore[arg-type]
                                 postprocessing=post).labelmap

    out = Path(out_dir)
    partial = _Partial(out / PARTIAL_DIR, _settings_key(
        package, post=post.cli_value(), padding_mode=segmenter.padding_mode, perturbations=[p.name for p in perts],
        seed=seed, source_matching=source_matching, target_modality=target_modality,
        device=str(segmenter.device), precision=segmenter.precision, dataset=dataset.name))
    resumed: list[str] = []
    for case in chosen:
        kept = partial.rows(case.id)
        if kept is not None:
            rows.extend(kept)
            resumed.append(case.id)
            log(f"{case.id}: kept from an interrupted run with the same model and settings ({partial.folder})")
            continue
        case_rows: list[dict] = []
        image = read_volume(case.image)
        reference = read_label_map(case.label)
        t = time.perf_counter()
        pred0 = segment(image)
        unperturbed = _rows_for(pred0, reference, pred0, names)
        organ_ml = {int(r["label"]): r["organ_ml"] for r in unperturbed}
        for r in unperturbed:
            case_rows.append(dict(r, case=case.id, perturbation=UNPERTURBED, seconds=time.perf_counter() - t))
        for p in perts:
            t = time.perf_counter()
            img_p, ref_p = p.apply(image, reference, case_seed(case.id, seed))
            pred = segment(img_p)
            same_grid = img_p.geometry.almost_equal(image.geometry, 1e-6) and img_p.shape == image.shape
            baseline = pred0 if same_grid else follow_labels(pred0, img_p.geometry, img_p.shape)
            for r in _rows_for(pred, ref_p, baseline, names, organ_ml):
                case_rows.append(dict(r, case=case.id, perturbation=p.name, seconds=time.perf_counter() - t))
            del img_p, ref_p, pred, baseline
        partial.keep(case.id, case_rows)
        rows.extend(case_rows)
        mean = np.nanmean([r["dice"] for r in rows if r["case"] == case.id and r["perturbation"] == UNPERTURBED])
        log(f"{case.id}: unperturbed mean Dice {mean:.3f}; " + ", ".join(
            f"{p.name} {np.nanmean([r['dice'] for r in rows if r['case'] == case.id and r['perturbation'] == p.name]):.2f}"
            for p in perts))
    meta = {
        "model": package.id, "model_version": package.card.version, "model_name": package.card.name,
        "source_modality": package.card.source.modality, "source_dataset": _training_dataset(package.card),
        "weights_sha256": package.card.weights.sha256,
        "model_path": str(model), "dataset": dataset.name, "target_modality": dataset.modality, "split": split,
        "cases": [c.id for c in chosen], "perturbations": [p.name for p in perts],
        "descriptions": {p.name: p.description for p in perts}, "labels": {str(k): v for k, v in names.items()},
        "device": str(segmenter.device), "precision": segmenter.precision, "postprocessing": post.cli_value(),
        "source_matching": source_matching, "padding_mode": segmenter.padding_mode,
        "card_padding_mode": package.card.inference.padding_mode, "seed": seed, "date": _dt.date.today().isoformat(),
        "machine": _machine(), "seconds": round(time.perf_counter() - t_start, 1), "resumed_cases": resumed,
        "command": command or "python -m train robustness " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "rows.csv")
    result = {"meta": meta, "rows": rows}
    with atomic_output(out / RESULT_FILE) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    partial.discard()  # the complete result holds every case now
    log(f"{package.id} on {dataset.name}: {len(chosen)} cases × {len(perts) + 1} settings in {meta['seconds']} s; "
        f"results in {out}")
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# ------------------------------------------------------------------------------------ summary


def load_results(folders: Iterable[str | os.PathLike[str]]) -> list[dict]:
    """The ``robustness.json`` of each folder (or the file itself)."""
    out = []
    for f in folders:
        path = Path(f)
        path = path / RESULT_FILE if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"'{f}' holds no {RESULT_FILE}; run `python -m train robustness MODEL DATASET --out {f}` first")
        data = json.loads(path.read_text(encoding="utf-8"))
        for r in data["rows"]:
            for key in ("dice", "hd95", "dice_unperturbed", "hd95_unperturbed", "agreement"):
                r[key] = math.nan if r.get(key) is None else float(r[key])
        out.append(data)
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(result: dict) -> dict[str, dict]:
    """Per perturbation: mean Dice over cases and labels in view (``dice``), the same-view unperturbed
    Dice, the agreement, per-label means and, per label, empties where the label is in view."""
    by = defaultdict(list)
    for r in result["rows"]:
        by[r["perturbation"]].append(r)
    order = [UNPERTURBED] + list(result["meta"]["perturbations"])
    out = {}
    for p in order:
        rs = by.get(p, [])
        labels = {}
        for value, name in result["meta"]["labels"].items():
            lr = [r for r in rs if str(r["label"]) == value]
            in_view = [r for r in lr if r["ref_voxels"] > 0]
            labels[name] = {"dice": _nanmean([r["dice"] for r in lr]),
                            "dice_unperturbed": _nanmean([r["dice_unperturbed"] for r in lr]),
                            "in_view": len(in_view), "empty": sum(1 for r in in_view if r["empty_in_view"])}
        out[p] = {
            "dice": _nanmean([v["dice"] for v in labels.values()]),
            "dice_unperturbed": _nanmean([v["dice_unperturbed"] for v in labels.values()]),
            "agreement": _nanmean([r["agreement"] for r in rs if r["ref_voxels"] > 0]),
            "empty": sum(v["empty"] for v in labels.values()), "in_view": sum(v["in_view"] for v in labels.values()),
            "labels": labels,
        }
    return out


def empty_details(result: dict) -> list[str]:
    """One line per label left empty where it is in view: the perturbation, the case, the label and how
    much of it the view held (mL and share of the whole label; voxels for results from before
    ``ref_ml`` was recorded). A reader tells a sliver at a slab's edge from a missed organ; the bar
    counts both."""
    names = result["meta"]["labels"]
    out = []
    for r in result["rows"]:
        if not r.get("empty_in_view"):
            continue
        name = names.get(str(r["label"]), str(r["label"]))
        if r.get("ref_ml") is not None and r.get("organ_ml"):
            share = r["ref_ml"] / r["organ_ml"]
            held = f"{r['ref_ml']:.1f} mL in view, {share:.0%} of its {r['organ_ml']:.0f} mL"
        else:
            held = f"{r['ref_voxels']} voxels in view"
        out.append(f"`{r['perturbation']}` {r['case']} {name} ({held})")
    return out


# --------------------------------------------------------------------------------- the bar

#: The bar a released model must clear (issue 15): every perturbation but these costs at most
#: :data:`MAX_LOSS` Dice against the same view unperturbed. A 40 mm slab and half the in-plane view
#: remove most of the context the network reads, so there only the "never empty" rule holds.
EXEMPT_FROM_LOSS = ("slab_40mm", "crop_half")
MAX_LOSS = MAX_DICE_LOSS


def held_deltas(summary: dict[str, dict]) -> dict[str, float]:
    """Dice change against the same view of every perturbation the loss rule holds (NaN: nothing in view)."""
    return {p: v["dice"] - v["dice_unperturbed"] for p, v in summary.items()
            if p != UNPERTURBED and p not in EXEMPT_FROM_LOSS}


def bar_failures(summary: dict[str, dict]) -> list[str]:
    """What keeps a model from the bar on one dataset, from :func:`summarize`'s output: perturbations
    (outside :data:`EXEMPT_FROM_LOSS`) that lose more than :data:`MAX_LOSS`, and any setting — the
    unperturbed one and the exempt ones included — that leaves a label empty where it is in view.
    An empty list: the bar is met."""
    deltas = held_deltas(summary)
    failures = []
    for p, v in summary.items():
        why = []
        delta = deltas.get(p, math.nan)
        if not math.isnan(delta) and -delta > MAX_LOSS + 1e-9:
            why.append(f"{delta:+.2f}")
        if v["empty"]:
            why.append(f"{v['empty']} empty")
        if why:
            failures.append(f"`{p}` " + ", ".join(why))
    return failures


# ------------------------------------------------------------------------ the card's slabs

_SLAB = re.compile(r"^slab_(\d+(?:\.\d+)?)mm$")


def slab_thickness_mm(perturbation: str) -> float | None:
    """The thickness of a slab perturbation (``slab_60mm`` → 60.0); None for any other perturbation."""
    m = _SLAB.match(perturbation)
    return float(m.group(1)) if m else None


def domain_slabs(result: dict) -> DomainSlabs | None:
    """The slab measurements of one run (None: it ran no slab)."""
    slabs = []
    for p, v in summarize(result).items():
        thickness = slab_thickness_mm(p)
        if thickness is None or v["in_view"] == 0:  # no slab, or nothing of it measured
            continue
        delta = v["dice"] - v["dice_unperturbed"]
        slabs.append(SlabMeasurement(thickness_mm=thickness, delta_dice=None if math.isnan(delta) else round(delta, 3),
                                     empty=v["empty"], in_view=v["in_view"]))
    if not slabs:
        return None
    meta = result["meta"]
    return DomainSlabs(dataset=meta["dataset"], modality=meta["target_modality"], cases=len(meta["cases"]),
                       slabs=tuple(sorted(slabs, key=lambda s: s.thickness_mm)))


def _padding_note(meta: dict) -> str:
    """The run's padding in a report line: nothing for the usual constant padding of a constant card."""
    mode = meta.get("padding_mode", "constant")
    if not padded_as_card(meta):
        return f", **{mode} padding** (not what a user gets: the card pads {card_padding(meta)})"
    return "" if mode == "constant" else f", the card's {mode} padding"


def field_of_view_limits(results: Sequence[dict], weights_sha256: str | None = None) -> FieldOfViewLimits | None:
    """A card's ``field_of_view`` from robustness runs of one model (one per dataset); None when none of
    them ran a slab perturbation.

    ``weights_sha256``: the package the card belongs to; runs of other weights are refused, so a card
    never carries another model's measurements."""
    if not results:
        raise ValueError("no robustness results to take the field of view from")
    domains, said = [], []
    for result in results:
        meta = result["meta"]
        if not padded_as_card(meta):
            raise ValueError(f"the robustness run of {meta['model']} on {meta['dataset']} padded with "
                             f"{meta['padding_mode']!r}, not as its card does ({card_padding(meta)!r}); a card's "
                             f"field of view must be what a user gets: rerun it without --padding-mode")
        if weights_sha256 is not None and meta.get("weights_sha256") != weights_sha256:
            raise ValueError(
                f"the robustness run of {meta['model']} {meta.get('model_version')} on {meta['dataset']} measured other "
                f"weights (sha256 {str(meta.get('weights_sha256'))[:12]}…) than this package's ({weights_sha256[:12]}…); "
                f"rerun `python -m train robustness PACKAGE {meta['dataset']} --out DIR` on this package")
        d = domain_slabs(result)
        if d is None:
            continue
        if any(x.dataset == d.dataset for x in domains):
            raise ValueError(f"two robustness runs on {d.dataset}: give one per dataset")
        domains.append(d)
        said.append(f"{meta['dataset']} {meta['split']} ({', '.join(meta['cases'])})")
    if not domains:
        return None
    first = results[0]["meta"]
    measured_by = (f"python -m train robustness on {'; '.join(said)}, {first['date']}, clean-up "
                   f"`{first['postprocessing']}`, source matching {'on' if first['source_matching'] else 'off'}: "
                   f"mean Dice on each slab against the same view of the whole scan")
    return FieldOfViewLimits(max_dice_loss=MAX_LOSS, domains=tuple(domains), measured_by=measured_by)


def write_field_of_view(package_dir: str | os.PathLike[str], folders: Sequence[str | os.PathLike[str]]) -> Path:
    """Write the ``field_of_view`` of the robustness runs in ``folders`` into a package folder's card
    (only that field changes; :func:`train.card_edit.set_card_fields`)."""
    from SRCSMSegmenterLib.modelpackage import load_package

    from .card_edit import set_card_fields

    package = load_package(package_dir)
    limits = field_of_view_limits(load_results(folders), package.card.weights.sha256)
    if limits is None:
        raise ValueError(f"none of the robustness runs in {', '.join(map(str, folders))} measured a slab "
                         f"(slab_40mm …); rerun them with the slab perturbations")
    return set_card_fields(package_dir, {"field_of_view": limits.model_dump(mode="json")})


def _result_key(result: dict) -> tuple:
    meta = result["meta"]
    return meta["model"], meta["dataset"], meta["split"], tuple(meta["cases"])


def match_previous(results: Sequence[dict], previous: Sequence[dict]) -> dict[int, dict]:
    """For each result (by index), the earlier run of the same model on the same cases under another
    version or weights — what the report sets beside it. Raises when two earlier runs would match."""
    out: dict[int, dict] = {}
    for i, r in enumerate(results):
        found = [p for p in previous if _result_key(p) == _result_key(r)
                 and p["meta"].get("weights_sha256") != r["meta"].get("weights_sha256")]
        if len(found) > 1:
            versions = ", ".join(p["meta"]["model_version"] for p in found)
            raise ValueError(f"{len(found)} earlier runs of {r['meta']['model']} on {r['meta']['dataset']} "
                             f"({versions}); pass one folder per model and dataset to --previous")
        if found:
            out[i] = found[0]
    return out


# ------------------------------------------------------------------------------------- report


def _f(value: float, digits: int = 2) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _delta(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b):
        return "–"
    d = a - b
    text = f"{d:+.2f}"
    return f"**{text}**" if d <= -0.10 else text


def _training_dataset(card) -> str | None:
    """Folder name of the dataset the model was trained on (from the card's recorded config), or None."""
    dataset = (card.provenance.config or {}).get("dataset")
    return Path(str(dataset)).name if dataset else None


def _domain(result: dict) -> str:
    """In-domain when the test data are the training dataset's (bSSFP → LGE is MR → MR, yet another
    domain); without a recorded training dataset, when the modalities agree."""
    meta = result["meta"]
    source = meta.get("source_dataset")
    own = meta["dataset"] == source if source else meta["target_modality"] == meta["source_modality"]
    return ("in-domain" if own else "cross-domain") + f" {meta['dataset']} ({meta['split']})"


def figure(model_results: list[dict], path: str | os.PathLike[str]) -> Path:
    """Mean Dice per perturbation (filled) next to the same view unperturbed (open), one panel per
    dataset."""
    n = len(model_results)
    fig = _new_figure(5.2 * n, 5.0)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    for ax, result in zip(axes, model_results):
        s = summarize(result)
        names = list(s)[::-1]
        y = np.arange(len(names))
        ax.scatter([s[p]["dice_unperturbed"] for p in names], y, facecolors="none", edgecolors="0.4",
                   label="unperturbed, same view", zorder=3)
        ax.scatter([s[p]["dice"] for p in names], y, color="tab:red", label="perturbed", zorder=4, s=18)
        for yi, p in zip(y, names):
            a, b = s[p]["dice"], s[p]["dice_unperturbed"]
            if not (math.isnan(a) or math.isnan(b)):
                ax.plot([a, b], [yi, yi], color="0.7", lw=1, zorder=2)
            if s[p]["empty"]:
                ax.annotate(f"{s[p]['empty']} empty", (0.01, yi), fontsize=7, va="center", color="tab:red")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("mean Dice (labels in view)")
        ax.set_title(_domain(result), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower left", bbox_to_anchor=(0, 1.06), fontsize=8, ncol=2, frameon=False)
    meta = model_results[0]["meta"]
    fig.suptitle(f"{meta['model']} {meta['model_version']}", fontsize=10, y=1.04)
    return _save(fig, path)


def markdown(results: list[dict], figure_paths: dict[str, Path], markdown_path: Path,
             previous: Sequence[dict] = ()) -> str:
    """The report text (deterministic given ``results`` and ``previous``, earlier versions' runs set
    beside the matching results)."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_model[r["meta"]["model"]].append(r)
    lines = [
        "# Robustness of the models to what real scans bring",
        "",
        "Generated by `python -m train robustness --report` from the results below (do not edit by hand).",
        "Each model is run on a few cases of its own domain and of the other domain, unperturbed and under",
        "perturbations of field of view, sampling, orientation and intensity scale (`train/perturbations.py`):",
        "geometry is changed physically (the anatomy keeps its world position; the reference follows with",
        "nearest neighbour) and every result is scored in the perturbed image's own grid, only where the",
        "reference is (a slab inside the slab). **Dice** is the mean over the labels in view; **same view** the",
        "unperturbed prediction carried onto the perturbed grid and scored the same way, so **Δ** is what the",
        "perturbation costs (bold: a loss of 0.10 or more); **agree** is the Dice between the two predictions",
        "(1.00: the perturbation changed nothing); **empty** counts labels in view that the model left empty",
        "(cases × labels). Segmentation as `srcsm segment` runs it: source matching on, target modality",
        "auto, the model card's inference strategy, padding and clean-up.",
        "",
        f"**The bar** (issue 15): no perturbation costs more than {MAX_LOSS:.2f} Dice against the same view, except",
        " and ".join(f"`{p}`" for p in EXEMPT_FROM_LOSS) + ", and no setting leaves a label empty where it is in view.",
        "",
        "The slab rows go into each model's card (`field_of_view`, written by `python -m train release` or "
        "`python -m train robustness --write-card PACKAGE --field-of-view DIR …`): `srcsm segment`, the Slicer "
        "module and the web page warn when an image or region of interest is thinner than the slab from which "
        "on the model held the bar (every slab from it on: at most the loss above, nothing empty).",
        "",
    ]
    prev_of = match_previous(results, previous)
    index = {id(r): i for i, r in enumerate(results)}
    lines += ["| model | data | Dice unperturbed | worst Δ (held to the bar) | empty in view | the bar |",
              "|---|---|---|---|---|---|"]
    for r in results:
        meta, s = r["meta"], summarize(r)
        worst = min((d for d in held_deltas(s).values() if not math.isnan(d)), default=math.nan)
        failures = bar_failures(s)
        dice = _f(s[UNPERTURBED]["dice"])
        prev = prev_of.get(index[id(r)])
        if prev is not None:
            dice += f" ({prev['meta']['model_version']}: {_f(summarize(prev)[UNPERTURBED]['dice'])})"
        lines.append(f"| {meta['model']} {meta['model_version']} | {_domain(r)} | {dice} | {'–' if math.isnan(worst) else f'{worst:+.2f}'} | "
                     f"{sum(v['empty'] for v in s.values())} | {'met' if not failures else 'not met: ' + '; '.join(failures)} |")
    lines.append("")
    for model, rs in by_model.items():
        meta0 = rs[0]["meta"]
        lines += [f"## {model} {meta0['model_version']} ({meta0['source_modality']})", ""]
        fig_path = figure_paths.get(model)
        if fig_path is not None:
            rel = os.path.relpath(fig_path, markdown_path.parent).replace(os.sep, "/")
            lines += [f"![{model} under perturbations]({rel})", ""]
        for result in rs:
            meta = result["meta"]
            s = summarize(result)
            prev = prev_of.get(index[id(result)])
            ps = summarize(prev) if prev is not None else {}
            lines += [f"### {_domain(result)}: {len(meta['cases'])} cases ({', '.join(meta['cases'])})", "",
                      f"Run `{meta['command']}` on {meta['date']}, {meta['machine']}, device {meta['device']} "
                      f"({meta['precision']}), clean-up `{meta['postprocessing']}`"
                      + _padding_note(meta)
                      + f", {meta['seconds']:.0f} s.", ""]
            if prev is not None:
                pm = prev["meta"]
                lines += [f"**{pm['model_version']}** is the earlier version's run on the same cases ({pm['date']}, "
                          f"clean-up `{pm['postprocessing']}`): its Dice and Δ under the same perturbation.", ""]
            label_names = list(meta["labels"].values())
            prev_head = f" {prev['meta']['model_version']} | Δ {prev['meta']['model_version']} |" if prev is not None else ""
            lines.append("| perturbation | Dice | same view | Δ | agree | empty |" + prev_head + " "
                         + " | ".join(label_names) + " |")
            lines.append("|---|---|---|---|---|---|" + ("---|---|" if prev is not None else "") + "---|" * len(label_names))
            for p, v in s.items():
                per_label = []
                for name in label_names:
                    lv = v["labels"][name]
                    cell = _f(lv["dice"])
                    if lv["empty"]:
                        cell += f" (∅ {lv['empty']}/{lv['in_view']})"
                    if lv["in_view"] == 0:
                        cell = "not in view"
                    per_label.append(cell)
                desc = meta["descriptions"].get(p, "unperturbed")
                prev_cells = ""
                if prev is not None:
                    pv = ps.get(p)
                    if pv is None:
                        prev_cells = "– | – | "
                    else:
                        empty = f" (∅ {pv['empty']}/{pv['in_view']})" if pv["empty"] else ""
                        prev_cells = f"{_f(pv['dice'])}{empty} | {_delta(pv['dice'], pv['dice_unperturbed'])} | "
                lines.append(f"| `{p}` {desc} | {_f(v['dice'])} | {_f(v['dice_unperturbed'])} | "
                             f"{_delta(v['dice'], v['dice_unperturbed'])} | {_f(v['agreement'])} | "
                             f"{v['empty']}/{v['in_view']} | " + prev_cells + " | ".join(per_label) + " |")
            lines.append("")
            empties = empty_details(result)
            if empties:
                lines += ["Left empty where in view: " + "; ".join(empties) + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(folders: Sequence[str | os.PathLike[str]], markdown_path: str | os.PathLike[str],
                 figures_dir: str | os.PathLike[str], log=print,
                 previous: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """docs/robustness.md and docs/figures/robustness_<model>.png from result folders; ``previous``:
    result folders of earlier model versions, set beside the runs on the same cases."""
    results = load_results(folders)
    earlier = load_results(previous)
    markdown_path = Path(markdown_path)
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_model[r["meta"]["model"]].append(r)
    paths = {m: figure(rs, figures_dir / f"robustness_{m}.png") for m, rs in by_model.items()}
    text = markdown(results, paths, markdown_path, earlier)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(markdown_path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    log(f"wrote {markdown_path} and {len(paths)} figure(s) in {figures_dir}")
    return markdown_path


__all__ = ["PERTURBATIONS", "bar_failures", "empty_details", "figure", "load_results", "markdown", "match_previous",
           "run_robustness", "summarize", "write_report"]
