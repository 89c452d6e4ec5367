"""The module's Qt-free logic on REAL MRML nodes (slicer-core) and REAL data from shared/data.

Covers the model picker and card, the source-matching preview (node, values, charts), ROI → command
line, the background segmentation with the real ``srcsm`` command, and reading results back: names,
colours, terminology, reference geometry, parent transform, subject hierarchy, never overwriting a
user's node.
"""

from __future__ import annotations

import os
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_module_helpers import LIB_DIR, fake_result_from_real_labels, linear_transform
from SRCSMSegmenterLib import inference, matching, mrml
from SRCSMSegmenterLib import module_logic as ml
from SRCSMSegmenterLib.errors import InputError, ModelPackageError
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.matching_plot import CURVE_COLUMNS, HISTOGRAM_COLUMNS, PLOT_ATTRIBUTE
from SRCSMSegmenterLib.module_logic import JobError, SegmentationRequest
from SRCSMSegmenterLib.process_runner import ProcessResult
from SRCSMSegmenterLib.segio import BINARY_LABELMAP, TERMINOLOGY_TAG


def _matrix(get) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    get(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _column(table_node, name: str) -> np.ndarray:
    from vtkmodules.util import numpy_support

    return numpy_support.vtk_to_numpy(table_node.GetTable().GetColumnByName(name)).copy()


def _segments(node) -> list:
    s = node.GetSegmentation()
    return [s.GetNthSegment(i) for i in range(s.GetNumberOfSegments())]


def _sh_folder(scene, input_node, name="Patient 1"):
    """Put ``input_node`` into a subject-hierarchy folder, as Slicer's Data module would."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), name)
    sh.CreateItem(folder, input_node)
    return sh, folder


# ----------------------------------------------------------------------------------- models


def test_model_list_and_card_come_from_the_model_json(logic, model_card):
    choices = {c.id: c for c in logic.models()}
    ours = choices[model_card.id]
    assert ours.available and ours.origin == "bundled"
    assert ours.label == f"{model_card.name} ({model_card.source.modality})"
    html = ours.card_html()
    for text in [model_card.anatomy, model_card.license, model_card.provenance.augmentation,
                 *model_card.labels.names(), *(d.terms for d in model_card.training_data)]:
        assert html_escape(text) in html, text
    assert f"Trained on</b></td><td>{model_card.source.modality}" in html
    assert "Measured accuracy" in html and "Expected time" in html
    for section in (model_card.metrics, model_card.performance):
        for key in section:
            assert key in html
    for lab in model_card.labels.labels:  # SNOMED-CT code and colour swatch per label
        assert lab.terminology.type.code in html
        r, g, b = (round(c * 255) for c in lab.color)
        assert f"#{r:02x}{g:02x}{b:02x}" in html

    download = choices["heart-mr-download"]
    assert not download.available and download.label.endswith("— not installed")
    assert "Not installed" in download.card_html() and "https://example.org/heart-mr-download.zip" in download.card_html()
    with pytest.raises(ModelPackageError, match="not installed yet"):
        logic.model("heart-mr-download")
    with pytest.raises(ModelPackageError, match="No model with id 'nope'"):
        logic.model("nope")


def test_install_model_from_a_zip_asks_before_replacing(logic, module_model, model_card, tmp_path):
    from SRCSMSegmenterLib.modelpackage import package_to_zip_bytes

    z = tmp_path / "package.zip"
    z.write_bytes(package_to_zip_bytes(module_model))
    assert logic.install_question(z) is None
    installed = logic.install_model(z)
    assert installed.origin == "installed" and installed.id == model_card.id and installed.available
    assert {c.id: c.origin for c in logic.models()}[model_card.id] == "installed"  # overrides the bundled one
    question = logic.install_question(z)
    assert question and "already installed" in question and model_card.version in question
    with pytest.raises(ModelPackageError, match="already installed"):
        logic.install_model(z)
    assert logic.install_model(z, overwrite=True).origin == "installed"


# ---------------------------------------------------------------------------------- volumes


def test_volume_node_from_a_real_case_keeps_the_files_exact_geometry(slicer_app, real_case, mr_node):
    """Slicer's reader on a left-handed, oblique real case: every voxel is at the physical position
    SimpleITK gives it, and the Volume handed to the pipeline is exactly the node's IJK→RAS."""
    image, _, _ = real_case("Dataset502", "chaos_02")
    reference = sitk.ReadImage(str(image))
    volume = mrml.volume_from_node(mr_node)
    assert np.allclose(volume.ijk_to_ras(), _matrix(mr_node.GetIJKToRASMatrix), atol=1e-9)
    rng = np.random.default_rng(0)
    kji = np.c_[rng.integers(0, volume.shape[0], 300), rng.integers(0, volume.shape[1], 300),
                rng.integers(0, volume.shape[2], 300)]
    lps = volume.geometry.index_to_physical(kji[:, ::-1].astype(float))
    ref_array = sitk.GetArrayFromImage(reference)
    for (k, j, i), point in zip(kji, lps):
        idx = reference.TransformPhysicalPointToContinuousIndex(point.tolist())
        assert np.allclose(idx, np.rint(idx), atol=1e-4)
        x, y, z = (int(v) for v in np.rint(idx))
        assert volume.array[k, j, i] == ref_array[z, y, x]


# ---------------------------------------------------------------------------------- preview


def test_preview_is_matching_match_and_reuses_its_node(slicer_app, logic, model_card, mr_node, monkeypatch):
    import slicer

    _, folder = _sh_folder(slicer_app.scene, mr_node)
    user = slicer_app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{mr_node.GetName()} (source-matched)")
    slicer.util.updateVolumeFromArray(user, np.full((2, 3, 4), 7, dtype=np.int16))
    transform, _ = linear_transform(slicer_app.scene)
    mr_node.SetAndObserveTransformNodeID(transform.GetID())

    calls = []
    real_match, real_source_match = matching.match, matching.source_match
    monkeypatch.setattr(matching, "source_match", lambda *a, **k: calls.append(a) or real_source_match(*a, **k))

    first = logic.preview(mr_node, model_card.id)
    assert len(calls) == 1  # the preview goes through matching.source_match (match() wraps it) …
    # … the definition the segmentation applies: source_match, or for an integer image the same raw-value
    # mapping source_match itself uses, looked up inside the resampling (identical values, test_inference)
    assert inference.source_match is real_source_match and inference.fit_raw_mapping is matching.fit_raw_mapping

    expected = real_match(mrml.volume_from_node(mr_node), model_card.source_profile, first.target_modality)
    assert first.target_modality == "MR"
    node = first.node
    assert node.GetID() != user.GetID() and node.GetName().startswith(mr_node.GetName() + " (source-matched)")
    assert np.array_equal(slicer.util.arrayFromVolume(node), expected.array)
    assert slicer.util.arrayFromVolume(node).dtype == expected.array.dtype
    assert np.allclose(_matrix(node.GetIJKToRASMatrix), _matrix(mr_node.GetIJKToRASMatrix), atol=1e-9)
    assert node.GetTransformNodeID() == transform.GetID()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_app.scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder

    second = logic.preview(mr_node, model_card.id)
    assert second.node.GetID() == node.GetID()  # reused, not a new node
    assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 3  # input, user's, preview
    assert np.all(slicer.util.arrayFromVolume(user) == 7)  # the user's same-named node is untouched
    assert mr_node.GetAttribute(mrml.PREVIEW_ATTRIBUTE) is None


def test_preview_plots_histograms_and_mapping_curve(slicer_app, logic, model_card, mr_node):
    result = logic.preview(mr_node, model_card.id)
    plots = result.plots
    hist, curve = plots.histogram_chart, plots.curve_chart
    assert hist.IsA("vtkMRMLPlotChartNode") and curve.IsA("vtkMRMLPlotChartNode")
    names = lambda chart: [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert names(hist) == ["input (before)", "input (after matching)", "source profile"]
    assert names(curve) == ["mapping"]
    table = plots.histogram_table
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(HISTOGRAM_COLUMNS)
    for series, (x, y) in zip([plots.series["before"], plots.series["after"], plots.series["source"]],
                              [HISTOGRAM_COLUMNS[:2], HISTOGRAM_COLUMNS[2:4], (HISTOGRAM_COLUMNS[2], HISTOGRAM_COLUMNS[4])]):
        assert series.GetTableNodeID() == table.GetID()
        assert (series.GetXColumnName(), series.GetYColumnName()) == (x, y)
    for col in ("input (before)", "input (after matching)", "source profile"):
        assert _column(table, col).sum() == pytest.approx(1.0)  # fractions of the masked voxels

    # "before" spans the input's own intensities; "after" lands on the source profile
    arr = mrml.volume_from_node(mr_node).array
    x_in = _column(table, HISTOGRAM_COLUMNS[0])
    assert arr.min() <= x_in.min() and x_in.max() <= arr.max()
    after, source = _column(table, HISTOGRAM_COLUMNS[3]), _column(table, HISTOGRAM_COLUMNS[4])
    assert 0.5 * np.abs(after - source).sum() < 0.25  # total-variation distance after matching

    # the curve is the QuantileMapping's own, monotone, from the input's range onto the source's
    x, y = _column(plots.curve_table, CURVE_COLUMNS[0]), _column(plots.curve_table, CURVE_COLUMNS[1])
    full_x, full_y = result.mapping.curve()
    assert np.all(np.diff(y) >= 0) and x[0] == full_x[0] and x[-1] == full_x[-1] and y[-1] == full_y[-1]
    assert np.isin(y, full_y).all()
    profile = model_card.source_profile
    assert y.min() >= profile.overall_min and y.max() <= profile.values[-1]

    # a second preview updates the same nodes
    count = slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode")
    again = logic.preview(mr_node, model_card.id).plots
    assert again.histogram_chart.GetID() == hist.GetID() and again.curve_table.GetID() == plots.curve_table.GetID()
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == count == 2
    assert hist.GetAttribute(PLOT_ATTRIBUTE) == f"{mr_node.GetID()}:histogram-chart"


def test_preview_needs_an_available_model(logic, mr_node):
    with pytest.raises(ModelPackageError, match="not installed yet"):
        logic.preview(mr_node, "heart-mr-download")


# ------------------------------------------------------------------------------ ROI, command


def test_roi_markup_becomes_world_ras_corners(slicer_app, mr_node, logic, model_card):
    roi = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(100.0, 80.0, 60.0)
    assert ml.roi_ras_corners(roi) == pytest.approx((-40.0, -60.0, 0.0, 60.0, 20.0, 60.0))
    transform = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    import vtk

    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)
    m.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(m)
    roi.SetAndObserveTransformNodeID(transform.GetID())
    assert ml.roi_ras_corners(roi) == pytest.approx((-35.0, -60.0, -7.0, 65.0, 20.0, 53.0))  # world coordinates

    empty = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty")
    with pytest.raises(InputError, match="is empty"):
        ml.roi_ras_corners(empty)
    far = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    far.SetCenter(5000.0, 0.0, 0.0)
    far.SetSize(10.0, 10.0, 10.0)
    reason = logic.validate(SegmentationRequest(mr_node, model_card.id, roi_node=far))
    assert reason and "does not overlap" in reason


def test_prepare_writes_the_world_input_and_builds_the_command(slicer_app, logic, model_card, module_model, mr_node):
    transform, _ = linear_transform(slicer_app.scene)
    mr_node.SetAndObserveTransformNodeID(transform.GetID())
    roi = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*mr_node.GetImageData().GetCenter())
    roi.SetSize(120.0, 100.0, 80.0)
    request = SegmentationRequest(mr_node, model_card.id, source_matching=False, device="cpu", roi_node=roi)
    job = logic.prepare(request)
    try:
        c = job.command
        assert c[:4] == [logic.python_executable, "-m", "SRCSMSegmenterLib.cli", "segment"]
        assert c[4:6] == [str(job.input_path), str(job.output_path)]
        # the exact package whose card was shown (the bundled folder links to the fixture's package)
        assert c[c.index("--model") + 1] == str(logic.model(model_card.id).path)
        assert Path(c[c.index("--model") + 1]).resolve() == module_model.resolve()
        assert c[c.index("--progress") + 1] == "json" and c[c.index("--device") + 1] == "cpu"
        assert "--no-source-matching" in c
        corners = [float(v) for v in c[c.index("--roi-ras") + 1:c.index("--roi-ras") + 7]]
        assert corners == pytest.approx(ml.roi_ras_corners(roi))
        assert str(ml.lib_parent_dir()) == job.env["PYTHONPATH"].split(os.pathsep)[0]
        assert ml.lib_parent_dir() == LIB_DIR.parent
        # the file is the volume in WORLD geometry (transform applied), voxels unchanged
        written = read_volume(job.input_path)
        world = mrml.volume_from_node(mr_node, world=True)
        assert written.geometry.almost_equal(world.geometry, tol=1e-5)
        assert np.array_equal(written.array, world.array)
        assert job.input_path.parent == job.workdir and job.workdir.parent == logic.temp_root
    finally:
        job.cleanup()
    assert not job.workdir.exists()

    on = logic.prepare(SegmentationRequest(mr_node, model_card.id))
    on.cleanup()
    assert "--no-source-matching" not in on.command and "--roi-ras" not in on.command
    assert on.command[on.command.index("--device") + 1] == "auto"


