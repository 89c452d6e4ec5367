"""The page's widgets (trame + Vuetify 3); no logic: every action is a controller of :mod:`.app`.

Layout, as trame-slicer's segmentation app: the views in the middle (streamed images of Slicer's own
slice and 3D views), trame-slicer's segment editor in the left drawer (paint, erase, scissors, draw,
islands, smoothing…, undo/redo in the tool strip), and on the right the SRCSM panel: data folder
list and upload, model picker with its card, source-matching preview with its charts, segmentation
with progress and cancel, saving. Element ids (``srcsm-…``) are the end-to-end test's handles.
"""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.app.ui import (
    ControlButton,
    SegmentEditorToolbarUI,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
    ViewerLayout,
)

from .page import S


def _upload_js(trigger: str) -> str:
    """Check the size in the browser (the server checks again), then send the file to ``trigger``."""
    return (
        "const f = $event.target.files;\n"
        "if (f && f.length) {\n"
        f"  if (f[0].size > {S['max_upload']}) {{\n"
        f"    {S['error']} = `'${{f[0].name}}' is ${{Math.round(f[0].size / 1048576)}} MiB, over the upload "
        f"limit of ${{Math.round({S['max_upload']} / 1048576)}} MiB. Copy it into the data folder instead.`;\n"
        "  } else {\n"
        f"    {S['busy']} = true;\n"
        f"    trame.trigger('{trigger}', [f]).finally(() => {{ {S['busy']} = false; }});\n"
        "  }\n"
        "}"
    )


