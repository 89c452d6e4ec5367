"""The web page's workflow on an MRML scene: load → preview → segment (background) → save.

Every step is the Slicer module's own (:class:`..module_logic.SRCSMModuleLogic`): the preview is
``logic.preview`` (the pipeline's :func:`..matching.match` and the module's charts), the segmentation
``logic.prepare``/``start``/``import_result`` (the same background ``srcsm segment --progress json``
process, parsed by :class:`..process_runner.ProcessRunner`), the result a segmentation node made by
:func:`..mrml.load_seg_nrrd`. What this class adds is what a browser needs and Slicer provides
itself: reading a file from the data folder into the scene, polling the job from the server's event
loop instead of a ``QTimer``, and saving ``.seg.nrrd`` + labelmap into the data folder (through
:mod:`..segio`, the writer of ``srcsm segment``), confined and atomic, never replacing a file unasked.

Needs slicer-core, not trame: the tests drive it on a bare scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import mrml
from ..errors import InputError, SRCSMError
from ..image import read_volume
from ..labels import LabelTable
from ..model_info import ModelChoice
from ..module_logic import JobError, PreviewResult, SegmentationJob, SegmentationRequest, SRCSMModuleLogic
from ..process_runner import ProcessResult, ProcessRunner
from ..segio import write_labelmap, write_seg_nrrd
from .charts import matching_charts_svg
from .datafolder import DataFolder

SEG_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIX = "_labels.nii.gz"
OUTPUT_SUFFIXES = (SEG_SUFFIX, LABELMAP_SUFFIX)

JobStatus = Literal["idle", "running", "succeeded", "failed", "cancelled"]


def volume_name(relative: str) -> str:
    """A node name from a data-folder path: the file name without its image suffix."""
    name = Path(relative.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class JobState:
    """What the page shows about the current segmentation job."""

    status: JobStatus = "idle"
    fraction: float = 0.0
    message: str = ""
    error: str = ""
    details: str = ""
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SavedFiles:
    segmentation: Path
    labelmap: Path
    segment_names: list[str]
    skipped_segments: list[str]


class WebWorkflow:
    """One page's workflow state on ``scene`` (see the module docstring)."""

    def __init__(self, scene: Any, data: DataFolder, logic: SRCSMModuleLogic | None = None) -> None:
        self.scene = scene
        self.data = data
        self.logic = logic or SRCSMModuleLogic(scene)
        self.input_node: Any = None
        self.input_relative: str | None = None
        self.preview_result: PreviewResult | None = None
        self.segmentation_node: Any = None
        self.table: LabelTable | None = None
        self.job = JobState()
        self._job: SegmentationJob | None = None
        self._runner: ProcessRunner | None = None

    # ------------------------------------------------------------------------------ loading
    def load(self, relative: str) -> Any:
        """Read ``relative`` (file or DICOM folder in the data folder) into a new volume node.

        Reading goes through :func:`..image.read_volume` — the reader of ``srcsm segment`` with its
        checks (2D/4D, NaN, constant images…) — so the page refuses exactly what the CLI refuses, with
        the same words; the node carries the file's geometry exactly (left-handed ones included).
        """
        if self.running:
            raise InputError("A segmentation is running. Wait for it or cancel it before loading another volume.")
        path = self.data.resolve(relative)
        volume = read_volume(path)
        node = mrml.node_from_volume(self.scene, volume, self.scene.GenerateUniqueName(volume_name(relative)))
        self.input_node, self.input_relative = node, self.data.relative(path) + ("/" if path.is_dir() else "")
        self.preview_result = None
        self.segmentation_node = None
        self.table = None
        self.job = JobState()
        return node

    def models(self) -> list[ModelChoice]:
        return self.logic.models()

    # ------------------------------------------------------------------------------ preview
    def preview(self, model_id: str, target_modality: str = "auto") -> tuple[PreviewResult, dict[str, str]]:
        """The module's preview (source-matched node + charts) and the charts as SVG for the page."""
        self._require_input()
        result = self.logic.preview(self.input_node, model_id, target_modality)  # type: ignore[arg-type]
        self.preview_result = result
        return result, matching_charts_svg(result.plots, self.input_node.GetName())

    # --------------------------------------------------------------------------- segmenting
    @property
    def running(self) -> bool:
        return self._runner is not None and self._runner.running

    def start(self, model_id: str, source_matching: bool = True, device: str = "auto",
              target_modality: str = "auto") -> None:
        """Start the background segmentation (one job at a time per page). Returns at once.

        Every other choice (clean-up…) is the module's default for a request, so page and module agree.
        """
        self._require_input()
        if self.running:
            raise InputError("A segmentation is already running. Wait for it or cancel it.")
        request = SegmentationRequest(self.input_node, model_id, source_matching=source_matching, device=device,
                                      target_modality=target_modality)  # type: ignore[arg-type]
        job = self.logic.prepare(request)  # a new job folder each time: two jobs never share files
        runner = self.logic.start(job)
        self._job, self._runner = job, runner
        self.job = JobState("running", 0.0, "Starting")
        runner.progress.connect(self._on_progress)
        runner.message.connect(self._on_message)

    def _on_progress(self, fraction: float, message: str) -> None:
        self.job.fraction, self.job.message = fraction, message

    def _on_message(self, level: str, text: str) -> None:
        if text and level != "error":
            self.job.messages.append(text)

    def poll(self) -> JobState:
        """Deliver the job's events; when it has ended, import the result (or record the error)."""
        runner, job = self._runner, self._job
        if runner is None or job is None:
            return self.job
        if runner.poll():
            return self.job
        result = runner.result
        assert result is not None
        self._runner, self._job = None, None
        self._finish(job, result)
        return self.job

    def _finish(self, job: SegmentationJob, result: ProcessResult) -> None:
        try:
            node = self.logic.import_result(job, result)  # cleans the job folder in every case
        except JobError as exc:
            self.job = JobState(exc.status if exc.status in ("failed", "cancelled") else "failed",  # type: ignore[arg-type]
                                0.0, "", str(exc), exc.details, self.job.messages)
            return
        except SRCSMError as exc:
            self.job = JobState("failed", 0.0, "", str(exc), "", self.job.messages)
            return
        self.segmentation_node = node
        self.table = job.model.card.labels
        seconds = (result.done or {}).get("seconds", result.seconds)
        self.job = JobState("succeeded", 1.0, f"Done in {float(seconds):.1f} s", "", "", self.job.messages)

    def cancel(self) -> None:
        if self._runner is not None:
            self._runner.cancel()

    def wait(self, timeout: float = 300.0) -> JobState:
        """Block until the job ends (scripts and tests; the page polls from its event loop)."""
        if self._runner is not None:
            self._runner.wait(timeout=timeout)
        return self.poll()

    # ------------------------------------------------------------------------------- saving
    def default_output_stem(self) -> str:
        base = f"{volume_name(self.input_relative or 'segmentation')}_srcsm"
        return self.data.free_stem(base, OUTPUT_SUFFIXES)

    def output_exists(self, stem: str) -> list[str]:
        """The files that saving as ``stem`` would replace (empty: nothing)."""
        return [p.name for p in (self.data.output_path(stem, s) for s in OUTPUT_SUFFIXES) if p.exists()]

    def save(self, stem: str, overwrite: bool = False, segmentation_node: Any = None) -> SavedFiles:
        """Write ``stem.seg.nrrd`` and ``stem_labels.nii.gz`` into the data folder, on the input's grid.

        The segments are exported on the input volume's grid by the module's
        :func:`..mrml.labelmap_from_segmentation` and written by :mod:`..segio` (names, colours,
        terminology of the model), atomically. Existing files are replaced only with ``overwrite``
        (the page asks first); a name another tab is writing is refused. Segments the model does not
        know (added by hand) cannot be named in the model's table and are reported as skipped.
        """
        node = segmentation_node or self.segmentation_node
        self._require_input()
        if node is None or self.table is None or not self.scene.IsNodePresent(node):
            raise InputError("Nothing to save yet. Segment the volume first.")
        table = self.table
        seg_path = self.data.output_path(stem, SEG_SUFFIX)
        lab_path = self.data.output_path(stem, LABELMAP_SUFFIX)
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        known = set(table.names())
        labelmap = mrml.labelmap_from_segmentation(self.scene, node, self.input_node, table)
        with self.data.reserve(seg_path.name, overwrite) as seg_target, \
                self.data.reserve(lab_path.name, overwrite) as lab_target:
            write_seg_nrrd(labelmap, table, seg_target, overwrite=overwrite)
            try:
                write_labelmap(labelmap, lab_target, overwrite=overwrite)
            except BaseException:
                if not overwrite:
                    seg_target.unlink(missing_ok=True)  # a pair or nothing: no half-saved result
                raise
        return SavedFiles(seg_target, lab_target, [n for n in names if n in known], [n for n in names if n not in known])

    def _require_input(self) -> None:
        if self.input_node is None or not self.scene.IsNodePresent(self.input_node):
            raise InputError("No volume loaded. Pick a volume from the data folder (or upload one) and load it.")


__all__ = ["JobState", "SavedFiles", "WebWorkflow", "volume_name"]
