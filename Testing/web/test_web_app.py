"""The web app object driven headless: load, preview, segment, edit, save — on a real MR case.

No browser: the controllers the page calls are called directly, and the segment editor is driven
through the axial view's own VTK interactor (the events a browser drag becomes on the server).
Geometry is checked physically (world coordinates), against the file read by SimpleITK.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the 'web' extra is not installed (pip install -e '.[web]')")

from SRCSMSegmenterLib import mrml  # noqa: E402
from SRCSMSegmenterLib.catalog import Catalog  # noqa: E402
from SRCSMSegmenterLib.image import read_volume  # noqa: E402
from SRCSMSegmenterLib.matching import match  # noqa: E402
from SRCSMSegmenterLib.segio import read_seg_nrrd  # noqa: E402

_names = itertools.count()
#: The bundled model the page segments with (trained on CT; source matching maps the MR onto it).
BUNDLED_MODEL = "abdomen-ct-srcsm"


@pytest.fixture
def app(mr_data_dir):
    from SRCSMSegmenterLib.web.app import create_app
    from trame.app import get_server

    web = create_app(mr_data_dir, max_upload_bytes=4 * 2**20,
                     server=get_server(f"srcsm_test_{next(_names)}", client_type="vue3"))
    yield web
    web.workflow.cancel()
    web.scene.Clear(1)


def _world_points(volume, mask):
    kji = np.argwhere(mask)
    return volume.geometry.index_to_physical(kji[:, ::-1].astype(float))  # LPS mm


def _drag(view, start, end, steps=15):
    """A left-button drag across ``view`` in relative window coordinates (what a browser drag sends)."""
    w, h = view.render_window().GetSize()
    it = view.interactor()

    def event(name, x, y):
        it.SetEventInformation(int(x * w), int(y * h), 0, 0)
        it.InvokeEvent(name)

    event("MouseMoveEvent", *start)
    event("LeftButtonPressEvent", *start)
    for t in np.linspace(0.0, 1.0, steps):
        event("MouseMoveEvent", start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
    event("LeftButtonReleaseEvent", *end)


def test_load_preview_segment_edit_save(app, mr_data_dir, mr_relative, real_case):
    from SRCSMSegmenterLib.web.app import INPUT_VIEW, MATCHED_VIEW
    from trame_slicer.segmentation import SegmentationEffectPaint

    st = app.state
    assert st["srcsm_files"] == [mr_relative]
    assert st["srcsm_model"] == BUNDLED_MODEL and "liver" in st["srcsm_model_card"]
    source = read_volume(mr_data_dir / mr_relative)

    # Load: the node holds the file's voxels at the file's world positions.
    node = app.load(mr_relative)
    assert st["srcsm_error"] == "" and "Loaded" in st["srcsm_info"]
    loaded = mrml.volume_from_node(node)
    assert loaded.geometry.almost_equal(source.geometry) and np.array_equal(loaded.array, source.array)
    assert app.view(INPUT_VIEW).get_background_volume_id() == node.GetID()

    # Preview: the matched node is the pipeline's own match(), shown in the linked second view.
    result = app.preview()
    assert st["srcsm_error"] == "" and st["srcsm_previewed"]
    profile = Catalog().resolve(BUNDLED_MODEL).card.source_profile
    expected = match(source, profile, "MR")
    shown = mrml.volume_from_node(result.node)
    assert shown.geometry.almost_equal(source.geometry)
    assert np.allclose(shown.array, expected.array)
    assert app.view(MATCHED_VIEW).get_background_volume_id() == result.node.GetID()
    for key, series in (("srcsm_chart_before", 1), ("srcsm_chart_after", 2), ("srcsm_chart_curve", 1)):
        assert st[key].startswith("<svg") and st[key].count('class="srcsm-series"') == series
    red, matched = app.view(INPUT_VIEW), app.view(MATCHED_VIEW)
    red.set_slice_value(red.get_slice_value() + 2 * source.geometry.spacing[2])
    assert matched.get_slice_value() == pytest.approx(red.get_slice_value())  # linked, in mm
    matched.set_slice_value(matched.get_slice_value() - source.geometry.spacing[2])
    assert red.get_slice_value() == pytest.approx(matched.get_slice_value())

    # Segment in the background process; the page's state follows it.
    assert app.segment()
    assert st["srcsm_job_status"] == "running"
    assert app.wait_job(timeout=600) == "succeeded", st["srcsm_error"]
    assert st["srcsm_segmented"] and "Segmented" in st["srcsm_info"]
    labels = Catalog().resolve(BUNDLED_MODEL).card.labels
    editor = app.segmentation_editor
    assert editor.get_segment_names() == labels.names()
    assert editor.active_segmentation_node is app.workflow.segmentation_node
    # A real result: the liver overlaps the expert's liver (CT model on MR, with source matching).
    _, label_path, _ = real_case("Dataset502", "chaos_01")
    reference = read_volume(label_path)
    liver = mrml.labelmap_from_segmentation(app.scene, app.workflow.segmentation_node, node, labels)
    inter = np.logical_and(liver.array == 1, reference.array == 1).sum()
    dice = 2 * inter / ((liver.array == 1).sum() + (reference.array == 1).sum())
    assert dice > 0.6, dice

    # Save the unedited result, then paint across the axial view with the Paint effect.
    first = app.save()
    assert first is not None and first.segmentation.name == "chaos_01_0000_srcsm.seg.nrrd"
    before, _ = read_seg_nrrd(first.segmentation)
    editor.set_active_segment_id("Segment_1")  # liver
    editor.set_active_effect_type(SegmentationEffectPaint)
    slice_s = red.get_slice_value()  # the axial plane's S coordinate (RAS mm)
    _drag(red, (0.3, 0.5), (0.7, 0.5))
    assert app.segment_editor_logic.data.can_undo or app.segment_editor_logic._undo_stack.can_undo()

    # Undo/redo of the stroke.
    stack = app.segment_editor_logic._undo_stack
    painted_count = int((editor.get_segment_labelmap("Segment_1", as_numpy_array=True) > 0).sum())
    stack.undo()
    assert int((editor.get_segment_labelmap("Segment_1", as_numpy_array=True) > 0).sum()) < painted_count
    stack.redo()
    assert int((editor.get_segment_labelmap("Segment_1", as_numpy_array=True) > 0).sum()) == painted_count

    assert st["srcsm_save_name"] == "chaos_01_0000_srcsm-2"  # never the name just used
    second = app.save()
    assert second is not None and "Saved chaos_01_0000_srcsm-2.seg.nrrd" in st["srcsm_saved"]
    after, segments = read_seg_nrrd(second.segmentation)
    assert [s["name"] for s in segments] == labels.names()
    assert after.geometry.almost_equal(source.geometry) and after.shape == source.shape
    plain = read_volume(second.labelmap)
    assert plain.geometry.almost_equal(source.geometry) and np.array_equal(plain.array, after.array)
    # The painted voxels: liver now, not before, on the painted axial plane, across the body.
    new = (after.array == 1) & (before.array != 1)
    assert new.sum() > 50
    world = _world_points(after, new)
    s_ras = world[:, 2]
    assert np.abs(s_ras - slice_s).min() < source.geometry.spacing[2]  # the stroke's plane holds painted voxels
    assert np.ptp(world[:, 0]) > 60  # a stroke across 40 % of the view: several cm left to right
    changed_elsewhere = (after.array != before.array) & ~new
    assert np.all(after.array[changed_elsewhere] == 1)  # painting only ever adds liver

    # Saving under an existing name asks first and changes nothing; confirming replaces.
    content = first.segmentation.read_bytes()
    st["srcsm_save_name"] = "chaos_01_0000_srcsm"
    assert app.save() is None
    assert "already exist" in st["srcsm_overwrite_question"]
    assert first.segmentation.read_bytes() == content
    replaced = app.save(True)
    assert replaced is not None and st["srcsm_overwrite_question"] == ""
    again, _ = read_seg_nrrd(first.segmentation)
    assert np.array_equal(again.array, after.array)
    leftovers = [p.name for p in mr_data_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers  # atomic writes leave no temporary file


def test_failed_job_shows_the_error_and_writes_nothing(app, mr_data_dir, mr_relative):
    app.load(mr_relative)
    app.state["srcsm_device"] = "gpu"  # this machine has none: the background process refuses
    assert app.segment()
    assert app.wait_job(timeout=300) == "failed"
    st = app.state
    assert "GPU" in st["srcsm_error"] and st["srcsm_job_status"] == "failed"
    assert not st["srcsm_segmented"]
    assert sorted(p.name for p in mr_data_dir.iterdir()) == ["imagesTr"]
    assert app.save() is None and "Segment the volume first" in st["srcsm_error"]


def test_cancel_stops_the_job_and_loads_nothing(app, mr_relative):
    app.load(mr_relative)
    assert app.segment()
    app.cancel()
    assert app.wait_job(timeout=120) == "cancelled"
    assert "Cancelled" in app.state["srcsm_job_message"]
    assert app.workflow.segmentation_node is None
    assert all(n.GetSegmentation().GetNumberOfSegments() == 0
               for n in app.scene.GetNodesByClass("vtkMRMLSegmentationNode"))


def test_a_second_job_while_one_runs_is_refused(app, mr_relative):
    app.load(mr_relative)
    assert app.segment()
    assert not app.segment()
    assert "already running" in app.state["srcsm_error"]
    assert app.load(mr_relative) is None and "running" in app.state["srcsm_error"]
    app.cancel()
    app.wait_job(timeout=120)


def test_upload_and_bad_paths(app, mr_data_dir, mr_relative):
    content = (mr_data_dir / mr_relative).read_bytes()
    relative = app.upload([{"name": "from browser.nii.gz", "size": len(content), "content": content}])
    assert relative == "uploads/from browser.nii.gz"
    assert app.state["srcsm_loaded"] == relative and relative in app.state["srcsm_files"]
    loaded = mrml.volume_from_node(app.workflow.input_node)
    assert loaded.geometry.almost_equal(read_volume(mr_data_dir / mr_relative).geometry)

    big = content + b"\0" * (3 * 2**20)
    assert app.upload([{"name": "big.nii.gz", "size": len(big), "content": big}]) is None
    assert "upload limit" in app.state["srcsm_error"]
    scene_nodes = app.scene.GetNumberOfNodes()
    for bad in ("../../etc/passwd", "/etc/passwd"):
        assert app.load(bad) is None
        assert "data folder" in app.state["srcsm_error"] or "absolute" in app.state["srcsm_error"]
    assert app.scene.GetNumberOfNodes() == scene_nodes  # a refused path clears nothing
    assert app.state["srcsm_loaded"] == relative

    # A damaged file: the reader's words (what is wrong, what to do), nothing loaded.
    (mr_data_dir / "damaged.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)  # broken gzip
    assert app.load("damaged.nii.gz") is None
    assert "damaged.nii.gz" in app.state["srcsm_error"] and "re-export" in app.state["srcsm_error"]
    assert app.state["srcsm_loaded"] == relative


def test_an_unexpected_failure_reaches_the_page(app, mr_relative, monkeypatch):
    """The page's actions never fail silently: a bug becomes a message asking for a report."""
    app.load(mr_relative)

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(app.workflow, "preview", broken)
    app.ctrl.srcsm_preview()
    assert "Unexpected error: ZeroDivisionError" in app.state["srcsm_error"]
    assert "report" in app.state["srcsm_error"]