def test_validation_reasons(slicer_app, logic, model_card, mr_node):
    assert logic.validate(SegmentationRequest(None, model_card.id)) == "Select an input volume."
    label = slicer_app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert "not a grey-value volume" in logic.validate(SegmentationRequest(label, model_card.id))
    assert "No model selected" in logic.validate(SegmentationRequest(mr_node, ""))
    preview = logic.preview(mr_node, model_card.id).node
    assert "source-matched preview" in logic.validate(SegmentationRequest(preview, model_card.id))
    model = slicer_app.scene.AddNewNodeByClass("vtkMRMLModelNode", "not a segmentation")
    assert "not a segmentation" in logic.validate(SegmentationRequest(mr_node, model_card.id, output_node=model))
    assert logic.validate(SegmentationRequest(mr_node, model_card.id)) is None
    with pytest.raises(InputError, match="Unknown device"):
        ml.build_segment_command("python", "i", "o", "m", SegmentationRequest(mr_node, "x", device="tpu"))


# --------------------------------------------------------------------------- reading results


def test_result_lands_exactly_on_the_input_under_its_transform_in_its_folder(
        slicer_app, logic, model_card, mr_node, real_case, same_labels_physically):
    import slicer

    sh, folder = _sh_folder(slicer_app.scene, mr_node)
    transform, to_parent = linear_transform(slicer_app.scene)
    mr_node.SetAndObserveTransformNodeID(transform.GetID())
    request = SegmentationRequest(mr_node, model_card.id)
    job, result = fake_result_from_real_labels(logic, request, real_case, to_parent)

    seg = logic.import_result(job, result)
    assert not job.workdir.exists()  # temporary files removed
    assert seg.GetName() == f"{mr_node.GetName()} segmentation"
    assert seg.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == folder
    assert seg.GetAttribute(ml.MODEL_ATTRIBUTE) == f"{model_card.id} {model_card.version}"
    assert seg.GetAttribute(ml.SOURCE_MATCHING_ATTRIBUTE) == "1"
    # reference geometry = the input's grid (so the Segment Editor edits on it)
    ref = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ref")
    ref.SetReferenceImageGeometryParameterFromVolumeNode(mr_node)
    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert seg.GetSegmentation().GetConversionParameter(key) == ref.GetSegmentation().GetConversionParameter(key)
    # voxel for voxel the real labels, on the input's own grid (no interpolation)
    exported = mrml.labelmap_from_segmentation(slicer_app.scene, seg, mr_node, model_card.labels)
    _, label_path, _ = real_case("Dataset502", "chaos_02")
    same_labels_physically(exported, read_volume(label_path))


