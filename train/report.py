"""Aggregate per-case metrics into CSV, Markdown and PNG reports (no pandas).

Rows
----
A *result row* is the dict :func:`train.metrics.evaluate_case` returns, tagged with the case and the
setting it belongs to (:func:`tag_rows`)::

    {"setting": "with SM", "case": "chaos_01", "label": 1, "name": "liver", "dice": 0.93, "assd": 1.4,
     "hd95": 4.9, "max_sd": 17.2, "ref_voxels": 201734, "pred_voxels": 198211}

A *setting* is one configuration being compared (e.g. ``"with SM"`` / ``"without SM"``, or
``"whole volume"`` / ``"landmark crop"``); leave it ``""`` when there is only one.

Aggregation (SRCSM §6)
----------------------
Per setting and label: ``nanmean`` over cases (NaN = label absent from the reference, or a distance of a
missed label), and the sample standard deviation (ddof = 1) over the same cases. ``n`` counts the finite
values of a metric; ``n_ref`` the cases whose reference contains the label; ``n_missed`` those where the
reference contains it but the prediction is empty (Dice 0, distances NaN and hence left out of the
distance means: always read them together with ``n_missed``).
"Mean over labels" = mean of the per-label means (background is never a label here); its ``sd`` is the
sample sd over cases of each case's mean over its labels.

Typical use::

    rows = []
    for case in cases:
        rows += tag_rows(evaluate_case(pred, ref, labels), case=case, setting="with SM")
    write_reports(rows, "eval/", case_loader=load, colors={1: (0.8, 0.2, 0.2), ...})

All files are written atomically. Figures use matplotlib's object API with the Agg canvas (no pyplot,
no global backend switch, safe in threads and headless).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from SRCSMSegmenterLib.image import Volume, atomic_output

from .metrics import METRIC_NAMES, ROW_KEYS, check_same_grid

__all__ = [
    "COLUMNS",
    "SUMMARY_COLUMNS",
    "boxplot_figure",
    "markdown_report",
    "median_case",
    "overlay_figure",
    "read_csv",
    "settings_of",
    "summarize",
    "tag_rows",
    "write_csv",
    "write_reports",
]

#: Columns of the per-case CSV, in order (extra keys of the rows follow, sorted).
COLUMNS: tuple[str, ...] = ("setting", "case", *ROW_KEYS)

_STATS = ("mean", "sd", "n")
#: Columns of the summary CSV.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "setting", "label", "name", "n_cases", "n_ref", "n_missed",
    *(f"{m}_{s}" for m in METRIC_NAMES for s in _STATS),
)

#: Row label of the "mean over labels" summary row.
MEAN_LABEL = "mean"

_TITLES = {"dice": "Dice", "assd": "ASSD (mm)", "hd95": "HD95 (mm)", "max_sd": "max SD (mm)"}
_DECIMALS = {"dice": 3, "assd": 2, "hd95": 2, "max_sd": 2}

RGB = tuple[float, float, float]


# --------------------------------------------------------------------------------------------- rows


def tag_rows(rows: Iterable[Mapping], *, case: str, setting: str = "") -> list[dict]:
    """Copies of ``rows`` (from ``evaluate_case``) with ``setting`` and ``case`` first."""
    return [{"setting": str(setting), "case": str(case), **dict(row)} for row in rows]


def settings_of(rows: Iterable[Mapping]) -> list[str]:
    """The settings of ``rows`` in order of first appearance."""
    return list(dict.fromkeys(str(r.get("setting", "")) for r in rows))


def _labels_of(rows: Iterable[Mapping]) -> list[tuple[int, str]]:
    """(label, name) pairs sorted by label value."""
    names: dict[int, str] = {}
    for r in rows:
        names.setdefault(int(r["label"]), str(r.get("name", r["label"])))
    return sorted(names.items())


def _f(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _nansd(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan


def _nfinite(values: Sequence[float]) -> int:
    return int(np.count_nonzero(np.isfinite(np.asarray(values, dtype=float))))


def _case_means(rows: Sequence[Mapping], metric: str) -> dict[str, float]:
    """Per case: the mean of ``metric`` over its labels (NaN ignored)."""
    per_case: dict[str, list[float]] = {}
    for r in rows:
        per_case.setdefault(str(r["case"]), []).append(_f(r[metric]))
    return {case: _nanmean(v) for case, v in per_case.items()}


# ---------------------------------------------------------------------------------------------- CSV


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else format(float(value), ".6g")
    return str(value)


def _write_table(rows: Sequence[Mapping], columns: Sequence[str], path: Path) -> Path:
    extra = sorted({k for r in rows for k in r} - set(columns))
    header = [*columns, *extra]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([_cell(r.get(k)) for k in header])
    with atomic_output(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike[str]) -> Path:
    """Write result rows as CSV (columns :data:`COLUMNS`, then extra keys), atomically; NaN → ``nan``."""
    return _write_table(rows, COLUMNS, Path(path))


_INT_COLUMNS = {"ref_voxels", "pred_voxels", "n_cases", "n_ref", "n_missed"}
_INT_COLUMNS |= {f"{m}_n" for m in METRIC_NAMES}
_FLOAT_COLUMNS = set(METRIC_NAMES) | {f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "sd")}


def read_csv(path: str | os.PathLike[str]) -> list[dict]:
    """Read a CSV written by :func:`write_csv` (or the summary) back into rows with numeric types."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for r in rows:
        for key, value in r.items():
            if key in _FLOAT_COLUMNS:
                r[key] = _f(value)
            elif key in _INT_COLUMNS:
                r[key] = int(value) if value not in ("", None) else 0
            elif key == "label" and value.lstrip("-").isdigit():
                r[key] = int(value)
    return rows


