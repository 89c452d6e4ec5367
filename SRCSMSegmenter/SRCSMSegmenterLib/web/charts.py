"""The source-matching charts of the preview, drawn as SVG for the page.

The numbers are not computed here: they are read back from the table nodes that
:func:`..matching_plot.update_matching_plots` fills — the very charts the Slicer module shows, built by
:func:`..matching_plot.plot_data` from the :class:`..matching.QuantileMapping` the segmentation uses.
This module only draws polylines (no plotting library: a few hundred points of SVG are enough, load
nothing and stay crisp at any size).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..matching_plot import CURVE_COLUMNS, HISTOGRAM_COLUMNS, SERIES_COLORS, MatchingPlotNodes


@dataclass(frozen=True)
class Series:
    name: str
    x: np.ndarray
    y: np.ndarray
    color: tuple[float, float, float]


def _column(table_node: Any, name: str) -> np.ndarray:
    from vtkmodules.util import numpy_support

    column = table_node.GetTable().GetColumnByName(name)
    if column is None:
        raise KeyError(f"Table '{table_node.GetName()}' has no column '{name}'.")
    return np.asarray(numpy_support.vtk_to_numpy(column), dtype=np.float64)


def matching_series(plots: MatchingPlotNodes) -> tuple[list[Series], list[Series]]:
    """(histogram series, mapping-curve series) read from the preview's table nodes."""
    h, c = plots.histogram_table, plots.curve_table
    col = {name: _column(h, name) for name in HISTOGRAM_COLUMNS}
    histograms = [
        Series("input (before)", col[HISTOGRAM_COLUMNS[0]], col[HISTOGRAM_COLUMNS[1]], SERIES_COLORS["before"]),
        Series("input (after matching)", col[HISTOGRAM_COLUMNS[2]], col[HISTOGRAM_COLUMNS[3]], SERIES_COLORS["after"]),
        Series("source profile", col[HISTOGRAM_COLUMNS[2]], col[HISTOGRAM_COLUMNS[4]], SERIES_COLORS["source"]),
    ]
    curve = [Series("mapping", _column(c, CURVE_COLUMNS[0]), _column(c, CURVE_COLUMNS[1]), SERIES_COLORS["curve"])]
    return histograms, curve


def _hex(color: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{int(round(255 * min(1.0, max(0.0, v)))):02x}" for v in color)


def _ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo
    if not span > 0:
        return [lo]
    step = 10 ** np.floor(np.log10(span / 4))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= 5:
            step *= m
            break
    first = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(first, hi + 1e-9 * span, step)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def chart_svg(series: list[Series], title: str, x_title: str, y_title: str,
              width: int = 340, height: int = 200) -> str:
    """A line chart of ``series`` with axes, ticks and a legend, as one ``<svg>`` element."""
    left, right, top, bottom = 44, 8, 22, 34
    xs = np.concatenate([s.x for s in series]) if series else np.zeros(1)
    ys = np.concatenate([s.y for s in series]) if series else np.zeros(1)
    x0, x1 = float(np.nanmin(xs)), float(np.nanmax(xs))
    y0, y1 = min(0.0, float(np.nanmin(ys))), float(np.nanmax(ys))
    if not x1 > x0:
        x1 = x0 + 1.0
    if not y1 > y0:
        y1 = y0 + 1.0
    pw, ph = width - left - right, height - top - bottom

    def px(x: np.ndarray) -> np.ndarray:
        return left + (np.asarray(x) - x0) / (x1 - x0) * pw

    def py(y: np.ndarray) -> np.ndarray:
        return top + ph - (np.asarray(y) - y0) / (y1 - y0) * ph

    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="srcsm-chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>',
             f'<text x="{width / 2:.0f}" y="14" text-anchor="middle" font-size="11" fill="#222">{e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999" stroke-width="0.5"/>']
    for t in _ticks(x0, x1):
        X = float(px(t))
        parts.append(f'<line x1="{X:.1f}" y1="{top + ph}" x2="{X:.1f}" y2="{top + ph + 3}" stroke="#666"/>'
                     f'<text x="{X:.1f}" y="{top + ph + 13}" text-anchor="middle" font-size="9" '
                     f'fill="#444">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        Y = float(py(t))
        parts.append(f'<line x1="{left - 3}" y1="{Y:.1f}" x2="{left}" y2="{Y:.1f}" stroke="#666"/>'
                     f'<text x="{left - 5}" y="{Y + 3:.1f}" text-anchor="end" font-size="9" fill="#444">'
                     f'{_fmt(t)}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="10" '
                 f'fill="#222">{e(x_title)}</text>')
    parts.append(f'<text transform="translate(10 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" '
                 f'font-size="10" fill="#222">{e(y_title)}</text>')
    for i, s in enumerate(series):
        ok = np.isfinite(s.x) & np.isfinite(s.y)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(s.x[ok]), py(s.y[ok])))
        parts.append(f'<polyline class="srcsm-series" data-name="{e(s.name)}" data-points="{int(ok.sum())}" '
                     f'fill="none" stroke="{_hex(s.color)}" stroke-width="1.5" points="{points}"/>')
        ly = top + 10 + 12 * i
        parts.append(f'<line x1="{left + 6}" y1="{ly}" x2="{left + 20}" y2="{ly}" stroke="{_hex(s.color)}" '
                     f'stroke-width="2"/><text x="{left + 24}" y="{ly + 3}" font-size="9" fill="#222">'
                     f'{e(s.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def matching_charts_svg(plots: MatchingPlotNodes, input_name: str) -> dict[str, str]:
    """The preview's three charts as SVG, from its tables: ``before`` (the input's histogram, in its own
    units), ``after`` (the matched histogram over the model's source profile, in source units: after a
    good match they coincide) and ``curve`` (the mapping). Drawn apart because the input's and the
    source's units differ (MR values against CT HU)."""
    (before, after, source), curve = matching_series(plots)
    return {
        "before": chart_svg([before], f"{input_name}: histogram before matching", "input intensity",
                            "fraction of voxels"),
        "after": chart_svg([after, source], "After matching, over the source profile", "source intensity",
                           "fraction of voxels"),
        "curve": chart_svg(curve, "Mapping (quantile matching)", "input intensity", "matched (source) intensity"),
    }


__all__ = ["Series", "chart_svg", "matching_charts_svg", "matching_series"]
