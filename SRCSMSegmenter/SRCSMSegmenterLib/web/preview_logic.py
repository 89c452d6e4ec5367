"""Page feature 2: the source-matching preview — the module's own, with its charts as SVG."""

from __future__ import annotations

from typing import Any

from ..errors import SRCSMError
from .page import S, Page


class PreviewLogic:
    def __init__(self, page: Page) -> None:
        self.page = page

    def preview(self) -> Any:
        """Source-match the input with the chosen model; show it beside the input with the charts."""
        page = self.page
        try:
            result, charts = page.workflow.preview(page.state[S["model"]])
        except SRCSMError as exc:
            page.fail(exc)
            return None
        page.views.show_matched(result.node)
        st = page.state
        st[S["chart_before"]], st[S["chart_after"]], st[S["chart_curve"]] = (
            charts["before"], charts["after"], charts["curve"])
        st[S["previewed"]] = True
        page.ok(f"Source matching previewed as '{result.node.GetName()}' (input modality {result.target_modality}).")
        return result


__all__ = ["PreviewLogic"]
