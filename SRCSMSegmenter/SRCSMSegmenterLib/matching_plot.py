"""Plots that explain source matching: histograms before/after and the mapping curve, as MRML nodes.

Two charts per input volume:

* **histograms** — the input's intensity histogram before matching (in the input's own units), the
  histogram after matching and the model's source profile (both in the source's units: after a
  good match those two curves lie on top of each other);
* **mapping curve** — input intensity → matched (source) intensity, the quantile mapping itself.

The numbers come from :mod:`.matching` (the same :class:`~.matching.QuantileMapping` the segmentation
uses); this module only bins them and writes ``vtkMRMLTableNode`` / ``vtkMRMLPlotSeriesNode`` /
``vtkMRMLPlotChartNode``. Nodes are found again by an attribute (never by name), so a re-run updates
them and a user's own nodes are never touched. No Qt, no global scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .image import Volume
from .matching import QuantileMapping, SourceProfile, histogram

#: Attribute marking the plot/table nodes made for an input; value "<input node ID>:<role>".
PLOT_ATTRIBUTE = "SRCSMSegmenter.PlotOf"
#: Bins of the displayed histograms (per-integer histograms are too noisy to read).
DEFAULT_BINS = 128
#: The mapping curve is a step function over every integer value; this many points draw it well.
MAX_CURVE_POINTS = 1024

HISTOGRAM_COLUMNS = ("input intensity", "input (before)", "source intensity", "input (after matching)",
                     "source profile")
CURVE_COLUMNS = ("input intensity", "matched intensity")

#: Colours of the series (RGB 0..1): before = grey, after = orange, source = blue, curve = green.
SERIES_COLORS = {
    "before": (0.45, 0.45, 0.45),
    "after": (0.95, 0.55, 0.10),
    "source": (0.15, 0.45, 0.85),
    "curve": (0.10, 0.60, 0.30),
}

#: A Slicer layout: input and preview side by side on top, the two charts below. The widget
#: registers it (``vtkMRMLLayoutNode.AddLayoutDescription``); kept here so it is plain data.
PREVIEW_LAYOUT_ID = 5813  # an id unlikely to collide with Slicer's (< 1000) or other extensions'
PREVIEW_LAYOUT_XML = """<layout type="vertical" split="true">
 <item splitSize="600">
  <layout type="horizontal">
   <item><view class="vtkMRMLSliceNode" singletontag="Red"><property name="orientation" action="default">Axial</property><property name="viewlabel" action="default">R</property><property name="viewcolor" action="default">#F34A33</property></view></item>
   <item><view class="vtkMRMLSliceNode" singletontag="Yellow"><property name="orientation" action="default">Axial</property><property name="viewlabel" action="default">Y</property><property name="viewcolor" action="default">#EDD54C</property></view></item>
  </layout>
 </item>
 <item splitSize="400">
  <layout type="horizontal">
   <item><view class="vtkMRMLPlotViewNode" singletontag="PlotView1"><property name="viewlabel" action="default">P</property></view></item>
   <item><view class="vtkMRMLPlotViewNode" singletontag="PlotView2"><property name="viewlabel" action="default">Q</property></view></item>
  </layout>
 </item>
