"""Page feature 3: the background segmentation, its progress and cancel, and the result in the editor.

The job is the module's (``SRCSMModuleLogic.prepare/start/import_result`` through
:class:`.workflow.WebWorkflow`); here it is watched from the server's event loop — an asyncio task
polls the runner every :data:`POLL_SECONDS` and flushes the state — where Slicer uses a ``QTimer``.
The page stays responsive: the work happens in another process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..errors import SRCSMError
from .page import S, Page

POLL_SECONDS = 0.25


class SegmentLogic:
    def __init__(self, page: Page, show_editor: Callable[[], None]) -> None:
        self.page = page
        self.show_editor = show_editor
        self._watch_task: asyncio.Task | None = None

    def segment(self) -> bool:
        """Start the background segmentation; progress arrives through :meth:`poll_job`."""
        page, st = self.page, self.page.state
        try:
            page.workflow.start(st[S["model"]], source_matching=bool(st[S["source_matching"]]),
                                device=st[S["device"]] or "auto")
        except SRCSMError as exc:
            page.fail(exc)
            return False
        st[S["error"]] = st[S["info"]] = st[S["job_details"]] = ""
        self._show_job()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no server loop (tests, scripts): the caller polls
        if loop is not None:
            self._watch_task = loop.create_task(self._watch_job())
        return True

    async def _watch_job(self) -> None:
        while True:
            with self.page.state:  # flush to the page at every step
                running = self.poll_job()
            if not running:
                return
            await asyncio.sleep(POLL_SECONDS)

    def poll_job(self) -> bool:
        """Deliver the job's progress to the page; True while it runs."""
        workflow = self.page.workflow
        before = workflow.job.status
        job = workflow.poll()
        self._show_job()
        if before == "running" and job.status != "running":
            self._job_ended()
        return job.status == "running"

    def wait_job(self, timeout: float = 300.0) -> str:
        """Poll until the job ends (tests and scripts; the page does it from the event loop)."""
        deadline = time.monotonic() + timeout
        while self.poll_job():
            if time.monotonic() > deadline:
                raise TimeoutError(f"The segmentation is still running after {timeout} s.")
            time.sleep(0.1)
        return self.page.workflow.job.status

    def cancel(self) -> None:
        self.page.workflow.cancel()
        self.page.state[S["job_message"]] = "Cancelling…"

    def _show_job(self) -> None:
        job, st = self.page.workflow.job, self.page.state
        st[S["job_status"]] = job.status
        st[S["job_progress"]] = round(100 * job.fraction)
        st[S["job_message"]] = job.message
        if job.status == "cancelled":
            st[S["job_message"]] = "Cancelled: no result was loaded."
        elif job.status == "failed":
            st[S["job_message"]] = ""
            st[S["error"]] = job.error
        if job.status in ("failed", "cancelled"):
            st[S["job_details"]] = job.details

    def _job_ended(self) -> None:
        page = self.page
        job = page.workflow.job
        if job.status != "succeeded":
            return
        node, input_node = page.workflow.segmentation_node, page.workflow.input_node
        for empty in list(page.scene.GetNodesByClass("vtkMRMLSegmentationNode")):
            if empty is not node and empty.GetSegmentation().GetNumberOfSegments() == 0:
                page.scene.RemoveNode(empty)  # the placeholder the editor had before the result
        page.editor.set_active_segmentation(node, input_node)
        page.editor_logic._on_segment_display_changed(page.editor_logic.data.segment_display)
        self.show_editor()
        st = page.state
        st[S["segmented"]] = True
        st[S["save_name"]] = page.workflow.default_output_stem()
        st[S["job_message"]] = " ".join([f"{job.message}.", *job.messages])
        page.ok(f"Segmented: '{node.GetName()}'. Correct it with the segment editor (left), then save.")


__all__ = ["POLL_SECONDS", "SegmentLogic"]