class SRCSMWebUI:
    """Builds the page on ``server``; ``ctrl`` names the controllers :class:`.app.SRCSMWebApp` defines."""

    def __init__(self, server: Any, layout_manager: Any, upload_trigger: str) -> None:
        ctrl = server.controller
        with ViewerLayout(server, title="SRCSM Segmenter", is_drawer_visible=True) as self.layout:
            self.layout.title.set_text("SRCSM Segmenter — segmentation across domains")
            with self.layout.drawer:
                self.segment_editor = SegmentEditorUI()
            drawer = self.layout.typed_state.name.is_drawer_visible
            with self.layout.toolbar:
                ControlButton(icon="mdi-layers-edit", name="Segment editor", classes="mt-1",
                              click=f"{drawer} = !{drawer}", disabled=(f"!{S['loaded']}",))
                SegmentEditorToolbarUI(editor_ui=self.segment_editor)
            with self.layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.segment_editor)
            with self.layout.content:
                layout_manager.initialize_layout_grid(self.layout)
            with v.VNavigationDrawer(location="right", permanent=True, width=400, id="srcsm-panel"):
                with html.Div(classes="pa-3 d-flex flex-column", style="gap: 10px;"):
                    self._data_section(ctrl, upload_trigger)
                    self._model_section()
                    self._preview_section(ctrl)
                    self._segment_section(ctrl)
                    self._save_section(ctrl)
            self._overwrite_dialog(ctrl)

    # ---------------------------------------------------------------------------- sections
    @staticmethod
    def _messages() -> None:
        v.VAlert(v_if=(S["error"],), type="error", density="compact", text=(S["error"],), id="srcsm-error",
                 closable=True, click_close=f"{S['error']} = ''")
        v.VAlert(v_if=(S["info"],), type="success", density="compact", text=(S["info"],), id="srcsm-info")

    def _data_section(self, ctrl: Any, upload_trigger: str) -> None:
        html.Div("1. Volume", classes="text-subtitle-2")
        self._messages()
        with v.VCard(variant="outlined", max_height=180, style="overflow-y: auto;"):
            with v.VList(density="compact", id="srcsm-files"):
                v.VListItem(v_for=f"f in {S['files']}", key="f", title=("f",), click=(ctrl.srcsm_load, "[f]"),
                            active=(f"f === {S['loaded']}",), disabled=(S["busy"],),
                            prepend_icon=("f.endsWith('/') ? 'mdi-folder-multiple-image' : 'mdi-file-image'",))
                v.VListItem(v_if=(f"!{S['files']}.length",), title="No volume in the data folder yet: upload one.")
        with html.Div(classes="d-flex align-center", style="gap: 6px;"):
            v.VFileInput(label="Upload (NIfTI, NRRD, MHA)", density="compact", hide_details=True,
                         prepend_icon="mdi-upload", id="srcsm-upload", disabled=(S["busy"],),
                         accept=".nii,.nii.gz,.gz,.nrrd,.mha,.mhd", change=_upload_js(upload_trigger))
            v.VBtn(icon="mdi-refresh", size="small", variant="text", click=ctrl.srcsm_refresh_files,
                   title="Refresh the list")

    @staticmethod
    def _model_section() -> None:
        html.Div("2. Model", classes="text-subtitle-2")
        with v.VRadioGroup(v_model=(S["model"],), density="compact", hide_details=True, id="srcsm-models"):
            v.VRadio(v_for=f"m in {S['models']}", key="m.value", label=("m.title",), value=("m.value",),
                     disabled=("!m.available",))
        with v.VExpansionPanels(variant="accordion"):
            with v.VExpansionPanel(title="Model card"):
                with v.VExpansionPanelText():
                    html.Div(v_html=(S["card"],), id="srcsm-model-card", style="font-size: 12px;")

    @staticmethod
    def _preview_section(ctrl: Any) -> None:
        html.Div("3. Source matching", classes="text-subtitle-2")
        v.VSwitch(v_model=(S["source_matching"],), label="Source matching (for images from another domain)",
                  density="compact", hide_details=True, color="primary")
        v.VBtn("Preview matching", id="srcsm-preview", click=ctrl.srcsm_preview, block=True,
               disabled=(f"!{S['loaded']} || {S['busy']} || !{S['source_matching']}",), prepend_icon="mdi-eye")
        with html.Div(v_if=(S["previewed"],), id="srcsm-charts", classes="d-flex flex-column", style="gap: 4px;"):
            html.Div("Left: the input; top right: what the network is given (linked slices).",
                     classes="text-caption")
            html.Div(v_html=(S["chart_before"],))
            html.Div(v_html=(S["chart_after"],))
            html.Div(v_html=(S["chart_curve"],))

    @staticmethod
    def _segment_section(ctrl: Any) -> None:
        html.Div("4. Segment", classes="text-subtitle-2")
        v.VSelect(v_model=(S["device"],), items=(S["devices"],), label="Device", density="compact",
                  hide_details=True)
        v.VBtn("Segment", id="srcsm-segment", v_if=(f"{S['job_status']} !== 'running'",), click=ctrl.srcsm_segment,
               color="primary", block=True, prepend_icon="mdi-play",
               disabled=(f"!{S['loaded']} || !{S['model']} || {S['busy']}",))
        v.VBtn("Cancel", id="srcsm-cancel", v_if=(f"{S['job_status']} === 'running'",), click=ctrl.srcsm_cancel,
               color="warning", block=True, prepend_icon="mdi-stop")
        v.VProgressLinear(v_if=(f"{S['job_status']} === 'running'",), model_value=(S["job_progress"],),
                          height=18, color="primary", id="srcsm-progress")
        html.Div("{{ %s }}" % S["job_message"], classes="text-caption", id="srcsm-job-message")
        with v.VExpansionPanels(v_if=(S["job_details"],)):
            with v.VExpansionPanel(title="Details"):
                with v.VExpansionPanelText():
                    html.Pre("{{ %s }}" % S["job_details"], style="font-size: 10px; white-space: pre-wrap;")

    @staticmethod
    def _save_section(ctrl: Any) -> None:
        html.Div("5. Save into the data folder", classes="text-subtitle-2")
        v.VTextField(v_model=(S["save_name"],), label="Name (.seg.nrrd and _labels.nii.gz)", density="compact",
                     hide_details=True, id="srcsm-save-name", disabled=(f"!{S['segmented']}",))
        v.VBtn("Save", id="srcsm-save", click=(ctrl.srcsm_save, "[false]"), block=True, prepend_icon="mdi-content-save",
               disabled=(f"!{S['segmented']} || {S['busy']}",))
        html.Div("{{ %s }}" % S["saved"], classes="text-caption", id="srcsm-saved")

    @staticmethod
    def _overwrite_dialog(ctrl: Any) -> None:
        with v.VDialog(model_value=(f"!!{S['overwrite_question']}",), max_width=480, persistent=True):
            with v.VCard(title="Replace existing files?", id="srcsm-overwrite-dialog"):
                v.VCardText("{{ %s }}" % S["overwrite_question"])
                with v.VCardActions():
                    v.VSpacer()
                    v.VBtn("Keep them", click=f"{S['overwrite_question']} = ''", id="srcsm-overwrite-no")
                    v.VBtn("Replace", color="error", click=(ctrl.srcsm_save, "[true]"), id="srcsm-overwrite-yes")


__all__ = ["SRCSMWebUI"]