</layout>"""


@dataclass(frozen=True)
class MatchingPlotData:
    """Binned histograms (fractions of the masked voxels) and the mapping curve."""

    input_centers: np.ndarray
    before: np.ndarray
    source_centers: np.ndarray
    after: np.ndarray
    source: np.ndarray
    curve_x: np.ndarray
    curve_y: np.ndarray


def _binned(values: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(values, bins=edges, weights=weights.astype(np.float64))
    total = counts.sum()
    return counts / total if total > 0 else counts


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    if not hi > lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def plot_data(mapping: QuantileMapping, matched: Volume, profile: SourceProfile,
              bins: int = DEFAULT_BINS) -> MatchingPlotData:
    """Bin the three histograms and sample the mapping curve.

    ``mapping`` is :func:`~.matching.fit_mapping` of the input, ``matched`` the output of
    :func:`~.matching.match` (what the preview shows), ``profile`` the model's source profile. All
    three histograms use the matching's own mask (minimum and maximum voxels left out).
    """
    th = mapping.target_histogram
    input_values = th.keys.astype(np.float64) / mapping.scale
    edges_in = _edges(float(input_values.min()), float(input_values.max()), bins)
    before = _binned(input_values, th.counts, edges_in)

    ah = histogram(np.asarray(matched.array))
    src_values = np.asarray(profile.values, dtype=np.float64)
    src_pmf = np.diff(np.asarray(profile.cdf, dtype=np.float64), prepend=0.0)
    lo = float(min(ah.keys.min(), src_values.min()))
    hi = float(max(ah.keys.max(), src_values.max()))
    edges_src = _edges(lo, hi, bins)
    after = _binned(ah.keys.astype(np.float64), ah.counts, edges_src)
    source = _binned(src_values, src_pmf, edges_src)

    x, y = mapping.curve()
    if x.size > MAX_CURVE_POINTS:
        idx = np.unique(np.linspace(0, x.size - 1, MAX_CURVE_POINTS).round().astype(int))
        x, y = x[idx], y[idx]
    return MatchingPlotData(
        input_centers=0.5 * (edges_in[1:] + edges_in[:-1]), before=before,
        source_centers=0.5 * (edges_src[1:] + edges_src[:-1]), after=after, source=source,
        curve_x=np.asarray(x, dtype=np.float64), curve_y=np.asarray(y, dtype=np.float64),
    )


# ---------------------------------------------------------------------------------- MRML nodes


@dataclass(frozen=True)
class MatchingPlotNodes:
    histogram_chart: Any
    curve_chart: Any
    histogram_table: Any
    curve_table: Any
    series: dict[str, Any]


def _find(scene: Any, class_name: str, tag: str) -> Any:
    collection = scene.GetNodesByClass(class_name)
    for i in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(i)
        if node.GetAttribute(PLOT_ATTRIBUTE) == tag:
            return node
    return None


def _get_or_add(scene: Any, class_name: str, tag: str, name: str) -> Any:
    node = _find(scene, class_name, tag)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
        node.SetAttribute(PLOT_ATTRIBUTE, tag)
    return node


def _fill_table(table_node: Any, columns: dict[str, np.ndarray]) -> None:
    import vtk
    from vtkmodules.util import numpy_support

    table = vtk.vtkTable()
    for name, values in columns.items():
        array = numpy_support.numpy_to_vtk(np.ascontiguousarray(values, dtype=np.float64), deep=True)
        array.SetName(name)
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)
    table_node.Modified()


def _series(scene: Any, tag: str, name: str, table: Any, x: str, y: str, color: tuple[float, float, float]) -> Any:
    import slicer

    node = _get_or_add(scene, "vtkMRMLPlotSeriesNode", tag, name)
    node.SetAndObserveTableNodeID(table.GetID())
    node.SetXColumnName(x)
    node.SetYColumnName(y)
    node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    node.SetLineWidth(2)
    node.SetColor(*color)
    return node


def _chart(scene: Any, tag: str, name: str, title: str, x_title: str, y_title: str, series: list[Any]) -> Any:
    chart = _get_or_add(scene, "vtkMRMLPlotChartNode", tag, name)
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    chart.RemoveAllPlotSeriesNodeIDs()
    for s in series:
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
    return chart


def update_matching_plots(scene: Any, input_node: Any, data: MatchingPlotData) -> MatchingPlotNodes:
    """Create (first time) or update the tables, series and charts for ``input_node``."""
    base = input_node.GetName()
    key = input_node.GetID()
    hist_table = _get_or_add(scene, "vtkMRMLTableNode", f"{key}:histogram-table", f"{base} SM histograms")
    _fill_table(hist_table, dict(zip(HISTOGRAM_COLUMNS, (data.input_centers, data.before, data.source_centers,
                                                          data.after, data.source))))
    curve_table = _get_or_add(scene, "vtkMRMLTableNode", f"{key}:curve-table", f"{base} SM mapping")
    _fill_table(curve_table, dict(zip(CURVE_COLUMNS, (data.curve_x, data.curve_y))))

    before = _series(scene, f"{key}:series-before", "input (before)", hist_table, HISTOGRAM_COLUMNS[0],
                     HISTOGRAM_COLUMNS[1], SERIES_COLORS["before"])
    after = _series(scene, f"{key}:series-after", "input (after matching)", hist_table, HISTOGRAM_COLUMNS[2],
                    HISTOGRAM_COLUMNS[3], SERIES_COLORS["after"])
    source = _series(scene, f"{key}:series-source", "source profile", hist_table, HISTOGRAM_COLUMNS[2],
                     HISTOGRAM_COLUMNS[4], SERIES_COLORS["source"])
    curve = _series(scene, f"{key}:series-curve", "mapping", curve_table, CURVE_COLUMNS[0], CURVE_COLUMNS[1],
                    SERIES_COLORS["curve"])
    hist_chart = _chart(scene, f"{key}:histogram-chart", f"{base} SM histograms",
                        f"Source matching of {base}: histograms", "intensity", "fraction of voxels",
                        [before, after, source])
    curve_chart = _chart(scene, f"{key}:curve-chart", f"{base} SM mapping",
                         f"Source matching of {base}: mapping", "input intensity", "matched (source) intensity",
                         [curve])
    return MatchingPlotNodes(hist_chart, curve_chart, hist_table, curve_table,
                             {"before": before, "after": after, "source": source, "curve": curve})


__all__ = [
    "CURVE_COLUMNS",
    "HISTOGRAM_COLUMNS",
    "PLOT_ATTRIBUTE",
    "PREVIEW_LAYOUT_ID",
    "PREVIEW_LAYOUT_XML",
    "MatchingPlotData",
    "MatchingPlotNodes",
    "plot_data",
    "update_matching_plots",
]
