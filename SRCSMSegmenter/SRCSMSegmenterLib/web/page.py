"""What every feature of the page shares: the state names, the page's messages, the scene's pieces.

trame-slicer splits its apps into one logic class (and one UI class) per feature; the SRCSM page does
the same — :mod:`.load_logic`, :mod:`.preview_logic`, :mod:`.segment_logic`, :mod:`.save_logic` — and
they meet here: :class:`Page` holds what they all use, :data:`S` names the state they all write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..module_logic import DEVICE_CHOICES
from .datafolder import DataFolder
from .workflow import WebWorkflow

#: Names of the page's state variables (one place, shared by the logic and :mod:`.ui`).
S = {
    "files": "srcsm_files", "loaded": "srcsm_loaded", "busy": "srcsm_busy", "error": "srcsm_error",
    "info": "srcsm_info", "models": "srcsm_models", "model": "srcsm_model", "card": "srcsm_model_card",
    "source_matching": "srcsm_source_matching", "device": "srcsm_device", "devices": "srcsm_devices",
    "chart_before": "srcsm_chart_before", "chart_after": "srcsm_chart_after", "chart_curve": "srcsm_chart_curve",
    "previewed": "srcsm_previewed", "job_status": "srcsm_job_status", "job_progress": "srcsm_job_progress",
    "job_message": "srcsm_job_message", "job_details": "srcsm_job_details", "save_name": "srcsm_save_name",
    "overwrite_question": "srcsm_overwrite_question", "saved": "srcsm_saved", "max_upload": "srcsm_max_upload",
    "segmented": "srcsm_segmented",
}


@dataclass
class Page:
    """The server side of one page: its state, data folder, workflow, views and segment editor."""

    state: Any
    data: DataFolder
    workflow: WebWorkflow
    views: Any  # .views.PageViews
    slicer_app: Any  # trame_slicer.core.SlicerApp
    editor_logic: Any  # trame_slicer.app.logic.SegmentEditorLogic

    @property
    def scene(self) -> Any:
        return self.slicer_app.scene

    @property
    def editor(self) -> Any:
        return self.slicer_app.segmentation_editor

    def fail(self, exc: BaseException) -> None:
        """Show what went wrong (the message names the problem and the fix)."""
        self.state[S["error"]] = str(exc)
        self.state[S["info"]] = ""

    def ok(self, text: str) -> None:
        self.state[S["error"]] = ""
        self.state[S["info"]] = text

    def init_state(self) -> None:
        """Every state variable the page reads, with its first value."""
        st = self.state
        st["trame__title"] = "SRCSM Segmenter"
        st["trame__favicon"] = None  # the stock favicon is a web URL; this page loads nothing from outside
        models = self.workflow.models()
        st[S["models"]] = [{"title": m.label, "value": m.id, "available": m.available} for m in models]
        first = next((m for m in models if m.available), None)
        st[S["model"]] = first.id if first else None
        st[S["card"]] = first.card_html() if first else ""
        st[S["devices"]] = [{"title": text, "value": value} for value, text in DEVICE_CHOICES]
        st[S["device"]] = "auto"
        st[S["source_matching"]] = True
        st[S["max_upload"]] = self.data.max_upload_bytes
        for key in ("loaded", "error", "info", "chart_before", "chart_after", "chart_curve", "job_message",
                    "job_details", "save_name", "overwrite_question", "saved"):
            st[S[key]] = ""
        for key in ("busy", "previewed", "segmented"):
            st[S[key]] = False
        st[S["job_status"]] = "idle"
        st[S["job_progress"]] = 0
        st[S["files"]] = self.data.volumes()
        st.change(S["model"])(self._on_model_changed)

    def _on_model_changed(self, **_: Any) -> None:
        """The picked model's card (from its model.json, as the module's picker shows it)."""
        for m in self.workflow.models():
            if m.id == self.state[S["model"]]:
                self.state[S["card"]] = m.card_html()


__all__ = ["Page", "S"]