def test_segments_carry_the_model_cards_names_colours_and_terminology(
        slicer_app, logic, model_card, mr_node, real_case):
    job, result = fake_result_from_real_labels(logic, SegmentationRequest(mr_node, model_card.id), real_case)
    seg = logic.import_result(job, result)
    segments = _segments(seg)
    assert [s.GetName() for s in segments] == model_card.labels.names()
    for segment, label in zip(segments, model_card.labels.labels):
        assert segment.GetColor() == pytest.approx(label.color)
        assert segment.GetLabelValue() == label.value
        entry = segment.GetTerminology() if hasattr(segment, "GetTerminology") else segment.GetTag(TERMINOLOGY_TAG)
        assert label.terminology.type.code in entry and label.terminology.type.meaning in entry
        assert segment.GetRepresentation(BINARY_LABELMAP) is not None


def test_a_users_segmentation_is_never_overwritten_silently(slicer_app, logic, model_card, mr_node, real_case):
    user = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my careful edits")
    user.GetSegmentation().AddEmptySegment("tumour", "tumour")
    request = SegmentationRequest(mr_node, model_card.id, output_node=user)
    assert logic.validate(request) is None
    question = logic.overwrite_question(request)
    assert question and "'my careful edits' already has 1 segment" in question
    with pytest.raises(InputError, match="Not replaced"):
        logic.prepare(request)
    # the user edits the node WHILE a job that was allowed to write into an empty node runs
    empty = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "was empty")
    job, result = fake_result_from_real_labels(
        logic, SegmentationRequest(mr_node, model_card.id, output_node=empty), real_case)
    empty.GetSegmentation().AddEmptySegment("drawn meanwhile", "drawn meanwhile")
    with pytest.raises(InputError, match="not loaded to keep them"):
        logic.import_result(job, result)
    assert [s.GetName() for s in _segments(empty)] == ["drawn meanwhile"]
    assert [s.GetName() for s in _segments(user)] == ["tumour"]
    assert not job.workdir.exists()

    # "Create new" twice: two nodes, the first untouched
    first = logic.import_result(*fake_result_from_real_labels(logic, SegmentationRequest(mr_node, model_card.id),
                                                               real_case))
    second = logic.import_result(*fake_result_from_real_labels(logic, SegmentationRequest(mr_node, model_card.id),
                                                                real_case))
    assert first.GetID() != second.GetID() and first.GetName() != second.GetName()
    assert len(_segments(first)) == len(model_card.labels.labels)

    # with the user's consent the chosen node is replaced
    allowed = logic.with_overwrite(request)
    assert logic.overwrite_question(allowed) is None
    replaced = logic.import_result(*fake_result_from_real_labels(logic, allowed, real_case))
    assert replaced.GetID() == user.GetID()
    assert [s.GetName() for s in _segments(user)] == model_card.labels.names()