# ------------------------------------------------------------------------------------------ summary


def _counts(rows: Sequence[Mapping]) -> dict[str, int]:
    """n_ref: rows whose reference holds the label; n_missed: of those, rows with an empty prediction."""
    present = [r for r in rows if int(r.get("ref_voxels", 0)) > 0]
    return {"n_ref": len(present), "n_missed": sum(1 for r in present if int(r.get("pred_voxels", 0)) == 0)}


def summarize(rows: Sequence[Mapping], settings: Sequence[str] | None = None) -> list[dict]:
    """Per setting: one row per label and a final "mean over labels" row (columns :data:`SUMMARY_COLUMNS`)."""
    out = []
    for setting in settings if settings is not None else settings_of(rows):
        srows = [r for r in rows if str(r.get("setting", "")) == setting]
        cases = sorted({str(r["case"]) for r in srows})
        label_means: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
        for label, name in _labels_of(srows):
            lrows = [r for r in srows if int(r["label"]) == label]
            s = {"setting": setting, "label": label, "name": name,
                 "n_cases": len({str(r["case"]) for r in lrows}), **_counts(lrows)}
            for m in METRIC_NAMES:
                values = [_f(r[m]) for r in lrows]
                s[f"{m}_mean"], s[f"{m}_sd"], s[f"{m}_n"] = _nanmean(values), _nansd(values), _nfinite(values)
                label_means[m].append(s[f"{m}_mean"])
            out.append(s)
        mean = {"setting": setting, "label": MEAN_LABEL, "name": "mean over labels", "n_cases": len(cases),
                **_counts(srows)}
        for m in METRIC_NAMES:
            per_case = list(_case_means(srows, m).values())
            mean[f"{m}_mean"] = _nanmean(label_means[m])
            mean[f"{m}_sd"], mean[f"{m}_n"] = _nansd(per_case), _nfinite(per_case)
        out.append(mean)
    return out