def test_dicom_series_folder_loads_at_the_same_world_positions(app, mr_data_dir, mr_relative):
    import SimpleITK as sitk

    source = read_volume(mr_data_dir / mr_relative)
    image = source.to_sitk()[:, :, :8]
    series = mr_data_dir / "dicom_series"
    series.mkdir()
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        for tag, value in (("0008|0060", "MR"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.11"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.12"), ("0020|0013", str(k)),
                           ("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6],
                                                              direction[1], direction[4], direction[7])))),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{k:03d}.dcm"))
        writer.Execute(sl)
    app.refresh_files()
    assert "dicom_series/" in app.state["srcsm_files"]
    node = app.load("dicom_series/")
    assert node is not None, app.state["srcsm_error"]
    loaded = mrml.volume_from_node(node)
    # Compare physically: every loaded voxel holds the source's value at the same world point.
    kji = np.argwhere(np.ones(loaded.shape, bool))[::997]
    world = loaded.geometry.index_to_physical(kji[:, ::-1].astype(float))
    ijk = np.rint(source.geometry.physical_to_index(world)).astype(int)
    assert np.array_equal(loaded.array[tuple(kji.T)], source.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]])


def test_editor_effects_on_the_result(app, mr_relative):
    """Erase, islands and smoothing of trame-slicer's editor act on the model's segmentation; undo restores."""
    from scipy import ndimage
    from SRCSMSegmenterLib.web.app import INPUT_VIEW
    from trame_slicer.segmentation import (
        SegmentationEffectErase,
        SegmentationEffectIslands,
        SegmentationEffectSmoothing,
    )

    app.load(mr_relative)
    assert app.segment() and app.wait_job(timeout=600) == "succeeded", app.state["srcsm_error"]
    editor, stack = app.segmentation_editor, app.segment_editor_logic._undo_stack

    def mask(sid="Segment_1"):
        return editor.get_segment_labelmap(sid, as_numpy_array=True) > 0

    start = mask()
    editor.set_active_segment_id("Segment_1")
    editor.set_active_effect_type(SegmentationEffectErase)
    _drag(app.view(INPUT_VIEW), (0.1, 0.5), (0.9, 0.5))
    erased = mask()
    assert erased.sum() < start.sum() and not np.any(erased & ~start)  # erasing only removes

    islands = editor.set_active_effect_type(SegmentationEffectIslands)
    islands.keep_largest_island()
    largest = mask()
    assert ndimage.label(largest)[1] == 1 and not np.any(largest & ~erased)

    smoothing = editor.set_active_effect_type(SegmentationEffectSmoothing)
    smoothing.apply_median_smoothing(9.0, "Segment_1")
    assert not np.array_equal(mask(), largest)

    for _ in range(3):
        stack.undo()
    assert np.array_equal(mask(), start)