def test_failed_or_cancelled_jobs_raise_with_details_and_clean_up(slicer_app, logic, model_card, mr_node):
    job = logic.prepare(SegmentationRequest(mr_node, model_card.id))
    failed = ProcessResult("failed", 2, "The GPU ran out of memory.", "log line\ntrace", "SRCSMError")
    with pytest.raises(JobError) as info:
        logic.import_result(job, failed)
    assert str(info.value) == "The GPU ran out of memory." and info.value.details == "log line\ntrace"
    assert not job.workdir.exists()
    job = logic.prepare(SegmentationRequest(mr_node, model_card.id))
    with pytest.raises(JobError) as info:
        logic.import_result(job, ProcessResult("cancelled", 130, "Cancelled by the user."))
    assert info.value.status == "cancelled"
    job = logic.prepare(SegmentationRequest(mr_node, model_card.id))
    with pytest.raises(JobError, match="wrote no result file"):
        logic.import_result(job, ProcessResult("succeeded", 0, "Finished."))
    job = logic.prepare(SegmentationRequest(mr_node, model_card.id))
    slicer_app.scene.RemoveNode(mr_node)
    with pytest.raises(InputError, match="removed while the segmentation ran"):
        logic.import_result(job, ProcessResult("succeeded", 0, "Finished."))


