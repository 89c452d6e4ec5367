"""Page feature 4: saving the (corrected) segmentation into the data folder, asking before replacing."""

from __future__ import annotations

from typing import Any

from ..errors import InputError, SRCSMError
from .page import S, Page


class SaveLogic:
    def __init__(self, page: Page, after_save: Any = None) -> None:
        self.page = page
        self.after_save = after_save

    def save(self, overwrite: bool = False) -> Any:
        """Save the segment editor's segmentation as ``NAME.seg.nrrd`` + ``NAME_labels.nii.gz``.

        Existing files: the page shows a question (``overwrite_question``) and replaces them only when
        the user confirms (``overwrite=True``).
        """
        page, st = self.page, self.page.state
        stem = (st[S["save_name"]] or "").strip()
        try:
            if not stem:
                raise InputError("Type a name for the saved files.")
            existing = page.workflow.output_exists(stem)
            if existing and not overwrite:
                st[S["overwrite_question"]] = (f"{' and '.join(existing)} already exist in the data folder. Replace "
                                               f"them with this segmentation?")
                return None
            saved = page.workflow.save(stem, overwrite=overwrite, segmentation_node=page.editor.active_segmentation_node)
        except SRCSMError as exc:
            st[S["overwrite_question"]] = ""
            page.fail(exc)
            return None
        st[S["overwrite_question"]] = ""
        skipped = (f" Not saved (not a label of the model): {', '.join(saved.skipped_segments)}."
                   if saved.skipped_segments else "")
        st[S["saved"]] = f"Saved {saved.segmentation.name} and {saved.labelmap.name}.{skipped}"
        page.ok(st[S["saved"]])
        st[S["save_name"]] = page.workflow.default_output_stem()
        if self.after_save is not None:
            self.after_save()
        return saved


__all__ = ["SaveLogic"]
