"""The trame application: Slicer's scene and views (trame-slicer) + the SRCSM workflow, per feature.

:class:`SRCSMWebApp` composes trame-slicer's own pieces — ``SlicerApp`` (scene, logics, views),
remote-rendered views, ``SegmentEditorLogic`` (segment editor effects, undo/redo) — with
:class:`.workflow.WebWorkflow` (the module's logic), the page's views (:mod:`.views`), one logic class
per feature (:mod:`.load_logic`, :mod:`.preview_logic`, :mod:`.segment_logic`, :mod:`.save_logic`)
and the page of :mod:`.ui`. Its methods are the page's actions; each can be called directly, which is
how the tests drive the app without a browser.

Tabs: all tabs of one server see one scene (as one Slicer window would). A job runs in its own folder,
output names are reserved while written, files are written atomically and never replaced unasked,
so two tabs can neither overwrite nor corrupt each other's files; a second segmentation while one
runs is refused with a message.
"""

from __future__ import annotations

import logging
import os
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen, no X (SLICER-TESTING §5)

from trame.app import TrameApp  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.app.logic import SegmentEditorLogic  # noqa: E402
from trame_slicer.core import SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from ..catalog import Catalog  # noqa: E402
from ..module_logic import SRCSMModuleLogic  # noqa: E402
from .datafolder import DataFolder  # noqa: E402
from .load_logic import LoadLogic  # noqa: E402
from .page import Page  # noqa: E402
from .preview_logic import PreviewLogic  # noqa: E402
from .save_logic import SaveLogic  # noqa: E402
from .segment_logic import SegmentLogic  # noqa: E402
from .ui import SRCSMWebUI  # noqa: E402
from .views import CORONAL_VIEW, INPUT_VIEW, LAYOUT, MATCHED_VIEW, PageViews, page_layout  # noqa: E402
from .workflow import WebWorkflow  # noqa: E402

UPLOAD_TRIGGER = "srcsm_upload"
logger = logging.getLogger(__name__)


class SRCSMWebApp(TrameApp):
    """The page's server side (see the module docstring)."""

    def __init__(self, data: DataFolder, server: Any = None, catalog: Catalog | None = None) -> None:
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.data = data
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.segment_editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.views = PageViews(self.slicer_app, self.server)
        self.workflow = WebWorkflow(self.scene, data, SRCSMModuleLogic(self.scene, catalog))
        self.page = Page(self.state, data, self.workflow, self.views, self.slicer_app, self.segment_editor_logic)
        self.page.init_state()
        self.loader = LoadLogic(self.page)
        self.previewer = PreviewLogic(self.page)
        self.segmenter = SegmentLogic(self.page, show_editor=self._show_editor)
        self.saver = SaveLogic(self.page, after_save=self.loader.refresh_files)
        self._bind_controllers()
        self.ui = SRCSMWebUI(self.server, self.views.layout_manager, UPLOAD_TRIGGER)
        self.segment_editor_logic.set_ui(self.ui.segment_editor)

    # --------------------------------------------------------------------------- accessors
    @property
    def scene(self) -> Any:
        return self.slicer_app.scene

    @property
    def segmentation_editor(self) -> Any:
        return self.slicer_app.segmentation_editor

    def view(self, tag: str) -> Any:
        return self.views.view(tag)

    # ---------------------------------------------------------------------------- actions
    def refresh_files(self) -> list[str]:
        return self.loader.refresh_files()

    def upload(self, files: list[dict]) -> str | None:
        return self.loader.upload(files)

    def load(self, relative: str) -> Any:
        return self.loader.load(relative)

    def preview(self) -> Any:
        return self.previewer.preview()

    def segment(self) -> bool:
        return self.segmenter.segment()

    def poll_job(self) -> bool:
        return self.segmenter.poll_job()

    def wait_job(self, timeout: float = 300.0) -> str:
        return self.segmenter.wait_job(timeout)

    def cancel(self) -> None:
        self.segmenter.cancel()

    def save(self, overwrite: bool = False) -> Any:
        return self.saver.save(overwrite)

    def _show_editor(self) -> None:
        self.ui.layout.typed_state.data.is_drawer_visible = True

    def _bind_controllers(self) -> None:
        """The page's buttons call these; what the methods return (nodes, paths) stays on the server."""

        def action(method: Any) -> Any:
            def call(*args: Any) -> None:
                try:
                    method(*args)
                except Exception as exc:  # noqa: BLE001 — a bug must reach the page as words, not vanish
                    logger.exception("srcsm web: %s failed", getattr(method, "__name__", "action"))
                    self.page.fail(RuntimeError(f"Unexpected error: {exc!r}. Please report it with the server's log."))
            return call

        ctrl = self.ctrl
        ctrl.srcsm_refresh_files = action(self.refresh_files)
        ctrl.srcsm_load = action(self.load)
        ctrl.srcsm_preview = action(self.preview)
        ctrl.srcsm_segment = action(self.segment)
        ctrl.srcsm_cancel = action(self.cancel)
        ctrl.srcsm_save = action(self.save)
        self.server.trigger(UPLOAD_TRIGGER)(action(self.upload))


def create_app(data_dir: str | os.PathLike[str], max_upload_bytes: int | None = None, server: Any = None,
               catalog: Catalog | None = None) -> SRCSMWebApp:
    kwargs = {} if max_upload_bytes is None else {"max_upload_bytes": max_upload_bytes}
    return SRCSMWebApp(DataFolder(data_dir, **kwargs), server=server, catalog=catalog)


__all__ = ["CORONAL_VIEW", "INPUT_VIEW", "LAYOUT", "MATCHED_VIEW", "SRCSMWebApp", "create_app", "page_layout"]