def _pm(s: Mapping, metric: str) -> str:
    mean, sd, d = s[f"{metric}_mean"], s[f"{metric}_sd"], _DECIMALS[metric]
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{d}f} ± {sd:.{d}f}" if math.isfinite(sd) else f"{mean:.{d}f}"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def markdown_report(
    rows: Sequence[Mapping],
    title: str = "Segmentation metrics",
    settings: Sequence[str] | None = None,
    notes: str = "",
) -> str:
    """A Markdown report: one table per setting (mean ± sd per label and over labels), a comparison table
    of Dice and ASSD when there are several settings, the definitions used, then ``notes`` (say there
    e.g. which ``convention`` / ``hd95_mode`` of ``evaluate_case`` produced the rows, if not the default)."""
    settings = list(settings) if settings is not None else settings_of(rows)
    summary = summarize(rows, settings)
    lines = [f"# {title}", ""]
    for setting in settings:
        srows = [s for s in summary if s["setting"] == setting]
        n = srows[-1]["n_cases"] if srows else 0
        lines += [f"## {_md(setting) or 'Results'} ({n} case{'s' if n != 1 else ''})", ""]
        header = " | ".join(_TITLES[m] for m in METRIC_NAMES)
        lines += [f"| label | {header} | n (in reference) | missed |",
                  "|---|" + "---:|" * (len(METRIC_NAMES) + 2)]
        for s in srows:
            label = "**mean over labels**" if s["label"] == MEAN_LABEL else f"{s['label']} {_md(s['name'])}"
            lines.append(f"| {label} | " + " | ".join(_pm(s, m) for m in METRIC_NAMES)
                         + f" | {s['n_ref']} | {s['n_missed']} |")
        lines.append("")
    if len(settings) > 1:
        header = " | ".join(f"{_TITLES[m]} {_md(st) or '—'}" for m in ("dice", "assd") for st in settings)
        lines += ["## Comparison", "", f"| label | {header} |", "|---|" + "---:|" * (2 * len(settings))]
        by_key = {(s["setting"], s["label"]): s for s in summary}
        for label, name in [*_labels_of(rows), (MEAN_LABEL, "mean over labels")]:
            cells = []
            for m in ("dice", "assd"):
                for st in settings:
                    s = by_key.get((st, label))
                    cells.append(_pm(s, m) if s else "–")
            shown = "**mean over labels**" if label == MEAN_LABEL else f"{label} {_md(name)}"
            lines.append(f"| {shown} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Definitions: Dice = 2TP/(2TP+FP+FN), NaN where the label is absent from the reference. Surface "
        "distances in mm in the reference image's grid, from contour voxels of both surfaces pooled: ASSD = "
        "mean, HD95 = 95th percentile, max SD = maximum (Hausdorff). A missed label (in the reference, "
        "empty prediction) has Dice 0 and no distances. Mean ± sample sd over cases (NaN ignored); mean "
        "over labels = mean of the label means, its sd = sd over cases of each case's mean over labels; "
        "background excluded. n (in reference): cases whose reference holds the label (label-case pairs in "
        "the mean row); missed: of those, cases with an empty prediction.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def median_case(rows: Sequence[Mapping], setting: str | None = None, metric: str = "dice") -> str | None:
    """The case whose mean ``metric`` over labels is the median of its setting (lower middle for an even
    count; ties broken by case name). ``None`` when no case has a finite value."""
    srows = [r for r in rows if setting is None or str(r.get("setting", "")) == setting]
    means = [(v, case) for case, v in _case_means(srows, metric).items() if math.isfinite(v)]
    if not means:
        return None
    means.sort()
    return means[(len(means) - 1) // 2][1]


# ------------------------------------------------------------------------------------------ figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path


def _palette(n: int) -> list[RGB]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [tuple(cmap(i % 10)[:3]) for i in range(n)]


def boxplot_figure(
    rows: Sequence[Mapping],
    path: str | os.PathLike[str],
    metric: str = "dice",
    settings: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Box plots of ``metric`` per label (and of each case's mean over labels), one box per setting side
    by side within each label group, the cases as dots. NaN values are left out."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {METRIC_NAMES}, got {metric!r}")
    settings = list(settings) if settings is not None else settings_of(rows)
    groups = [*_labels_of(rows), (MEAN_LABEL, "mean over labels")]
    colors = _palette(len(settings))
    width = 0.8 / max(len(settings), 1)
    fig = _new_figure(max(4.0, 1.1 * len(groups) * max(1, len(settings)) ** 0.5 + 1.5), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    for si, setting in enumerate(settings):
        srows = [r for r in rows if str(r.get("setting", "")) == setting]
        for gi, (label, _name) in enumerate(groups):
            if label == MEAN_LABEL:
                values = np.asarray(list(_case_means(srows, metric).values()), dtype=float)
            else:
                values = np.asarray([_f(r[metric]) for r in srows if int(r["label"]) == label], dtype=float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            x = gi + (si - (len(settings) - 1) / 2) * width
            box = ax.boxplot(values, positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False,
                             medianprops={"color": "black"})
            for patch in box["boxes"]:
                patch.set_facecolor((*colors[si], 0.45))
                patch.set_edgecolor(colors[si])
            jitter = rng.uniform(-width * 0.25, width * 0.25, size=values.size)
            ax.scatter(x + jitter, values, s=9, color=colors[si], edgecolors="none", zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([name for _label, name in groups], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(_TITLES[metric])
    if metric == "dice":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    if len(settings) > 1 or (settings and settings[0]):
        from matplotlib.patches import Patch

        patches = [Patch(facecolor=(*c, 0.45), edgecolor=c, label=s or "—")
                   for s, c in zip(settings, colors)]
        ax.legend(handles=patches, loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _orient_lps(volume: Volume) -> Volume:
    """The volume resampled losslessly (axis permutation/flip) to the closest LPS-aligned orientation."""
    import SimpleITK as sitk

    if volume.array.dtype == bool:
        volume = volume.with_array(volume.array.astype(np.uint8))
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"))


def overlay_figure(
    image: Volume,
    reference: Volume,
    prediction: Volume,
    colors: Mapping[int, RGB] | None,
    path: str | os.PathLike[str],
    names: Mapping[int, str] | None = None,
    title: str | None = None,
) -> Path:
    """Three orthogonal slices (axial, coronal, sagittal) through the centroid of the reference's
    foreground: the image in grey, per label the reference contour solid and the prediction contour
    dashed, in the label's colour (``colors``: value → RGB in 0..1; labels missing there get a default
    colour; ``None`` draws every label present). All three volumes must share one grid. The volumes are
    reoriented to the nearest LPS axes first, so slices show radiological convention (patient right on
    the left, anterior / superior up) with true physical aspect ratio."""
    check_same_grid(image, reference, ("image", "reference"))
    check_same_grid(prediction, reference)
    img = _orient_lps(image).array.astype(np.float32)
    oriented_ref = _orient_lps(reference)
    ref, spacing = oriented_ref.array, oriented_ref.geometry.spacing
    pred = _orient_lps(prediction).array

    present = sorted({int(v) for v in np.unique(ref) if v > 0} | {int(v) for v in np.unique(pred) if v > 0})
    labels = sorted(int(k) for k in colors) if colors else present
    fallback = dict(zip(labels, _palette(len(labels))))
    color_of = {v: tuple(colors[v]) if colors and v in colors else fallback[v] for v in labels}

    fg = np.argwhere(ref > 0)
    centre = np.round(fg.mean(axis=0)).astype(int) if len(fg) else np.array(ref.shape) // 2
    k, j, i = (int(c) for c in centre)
    sx, sy, sz = spacing
    sub = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 128), :: max(1, img.shape[2] // 128)]
    vmin, vmax = np.percentile(sub, [0.5, 99.5]) if sub.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1.0

    # (name, slicer, row spacing, column spacing); rows flipped where needed so superior is up.
    views = [
        ("axial", lambda a: a[k, :, :], sy, sx),
        ("coronal", lambda a: a[::-1, j, :], sz, sx),
        ("sagittal", lambda a: a[::-1, :, i], sz, sy),
    ]
    fig = _new_figure(12.0, 4.6)
    for n, (view, cut, row_sp, col_sp) in enumerate(views):
        ax = fig.add_subplot(1, 3, n + 1)
        ax.imshow(cut(img), cmap="gray", vmin=vmin, vmax=vmax, aspect=row_sp / col_sp,
                  interpolation="nearest")
        for label in labels:
            for volume, style in ((ref, "solid"), (pred, "dashed")):
                mask = (cut(volume) == label).astype(np.float32)
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=[color_of[label]], linewidths=1.2, linestyles=style)
        ax.set_title(view)
        ax.set_axis_off()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color_of[v], lw=2, label=(names or {}).get(v, str(v))) for v in labels]
    handles += [Line2D([], [], color="0.3", lw=1.2, ls="solid", label="reference"),
                Line2D([], [], color="0.3", lw=1.2, ls="dashed", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize="small",
               frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ reports


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "results"


CaseLoader = Callable[[str, str], "tuple[Volume, Volume, Volume]"]


def write_reports(
    rows: Sequence[Mapping],
    out_dir: str | os.PathLike[str],
    *,
    settings: Sequence[str] | None = None,
    title: str = "Segmentation metrics",
    case_loader: CaseLoader | None = None,
    colors: Mapping[int, RGB] | None = None,
    notes: str = "",
) -> dict[str, Path]:
    """Write every report for ``rows`` into ``out_dir`` and return ``{kind: path}``:

    - ``metrics``: ``metrics.csv``, one line per setting, case and label (:data:`COLUMNS`);
    - ``summary_csv``: ``summary.csv`` (:data:`SUMMARY_COLUMNS`); ``summary_md``: ``summary.md``;
    - ``box_dice``, ``box_assd``, ``box_hd95``: ``boxplot_<metric>.png`` (settings side by side);
    - ``overlay:<setting>``: ``overlay_<setting>.png`` for the median case (by mean Dice over labels) of
      each setting (``overlay`` / ``overlay.png`` when the setting is ``""``), only when
      ``case_loader(case, setting) -> (image, reference, prediction)`` is given.

    ``settings`` fixes the order (default: order of first appearance); ``notes`` ends the Markdown.
    """
    if not rows:
        raise ValueError("no result rows to report")
    missing = [k for k in ("case", *METRIC_NAMES, "label") if k not in rows[0]]
    if missing:
        raise ValueError(
            f"result rows lack {missing}; tag evaluate_case() rows with tag_rows(rows, case=...)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = list(settings) if settings is not None else settings_of(rows)
    rows = [{"setting": "", **r} for r in rows]
    written = {
        "metrics": write_csv(rows, out / "metrics.csv"),
        "summary_csv": _write_table(summarize(rows, settings), SUMMARY_COLUMNS, out / "summary.csv"),
    }
    with atomic_output(out / "summary.md") as tmp:
        tmp.write_text(markdown_report(rows, title, settings, notes), encoding="utf-8")
    written["summary_md"] = out / "summary.md"
    for metric in ("dice", "assd", "hd95"):
        written[f"box_{metric}"] = boxplot_figure(rows, out / f"boxplot_{metric}.png", metric, settings)
    if case_loader is not None:
        names = dict(_labels_of(rows))
        for setting in settings:
            case = median_case(rows, setting)
            if case is None:
                continue
            image, reference, prediction = case_loader(case, setting)
            name = f"overlay_{_slug(setting)}.png" if setting else "overlay.png"
            label = f"{setting}: " if setting else ""
            written[f"overlay:{setting}" if setting else "overlay"] = overlay_figure(
                image, reference, prediction, colors, out / name, names=names,
                title=f"{label}median case {case} (by mean Dice)",
            )
    return written
