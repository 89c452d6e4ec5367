"""Page feature 1: the data folder's list, uploads, loading a volume into a fresh scene."""

from __future__ import annotations

from typing import Any

from trame.app.file_upload import ClientFile

from ..errors import InputError, SRCSMError
from .page import S, Page


class LoadLogic:
    def __init__(self, page: Page) -> None:
        self.page = page

    def refresh_files(self) -> list[str]:
        files = self.page.data.volumes()
        self.page.state[S["files"]] = files
        return files

    def upload(self, files: list[dict]) -> str | None:
        """Store the uploaded file in the data folder (its size checked again here: the browser's check
        is a courtesy) and load it."""
        page = self.page
        try:
            if not files:
                raise InputError("No file received. Choose a file to upload.")
            client = ClientFile(files[0])
            content = client.content or b""
            page.data.check_upload_size(client.name, max(len(content), int(client.size or 0)))
            relative = page.data.save_upload(client.name, content)
        except SRCSMError as exc:
            page.fail(exc)
            return None
        self.refresh_files()
        self.load(relative)
        return relative

    def load(self, relative: str) -> Any:
        """Load a volume of the data folder into a fresh scene and show it."""
        page = self.page
        try:
            if page.workflow.running:
                raise InputError("A segmentation is running. Wait for it or cancel it before loading another volume.")
            page.data.resolve(relative)  # refuse a bad path before clearing anything
            page.editor.deactivate_effect()
            page.scene.Clear()  # as trame-slicer's loader: editor effects need a cleared scene (SLICER-TESTING §5)
            node = page.workflow.load(relative)
        except SRCSMError as exc:
            page.fail(exc)
            return None
        page.views.show_input(node)
        page.editor_logic.on_volume_changed(node)  # an empty segmentation to edit, like the stock app
        st = page.state
        st[S["loaded"]] = page.workflow.input_relative
        st[S["previewed"]] = st[S["segmented"]] = False
        st[S["job_status"]] = "idle"
        st[S["job_message"]] = st[S["job_details"]] = st[S["saved"]] = ""
        st[S["save_name"]] = page.workflow.default_output_stem()
        dims = node.GetImageData().GetDimensions()
        page.ok(f"Loaded {node.GetName()} ({dims[0]}×{dims[1]}×{dims[2]}).")
        return node


__all__ = ["LoadLogic"]
