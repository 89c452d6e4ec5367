"""The Slicer module's logic, without Qt: models, preview, background segmentation, results.

The widget (``SRCSMSegmenter.py``) only wires GUI elements to this class; a web front end or a test
can drive it the same way. Everything takes the MRML scene explicitly.

Workflow
--------
1. :meth:`SRCSMModuleLogic.models` — the picker's entries with their model cards.
2. :meth:`SRCSMModuleLogic.preview` — in-process source matching: :func:`.matching.match` (the very
   function the segmentation applies), shown as "<input> (source-matched)" beside the input, plus
   histogram and mapping-curve charts.
3. :meth:`SRCSMModuleLogic.prepare` → :meth:`SRCSMModuleLogic.start` — the input is written to a
   temporary ``.nrrd`` and ``python -m SRCSMSegmenterLib.cli segment … --progress json`` runs in a
   background process (:class:`.process_runner.ProcessRunner`), so Slicer never freezes.
4. :meth:`SRCSMModuleLogic.import_result` — the ``.seg.nrrd`` is read back with
   :func:`.mrml.load_seg_nrrd` into a new segmentation node, or into the chosen one only when
   overwriting it was allowed.

Transforms (decision)
---------------------
The background process gets the input in **world** coordinates (``volume_from_node(world=True)``:
the parent transforms applied to the geometry, voxels untouched). Reason: the model's grid is
aligned with the patient axes, and a volume the user moved or rotated with a transform (e.g. to fix
an orientation) must be segmented where it is displayed; the ROI markup is in world coordinates too.
The result comes back on that world grid; :func:`.mrml.load_seg_nrrd` re-lays it exactly (no
interpolation: same voxel centres) onto the input's own grid and puts the segmentation under the
input's parent transform. So the segmentation lines up with the input now and keeps following it
if the transform is edited later. A non-linear (warping) transform is refused with a message to
harden it first.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from . import matching, mrml
from .catalog import Catalog
from .errors import InputError, ModelPackageError, SRCSMError
from .image import Volume, write_volume
from .matching_plot import MatchingPlotNodes, plot_data, update_matching_plots
from .model_info import ModelChoice, choice_from_entry, list_models
from .modelpackage import load_package
from .process_runner import ProcessResult, ProcessRunner

#: (value for ``srcsm segment --device``, text for the picker)
DEVICE_CHOICES: tuple[tuple[str, str], ...] = (
    ("auto", "Automatic (GPU if available)"),
    ("gpu", "GPU"),
    ("cpu", "CPU"),
)
TargetModality = Literal["auto", "CT", "MR"]

#: Attributes recorded on a segmentation this module made (provenance, visible in the Data module).
MODEL_ATTRIBUTE = "SRCSMSegmenter.Model"
SOURCE_MATCHING_ATTRIBUTE = "SRCSMSegmenter.SourceMatching"
INPUT_FILE = "input.nrrd"
OUTPUT_FILE = "segmentation.seg.nrrd"


class JobError(SRCSMError):
    """The background segmentation failed or was cancelled; ``details`` holds its log tail."""

    def __init__(self, message: str, details: str = "", status: str = "failed") -> None:
        super().__init__(message)
        self.details = details
        self.status = status


@dataclass(frozen=True)
class PreviewResult:
    node: Any  # the "<input> (source-matched)" volume node
    matched: Volume
    mapping: matching.QuantileMapping
    plots: MatchingPlotNodes
    target_modality: str


@dataclass(frozen=True)
class SegmentationRequest:
    """What the user asked for (the parameter node's content, as plain values and nodes)."""

    input_node: Any
    model_id: str
    source_matching: bool = True
    device: str = "auto"
    roi_node: Any = None
    output_node: Any = None  # None: create a new segmentation node
    overwrite: bool = False  # may the output node's existing segments be replaced?
    target_modality: TargetModality = "auto"
    #: Clean up islands? None: the model card's default; True: the card's clean-up, or the largest
    #: component of each label when the card has none; False: no clean-up (see :func:`postprocess_option`).
    clean_up: bool | None = None


@dataclass
class SegmentationJob:
    """A prepared background run: its files, command line and environment."""

    request: SegmentationRequest
    model: ModelChoice
    workdir: Path
    input_path: Path
    output_path: Path
    command: list[str]
    env: dict[str, str] = field(repr=False)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class ModuleLogic(Protocol):
    """What the widget needs from the logic (lets a test or another front end inject its own)."""

    def models(self) -> list[ModelChoice]: ...
    def model(self, model_id: str) -> ModelChoice: ...
    def install_question(self, path: str | os.PathLike[str]) -> str | None: ...
    def install_model(self, path: str | os.PathLike[str], overwrite: bool = False) -> ModelChoice: ...
    def preview(self, input_node: Any, model_id: str, target_modality: TargetModality = "auto") -> PreviewResult: ...
    def validate(self, request: SegmentationRequest) -> str | None: ...
    def overwrite_question(self, request: SegmentationRequest) -> str | None: ...
    def prepare(self, request: SegmentationRequest) -> SegmentationJob: ...
    def start(self, job: SegmentationJob) -> ProcessRunner: ...
    def import_result(self, job: SegmentationJob, result: ProcessResult) -> Any: ...
    def with_overwrite(self, request: SegmentationRequest) -> SegmentationRequest: ...


def lib_parent_dir() -> Path:
    """The folder that holds the ``SRCSMSegmenterLib`` package (the module folder in Slicer)."""
    return Path(__file__).resolve().parent.parent


def background_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the background process: ``base`` (default: this process's) plus the Lib's
    folder on ``PYTHONPATH`` (so ``-m SRCSMSegmenterLib.cli`` is found wherever the extension is
    installed), unbuffered UTF-8 output (progress lines arrive at once, on any code page)."""
    env = dict(os.environ if base is None else base)
    parts = [str(lib_parent_dir())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def roi_ras_corners(roi_node: Any) -> tuple[float, float, float, float, float, float]:
    """Two opposite corners (R0, A0, S0, R1, A1, S1) of the ROI's world-axis-aligned bounding box.

    A rotated ROI (or one under a rotating transform) becomes the box that encloses it, which is what
    ``srcsm segment --roi-ras`` takes: the model works on a world-aligned grid.
    """
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        kind = roi_node.GetClassName() if roi_node is not None else "nothing"
        raise InputError(f"The region of interest must be a markups ROI, got {kind}.")
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)  # world coordinates: parent transforms applied
    lo = np.array(bounds[0::2], dtype=float)
    hi = np.array(bounds[1::2], dtype=float)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))) or np.any(hi - lo <= 0):
        raise InputError(
            f"The ROI '{roi_node.GetName()}' is empty (size {tuple(np.round(hi - lo, 2))} mm). Place it on the "
            f"image and give it a size, or choose no ROI to segment the whole volume."
        )
    return (float(lo[0]), float(lo[1]), float(lo[2]), float(hi[0]), float(hi[1]), float(hi[2]))


def _world_bounds(node: Any) -> tuple[np.ndarray, np.ndarray]:
    b = [0.0] * 6
    node.GetRASBounds(b)
    return np.array(b[0::2]), np.array(b[1::2])


def clean_up_default(card: Any) -> bool:
    """The clean-up checkbox's state for a model: checked when its card prescribes a clean-up."""
    return card is not None and card.postprocessing.method != "none"


def postprocess_option(request: SegmentationRequest, card: Any) -> str:
    """The ``srcsm segment --postprocess`` value for a request (module docstring of :mod:`.postprocess`)."""
    if request.clean_up is None:
        return "card"
    if not request.clean_up:
        return "none"
    return card.postprocessing.cli_value() if clean_up_default(card) else "keep-largest"


def build_segment_command(python: str, input_path: Path, output_path: Path, model_path: Path,
                          request: SegmentationRequest,
                          roi: tuple[float, ...] | None = None, card: Any = None) -> list[str]:
    """The background command line: ``python -m SRCSMSegmenterLib.cli segment … --progress json``.

    The model is passed by its package path, so the process uses exactly the package whose card
    the user saw (not whatever another catalogue would resolve the id to); ``card`` is that card
    (for the clean-up the user's checkbox means).
    """
    if request.device not in {d for d, _ in DEVICE_CHOICES}:
        raise InputError(f"Unknown device '{request.device}'. Choose one of "
                         f"{', '.join(d for d, _ in DEVICE_CHOICES)}.")
    command = [
        str(python), "-m", "SRCSMSegmenterLib.cli", "segment", str(input_path), str(output_path),
        "--model", str(model_path), "--progress", "json", "--device", request.device,
        "--target-modality", request.target_modality,
    ]
    if not request.source_matching:
        command.append("--no-source-matching")
    command += ["--postprocess", postprocess_option(request, card)]
    if roi is not None:
        command += ["--roi-ras", *(repr(float(v)) for v in roi)]
    return command


class SRCSMModuleLogic:
    """Qt-free logic of the SRCSM Segmenter module (see the module docstring for the workflow).

    ``python_executable`` runs the background job: Slicer passes ``PythonSlicer``; elsewhere the
    current interpreter is used. ``environment`` is the base environment of that process.
    ``temp_root`` holds the per-job folders (Slicer: its temporary folder).
    """

    def __init__(self, scene: Any, catalog: Catalog | None = None, python_executable: str | None = None,
                 environment: dict[str, str] | None = None, temp_root: str | os.PathLike[str] | None = None,
                 runner_factory: Callable[[], ProcessRunner] = ProcessRunner) -> None:
        if scene is None:
            raise ValueError("SRCSMModuleLogic needs an MRML scene.")
        self.scene = scene
        self.catalog = catalog or Catalog()
        self.python_executable = python_executable or sys.executable
        self.environment = environment
        self.temp_root = Path(temp_root) if temp_root is not None else None
        self.runner_factory = runner_factory

    # ------------------------------------------------------------------------------------ models
    def models(self) -> list[ModelChoice]:
        return list_models(self.catalog)

    def model(self, model_id: str) -> ModelChoice:
        """The usable model ``model_id``; a clear error if it is unknown, not installed or unreadable."""
        if not model_id:
            raise InputError("No model selected. Choose a model (or install one from a file).")
        for choice in self.models():
            if choice.id == model_id:
                if choice.available:
                    return choice
                if choice.origin == "downloadable":
                    raise ModelPackageError(
                        f"Model '{model_id}' is not installed yet. Download it and use 'Install model from "
                        f"file…' (or run `srcsm models install {model_id}`).")
                raise ModelPackageError(f"The package of model '{model_id}' at '{choice.path}' cannot be "
                                        f"read. Reinstall it.")
        known = ", ".join(c.id for c in self.models()) or "none"
        raise ModelPackageError(f"No model with id '{model_id}' (known: {known}).")

    def install_question(self, path: str | os.PathLike[str]) -> str | None:
        """The question to ask before installing ``path`` over an installed model of the same id
        (None: nothing would be replaced). Reads and verifies the package."""
        card = load_package(path).card
        for choice in self.models():
            if choice.id == card.id and choice.origin == "installed":
                old = choice.card.version if choice.card is not None else "unreadable"
                return (f"Model '{card.id}' is already installed (version {old}). Replace it with version "
                        f"{card.version} from '{Path(path).name}'?")
        return None

    def install_model(self, path: str | os.PathLike[str], overwrite: bool = False) -> ModelChoice:
        """Install a model package (.zip or folder) into the user's models folder (verified)."""
        return choice_from_entry(self.catalog.install(path, overwrite=overwrite))

    # ----------------------------------------------------------------------------------- preview
    def preview(self, input_node: Any, model_id: str, target_modality: TargetModality = "auto") -> PreviewResult:
        """Source-match ``input_node`` in-process and show it as "<input> (source-matched)" with charts.

        The matched voxels come from :func:`.matching.match`, the function the segmentation itself
        applies before normalisation, so the preview is exactly what the network's input is made
        from. The node is reused on the next preview of the same input.
        """
        choice = self.model(model_id)
        volume = mrml.volume_from_node(input_node)  # intensities only: the local frame is enough
        profile = choice.card.source_profile
        modality = matching.guess_modality(volume.array) if target_modality == "auto" else target_modality
        matched, mapping = matching.source_match(volume, profile, modality)
        node = mrml.update_preview_node(self.scene, input_node, matched)
        plots = update_matching_plots(self.scene, input_node, plot_data(mapping, matched, profile))
        return PreviewResult(node, matched, mapping, plots, modality)

    # ------------------------------------------------------------------------------ segmentation
    def validate(self, request: SegmentationRequest) -> str | None:
        """Why ``request`` cannot run, in words for the user — or None when it can."""
        node = request.input_node
        if node is None:
            return "Select an input volume."
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            return f"'{node.GetName()}' is not a grey-value volume. Select a scalar volume."
        if node.GetImageData() is None:
            return f"Volume '{node.GetName()}' has no voxels. Load or select another volume."
        if node.GetAttribute(mrml.PREVIEW_ATTRIBUTE):
            return (f"'{node.GetName()}' is a source-matched preview. Select the original volume: source "
                    f"matching is applied during the segmentation.")
        try:
            self.model(request.model_id)
        except SRCSMError as exc:
            return str(exc)
        if request.roi_node is not None:
            try:
                roi = roi_ras_corners(request.roi_node)
            except InputError as exc:
                return str(exc)
            lo, hi = _world_bounds(node)
            if np.any(np.minimum(hi, roi[3:]) <= np.maximum(lo, roi[:3])):
                return (f"The ROI '{request.roi_node.GetName()}' does not overlap '{node.GetName()}'. Move it "
                        f"onto the image, or choose no ROI.")
        out = request.output_node
        if out is not None and not out.IsA("vtkMRMLSegmentationNode"):
            return f"The output '{out.GetName()}' is not a segmentation node."
        return None

    def overwrite_question(self, request: SegmentationRequest) -> str | None:
        """The question to ask before replacing the chosen output's segments (None: nothing to replace)."""
        out = request.output_node
        if out is None or request.overwrite or not out.IsA("vtkMRMLSegmentationNode"):
            return None
        n = out.GetSegmentation().GetNumberOfSegments()
        if n == 0:
            return None
        return (f"Segmentation '{out.GetName()}' already has {n} segment(s). Replace them with the new "
                f"result? (Choose 'Create new segmentation' as output to keep them.)")

    def prepare(self, request: SegmentationRequest) -> SegmentationJob:
        """Check the request, write the input to a temporary .nrrd and build the command line."""
        reason = self.validate(request)
        if reason:
            raise InputError(reason)
        question = self.overwrite_question(request)
        if question:
            raise InputError(f"{question} Not replaced: confirm overwriting, or choose a new output.")
        choice = self.model(request.model_id)
        roi = roi_ras_corners(request.roi_node) if request.roi_node is not None else None
        # World geometry: see "Transforms" in the module docstring. Raises for warping transforms.
        volume = mrml.volume_from_node(request.input_node, world=True)
        if self.temp_root is not None:
            self.temp_root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="srcsm-job-", dir=self.temp_root))
        try:
            input_path = write_volume(volume, workdir / INPUT_FILE, compress=False)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        output_path = workdir / OUTPUT_FILE
        command = build_segment_command(self.python_executable, input_path, output_path, choice.path, request, roi,
                                        card=choice.card)
        return SegmentationJob(request, choice, workdir, input_path, output_path, command,
                               background_environment(self.environment))

    def start(self, job: SegmentationJob) -> ProcessRunner:
        """Start the background process; the caller polls the returned runner (``poll``/``wait``)."""
        runner = self.runner_factory()
        try:
            runner.start(job.command, env=job.env, cwd=job.workdir)
        except Exception:
            job.cleanup()
            raise
        return runner

    def import_result(self, job: SegmentationJob, result: ProcessResult) -> Any:
        """Load the finished job's ``.seg.nrrd`` into the scene and clean up its files.

        Never replaces a user's segments unless the request allowed it (``overwrite``), checked again
        now because the user may have edited the node while the job ran.
        """
        try:
            if not result.succeeded:
                raise JobError(result.message, result.details, result.status)
            request = job.request
            if not self.scene.IsNodePresent(request.input_node):
                raise InputError("The input volume was removed while the segmentation ran; the result was "
                                 "discarded. Run it again.")
            if not job.output_path.is_file():
                raise JobError("The background process finished but wrote no result file. See the details.",
                               result.details)
            question = self.overwrite_question(request)
            if question:
                raise InputError(f"{question} The new result was not loaded to keep them; choose a new output "
                                 f"and run again, or allow overwriting.")
            out = request.output_node
            if out is not None and not self.scene.IsNodePresent(out):
                out = None  # the chosen output was deleted meanwhile: make a new one rather than fail
            node = mrml.load_seg_nrrd(self.scene, job.output_path, request.input_node, job.model.card.labels,
                                      segmentation_node=out, overwrite=request.overwrite)
            node.SetAttribute(MODEL_ATTRIBUTE, f"{job.model.id} {job.model.card.version}")
            node.SetAttribute(SOURCE_MATCHING_ATTRIBUTE, "1" if request.source_matching else "0")
            return node
        finally:
            job.cleanup()

    def segment(self, request: SegmentationRequest, progress: Callable[[float, str], None] | None = None,
                on_idle: Callable[[], None] | None = None, timeout: float | None = None) -> Any:
        """Prepare, run in the background, wait and import: the whole workflow in one blocking call
        (for scripts and self-tests; the widget uses the steps so that it can show progress/cancel)."""
        job = self.prepare(request)
        runner = self.start(job)
        if progress is not None:
            runner.progress.connect(progress)
        try:
            result = runner.wait(timeout=timeout, on_idle=on_idle)
        except BaseException:
            runner.cancel()
            job.cleanup()
            raise
        return self.import_result(job, result)

    def with_overwrite(self, request: SegmentationRequest) -> SegmentationRequest:
        """The same request, allowed to replace the output's segments (after the user said yes)."""
        return replace(request, overwrite=True)


__all__ = [
    "DEVICE_CHOICES",
    "MODEL_ATTRIBUTE",
    "JobError",
    "ModuleLogic",
    "PreviewResult",
    "SRCSMModuleLogic",
    "SegmentationJob",
    "SegmentationRequest",
    "background_environment",
    "build_segment_command",
    "clean_up_default",
    "lib_parent_dir",
    "postprocess_option",
    "roi_ras_corners",
]
