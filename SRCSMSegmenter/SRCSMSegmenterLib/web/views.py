"""The page's views: one fixed layout of Slicer slice views, the input shown, the preview linked.

The input's axial view (left, large: where one paints), the source-matched input's axial view (top
right) and the input's coronal view (bottom right). One fixed layout, because trame-slicer 2.0's page
does not redraw the views after a layout switch (checked with its stock segmentation app: after a
switch the views stay empty or stale), so this page never switches.

Linked preview: the input's and the matched axial views cut the world at the same plane — moving the
slice of either (slider, scroll) moves the other to the same offset in millimetres.
"""

from __future__ import annotations

from typing import Any

from trame_slicer.core import LayoutManager
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

LAYOUT = "SRCSM"
INPUT_VIEW = "Red"
MATCHED_VIEW = "Matched"
CORONAL_VIEW = "Green"


def page_layout() -> Layout:
    return Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(),
        Layout(LayoutDirection.Vertical, [
            ViewLayoutDefinition.slice_view("Axial", label=MATCHED_VIEW, color="#EDD54C"),
            ViewLayoutDefinition.coronal_view(),
        ]),
    ])


class PageViews:
    """Creates the layout's views (streamed to the page by trame-slicer) and keeps the preview linked."""

    def __init__(self, slicer_app: Any, server: Any) -> None:
        self.slicer_app = slicer_app
        self.layout_manager = LayoutManager(slicer_app.scene, slicer_app.view_manager, server)
        self.layout_manager.register_layout(LAYOUT, page_layout())
        self.layout_manager.set_layout(LAYOUT)
        self._link(self.view(INPUT_VIEW), self.view(MATCHED_VIEW))

    def view(self, tag: str) -> Any:
        return self.slicer_app.view_manager.get_view(tag)

    def show_input(self, node: Any) -> None:
        """The input in its axial and coronal views; the matched view waits for a preview."""
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_background_volume_id(node.GetID() if view.get_singleton_tag() != MATCHED_VIEW else None)
            view.set_foreground_volume_id(None)
        self.slicer_app.display_manager.reset_views()

    def show_matched(self, node: Any) -> None:
        """The source-matched volume in the matched view, at the input view's plane (then linked)."""
        matched = self.view(MATCHED_VIEW)
        matched.set_background_volume_id(node.GetID())
        matched.fit_view_to_content()
        matched.set_slice_value(self.view(INPUT_VIEW).get_slice_value())

    @staticmethod
    def _link(a: Any, b: Any) -> None:
        syncing = [False]

        def follow(source: Any, target: Any) -> Any:
            def on_modified(_view: Any) -> None:
                if syncing[0] or target.get_background_volume_id() is None:
                    return
                value = source.get_slice_value()
                if abs(target.get_slice_value() - value) > 1e-6:
                    syncing[0] = True
                    try:
                        target.set_slice_value(value)
                    finally:
                        syncing[0] = False
            return on_modified

        a.modified.connect(follow(a, b))
        b.modified.connect(follow(b, a))


__all__ = ["CORONAL_VIEW", "INPUT_VIEW", "LAYOUT", "MATCHED_VIEW", "PageViews", "page_layout"]