# ------------------------------------------------------------------- the real background run


def test_background_segmentation_with_the_real_cli(slicer_app, logic, model_card, mr_node, same_labels_physically):
    """Prepare → real `python -m SRCSMSegmenterLib.cli segment … --progress json` → parse its progress
    → read its .seg.nrrd back. Input under a rotating transform, inside a subject-hierarchy folder."""
    from SRCSMSegmenterLib.segio import read_seg_nrrd

    sh, folder = _sh_folder(slicer_app.scene, mr_node)
    transform, to_parent = linear_transform(slicer_app.scene)
    mr_node.SetAndObserveTransformNodeID(transform.GetID())
    request = SegmentationRequest(mr_node, model_card.id, device="cpu")
    job = logic.prepare(request)
    runner = logic.start(job)
    progress: list[tuple[float, str]] = []
    runner.progress.connect(lambda f, m: progress.append((f, m)))
    result = runner.wait(timeout=600)
    assert result.status == "succeeded", f"{result.message}\n{result.details}"
    assert result.done["device"] == "cpu" and result.done["source_matching"] is True
    assert result.done["model"] == model_card.id
    assert progress and progress[-1][0] == pytest.approx(1.0)
    # (the CLI throttles its lines to ~10 a second, so not every stage shows up)
    assert progress[0][1] == "Reading the input" and any(m.startswith("Segmenting (window") for _, m in progress)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions)

    file_labels, _ = read_seg_nrrd(job.output_path)  # what the process wrote: world geometry
    assert file_labels.array.any()  # some foreground, so the voxel-exact comparison below means something
    assert np.allclose(file_labels.ijk_to_ras(), to_parent @ _matrix(mr_node.GetIJKToRASMatrix), atol=1e-4)
    seg = logic.import_result(job, result)
    assert [s.GetName() for s in _segments(seg)] == model_card.labels.names()
    assert seg.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == folder
    exported = mrml.labelmap_from_segmentation(slicer_app.scene, seg, mr_node, model_card.labels)
    assert exported.shape == mrml.volume_from_node(mr_node).shape
    # the node holds exactly what the process computed (compared in world coordinates)
    from SRCSMSegmenterLib.image import Volume

    exported_world = Volume.from_ijk_to_ras(exported.array, to_parent @ exported.ijk_to_ras())
    same_labels_physically(exported_world, file_labels)
