"""The trame application: Slicer's scene and views (trame-slicer) + the SRCSM workflow.

:class:`SRCSMWebApp` composes trame-slicer's own pieces — ``SlicerApp`` (scene, logics, views),
remote-rendered views, ``SegmentEditorLogic`` (segment editor effects, undo/redo) and
``LayoutButtonLogic`` — with :class:`.workflow.WebWorkflow` (the module's logic) and the page of
:mod:`.ui`. The controllers below only translate between the page's state and the workflow; each
can be called directly, which is how the tests drive the app without a browser.

Linked preview: the input and its source-matched copy are shown side by side in two axial slice
views whose slice position follows the other (moving either moves both, in millimetres).

Tabs: all tabs of one server see one scene (as one Slicer window would). A job runs in its own folder,
output names are reserved while written, files are written atomically and never replaced unasked,
so two tabs can neither overwrite nor corrupt each other's files; a second segmentation while one
runs is refused with a message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen, no X (SLICER-TESTING §5)

from trame.app import TrameApp  # noqa: E402
from trame.app.file_upload import ClientFile  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.app.logic import SegmentEditorLogic  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402

from ..catalog import Catalog  # noqa: E402
from ..errors import InputError, SRCSMError  # noqa: E402
from ..module_logic import DEVICE_CHOICES, SRCSMModuleLogic  # noqa: E402
from .datafolder import DataFolder  # noqa: E402
from .ui import S, SRCSMWebUI  # noqa: E402
from .workflow import WebWorkflow  # noqa: E402

LAYOUT = "SRCSM"
INPUT_VIEW = "Red"
MATCHED_VIEW = "Matched"
CORONAL_VIEW = "Green"
UPLOAD_TRIGGER = "srcsm_upload"
POLL_SECONDS = 0.25
logger = logging.getLogger(__name__)


def page_layout() -> Layout:
    """The input's axial view (left, large: where one paints), the source-matched input's axial view
    (top right, linked) and the input's coronal view (bottom right).

    One fixed layout: trame-slicer 2.0's page does not redraw the views after a layout switch (checked
    with its stock segmentation app: after switching, views stay empty or stale), so the page never
    switches."""
    return Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(),
        Layout(LayoutDirection.Vertical, [
            ViewLayoutDefinition.slice_view("Axial", label=MATCHED_VIEW, color="#EDD54C"),
            ViewLayoutDefinition.coronal_view(),
        ]),
    ])


class SRCSMWebApp(TrameApp):
    """The page's server side (see the module docstring)."""

    def __init__(self, data: DataFolder, server: Any = None, catalog: Catalog | None = None) -> None:
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.data = data
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.segment_editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT, page_layout())
        self.layout_manager.set_layout(LAYOUT)
        self.workflow = WebWorkflow(self.scene, data, SRCSMModuleLogic(self.scene, catalog))
        self._watch_task: asyncio.Task | None = None
        self._init_state()
        self._bind_controllers()
        self.ui = SRCSMWebUI(self.server, self.layout_manager, UPLOAD_TRIGGER)
        self.segment_editor_logic.set_ui(self.ui.segment_editor)
        self._link_slice_views()

    # --------------------------------------------------------------------------- accessors
    @property
    def scene(self) -> Any:
        return self.slicer_app.scene

    @property
    def segmentation_editor(self) -> Any:
        return self.slicer_app.segmentation_editor

    def view(self, tag: str) -> Any:
        return self.slicer_app.view_manager.get_view(tag)

    # ------------------------------------------------------------------------------- state
    def _init_state(self) -> None:
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
        model_id = self.state[S["model"]]
        for m in self.workflow.models():
            if m.id == model_id:
                self.state[S["card"]] = m.card_html()

    def _bind_controllers(self) -> None:
        """The page's actions; what the methods return (nodes, paths) stays on the server."""

        def action(method: Any) -> Any:
            def call(*args: Any) -> None:
                try:
                    method(*args)
                except Exception as exc:  # noqa: BLE001 — a bug must reach the page as words, not vanish
                    logger.exception("srcsm web: %s failed", getattr(method, "__name__", "action"))
                    self._fail(RuntimeError(f"Unexpected error: {exc!r}. Please report it with the server's log."))
            return call

        ctrl = self.ctrl
        ctrl.srcsm_refresh_files = action(self.refresh_files)
        ctrl.srcsm_load = action(self.load)
        ctrl.srcsm_preview = action(self.preview)
        ctrl.srcsm_segment = action(self.segment)
        ctrl.srcsm_cancel = action(self.cancel)
        ctrl.srcsm_save = action(self.save)
        self.server.trigger(UPLOAD_TRIGGER)(action(self.upload))

    def _fail(self, exc: BaseException) -> None:
        self.state[S["error"]] = str(exc)
        self.state[S["info"]] = ""

    def _ok(self, text: str) -> None:
        self.state[S["error"]] = ""
        self.state[S["info"]] = text

    # ------------------------------------------------------------------------- controllers
    def refresh_files(self) -> list[str]:
        files = self.data.volumes()
        self.state[S["files"]] = files
        return files

    def upload(self, files: list[dict]) -> str | None:
        """Store the uploaded file in the data folder (size-checked again here) and load it."""
        try:
            if not files:
                raise InputError("No file received. Choose a file to upload.")
            client = ClientFile(files[0])
            content = client.content or b""
            self.data.check_upload_size(client.name, max(len(content), int(client.size or 0)))
            relative = self.data.save_upload(client.name, content)
        except SRCSMError as exc:
            self._fail(exc)
            return None
        self.refresh_files()
        self.load(relative)
        return relative

    def load(self, relative: str) -> Any:
        """Load a volume of the data folder into a fresh scene and show it."""
        try:
            if self.workflow.running:
                raise InputError("A segmentation is running. Wait for it or cancel it before loading another volume.")
            self.data.resolve(relative)  # refuse a bad path before clearing anything
            self.segmentation_editor.deactivate_effect()
            self.scene.Clear()  # as trame-slicer's loader: editor effects need a cleared scene (SLICER-TESTING §5)
            node = self.workflow.load(relative)
        except SRCSMError as exc:
            self._fail(exc)
            return None
        self._show_input(node)
        self.segment_editor_logic.on_volume_changed(node)  # an empty segmentation to edit, like the stock app
        st = self.state
        st[S["loaded"]] = self.workflow.input_relative
        st[S["previewed"]] = False
        st[S["segmented"]] = False
        st[S["job_status"]] = "idle"
        st[S["job_message"]] = st[S["job_details"]] = st[S["saved"]] = ""
        st[S["save_name"]] = self.workflow.default_output_stem()
        dims = node.GetImageData().GetDimensions()
        self._ok(f"Loaded {node.GetName()} ({dims[0]}×{dims[1]}×{dims[2]}).")
        return node

    def preview(self) -> Any:
        """Source-match the input with the chosen model; show it beside the input with the charts."""
        try:
            result, charts = self.workflow.preview(self.state[S["model"]])
        except SRCSMError as exc:
            self._fail(exc)
            return None
        matched = self.view(MATCHED_VIEW)
        matched.set_background_volume_id(result.node.GetID())
        matched.fit_view_to_content()
        matched.set_slice_value(self.view(INPUT_VIEW).get_slice_value())  # then they follow each other
        st = self.state
        st[S["chart_before"]], st[S["chart_after"]], st[S["chart_curve"]] = (
            charts["before"], charts["after"], charts["curve"])
        st[S["previewed"]] = True
        self._ok(f"Source matching previewed as '{result.node.GetName()}' (input modality {result.target_modality}).")
        return result

    def segment(self) -> bool:
        """Start the background segmentation; progress arrives through :meth:`poll_job`."""
        st = self.state
        try:
            self.workflow.start(st[S["model"]], source_matching=bool(st[S["source_matching"]]),
                                device=st[S["device"]] or "auto")
        except SRCSMError as exc:
            self._fail(exc)
            return False
        st[S["error"]] = st[S["info"]] = st[S["job_details"]] = ""
        self._show_job()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no server loop (tests): the caller polls
        if loop is not None:
            self._watch_task = loop.create_task(self._watch_job())
        return True

    async def _watch_job(self) -> None:
        while True:
            with self.state:
                running = self.poll_job()
            if not running:
                return
            await asyncio.sleep(POLL_SECONDS)

    def poll_job(self) -> bool:
        """Deliver the job's progress to the page; True while it runs."""
        before = self.workflow.job.status
        job = self.workflow.poll()
        self._show_job()
        if before == "running" and job.status != "running":
            self._job_ended()
        return job.status == "running"

    def wait_job(self, timeout: float = 300.0) -> str:
        """Poll until the job ends (tests and scripts; the page does it from the event loop)."""
        import time

        deadline = time.monotonic() + timeout
        while self.poll_job():
            if time.monotonic() > deadline:
                raise TimeoutError(f"The segmentation is still running after {timeout} s.")
            time.sleep(0.1)
        return self.workflow.job.status

    def cancel(self) -> None:
        self.workflow.cancel()
        self.state[S["job_message"]] = "Cancelling…"

    def _show_job(self) -> None:
        job, st = self.workflow.job, self.state
        st[S["job_status"]] = job.status
        st[S["job_progress"]] = round(100 * job.fraction)
        st[S["job_message"]] = job.message if job.status != "failed" else ""
        if job.status in ("failed", "cancelled"):
            st[S["job_message"]] = "Cancelled: no result was loaded." if job.status == "cancelled" else ""
            if job.status == "failed":
                st[S["error"]] = job.error
            st[S["job_details"]] = job.details

    def _job_ended(self) -> None:
        job = self.workflow.job
        if job.status != "succeeded":
            return
        node = self.workflow.segmentation_node
        input_node = self.workflow.input_node
        for empty in list(self.scene.GetNodesByClass("vtkMRMLSegmentationNode")):
            if empty is not node and empty.GetSegmentation().GetNumberOfSegments() == 0:
                self.scene.RemoveNode(empty)  # the placeholder the editor had before the result
        self.segmentation_editor.set_active_segmentation(node, input_node)
        self.segment_editor_logic._on_segment_display_changed(self.segment_editor_logic.data.segment_display)
        self.ui.layout.typed_state.data.is_drawer_visible = True
        st = self.state
        st[S["segmented"]] = True
        st[S["save_name"]] = self.workflow.default_output_stem()
        st[S["job_message"]] = " ".join([f"{job.message}.", *job.messages])
        self._ok(f"Segmented: '{node.GetName()}'. Correct it with the segment editor (left), then save.")

    def save(self, overwrite: bool = False) -> Any:
        """Save the segmentation into the data folder; ask before replacing files."""
        st = self.state
        stem = (st[S["save_name"]] or "").strip()
        try:
            if not stem:
                raise InputError("Type a name for the saved files.")
            existing = self.workflow.output_exists(stem)
            if existing and not overwrite:
                st[S["overwrite_question"]] = (f"{' and '.join(existing)} already exist in the data folder. Replace "
                                               f"them with this segmentation?")
                return None
            saved = self.workflow.save(stem, overwrite=overwrite,
                                       segmentation_node=self.segmentation_editor.active_segmentation_node)
        except SRCSMError as exc:
            st[S["overwrite_question"]] = ""
            self._fail(exc)
            return None
        st[S["overwrite_question"]] = ""
        skipped = (f" Not saved (not a label of the model): {', '.join(saved.skipped_segments)}."
                   if saved.skipped_segments else "")
        st[S["saved"]] = f"Saved {saved.segmentation.name} and {saved.labelmap.name}.{skipped}"
        self._ok(st[S["saved"]])
        st[S["save_name"]] = self.workflow.default_output_stem()
        self.refresh_files()
        return saved

    # ------------------------------------------------------------------------------ views
    def _show_input(self, node: Any) -> None:
        """The input in its axial and coronal views; the matched view waits for a preview."""
        views = self.slicer_app.view_manager
        for view in views.get_slice_views():
            view.set_background_volume_id(node.GetID() if view.get_singleton_tag() != MATCHED_VIEW else None)
            view.set_foreground_volume_id(None)
        self.slicer_app.display_manager.reset_views()

    def _link_slice_views(self) -> None:
        """Make the input's and the matched view cut the world at the same plane: moving the slice of
        either (slider, scroll) moves the other to the same offset in millimetres."""
        a, b = self.view(INPUT_VIEW), self.view(MATCHED_VIEW)
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


def create_app(data_dir: str | os.PathLike[str], max_upload_bytes: int | None = None, server: Any = None,
               catalog: Catalog | None = None) -> SRCSMWebApp:
    kwargs = {} if max_upload_bytes is None else {"max_upload_bytes": max_upload_bytes}
    return SRCSMWebApp(DataFolder(data_dir, **kwargs), server=server, catalog=catalog)


__all__ = ["INPUT_VIEW", "LAYOUT", "MATCHED_VIEW", "CORONAL_VIEW", "SRCSMWebApp", "create_app", "page_layout"]
