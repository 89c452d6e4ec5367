"""MRML helpers on slicer-core, with real cases: exact volume round trips, transforms, preview node,
labelmap ⇄ segmentation with names/colours/terminology, .seg.nrrd loading."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from SRCSMSegmenterLib import mrml
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Geometry, Volume, read_volume
from SRCSMSegmenterLib.segio import BINARY_LABELMAP, CLOSED_SURFACE, segment_id, write_seg_nrrd


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _matrix(node_method) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node_method(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _linear_transform(scene, degrees=25.0, translation=(12.5, -30.0, 7.0)):
    """A vtkMRMLLinearTransformNode that rotates about an oblique axis and translates."""
    import vtk

    to_parent = np.eye(4)
    to_parent[:3, :3] = _rotation((1.0, 0.5, 0.25), degrees)
    to_parent[:3, 3] = translation
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, to_parent[r, c])
    node.SetMatrixTransformToParent(m)
    return node, to_parent


# ------------------------------------------------------------------------------------------ volumes

VOLUME_CASES = [
    ("Dataset502", "chaos_02", False),
    ("Dataset503", "pat_06", False),
    ("Dataset503", "pat_06", True),
]


@pytest.mark.parametrize("dataset,case,rotate", VOLUME_CASES,
                         ids=["mr-left-handed", "cardiac-oblique-left-handed", "rotated30-right-handed"])
def test_volume_node_round_trip_is_exact(slicer_app, real_case, dataset, case, rotate):
    import slicer

    image_path, _, _ = real_case(dataset, case)
    volume = read_volume(image_path)
    if rotate:
        volume = Volume(volume.array, Geometry(volume.geometry.origin, volume.geometry.spacing,
                                               tuple(_rotation((0.2, 0.3, 1.0), 30).ravel())))
    node = mrml.node_from_volume(slicer_app.scene, volume, "input")
    assert node.GetName() == "input" and node.GetDisplayNode() is not None
    assert np.array_equal(slicer.util.arrayFromVolume(node), volume.array)  # no slice reversal in memory
    assert np.allclose(_matrix(node.GetIJKToRASMatrix), volume.ijk_to_ras(), atol=1e-6)
    assert np.sign(np.linalg.det(_matrix(node.GetIJKToRASMatrix)[:3, :3])) == np.sign(
        np.linalg.det(volume.geometry.direction_matrix)) * 1.0  # handedness kept (LPS↔RAS flip has det +1)

    back = mrml.volume_from_node(node)
    assert back.array.dtype == volume.array.dtype and np.array_equal(back.array, volume.array)
    assert back.geometry.almost_equal(volume.geometry, tol=1e-6)
    assert np.allclose(back.ijk_to_ras(), volume.ijk_to_ras(), atol=1e-6)
    back.array[0, 0, 0] += 1  # a copy: the node is not changed through it
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == volume.array[0, 0, 0]


def test_volume_read_by_slicer_matches_physically(slicer_app, real_case, same_labels_physically):
    """A left-handed file loaded by Slicer's own reader gives the same physical volume as read_volume."""
    image_path, label_path, _ = real_case("Dataset502", "chaos_02")
    node = slicer_app.volumes.AddArchetypeVolume(str(label_path), "label", 1)
    from_slicer = mrml.volume_from_node(node)
    same_labels_physically(from_slicer, read_volume(label_path))


def test_world_geometry_under_a_linear_transform(slicer_app, real_case):
    image_path, _, _ = real_case("Dataset503", "pat_06")
    volume = read_volume(image_path)
    node = mrml.node_from_volume(slicer_app.scene, volume, "input")
    transform, to_parent = _linear_transform(slicer_app.scene)
    node.SetAndObserveTransformNodeID(transform.GetID())

    local = mrml.volume_from_node(node)
    world = mrml.volume_from_node(node, world=True)
    assert local.geometry.almost_equal(volume.geometry, tol=1e-6)
    assert np.allclose(world.ijk_to_ras(), to_parent @ volume.ijk_to_ras(), atol=1e-6)
    # a voxel's world position is the transformed local one (LPS in the Volume, RAS in MRML)
    ijk = np.array([[3.0, 100.0, 5.0], [191.0, 0.0, 8.0]])
    ras_local = (np.c_[ijk, np.ones(2)] @ volume.ijk_to_ras().T)
    ras_world = ras_local @ to_parent.T
    assert np.allclose(world.geometry.index_to_physical(ijk), ras_world[:, :3] * [-1, -1, 1], atol=1e-6)
    assert np.array_equal(world.array, volume.array)


def test_non_linear_transform_is_refused_with_the_fix(slicer_app, real_case):
    import vtk

    image_path, _, _ = real_case("Dataset503", "pat_06")
    node = mrml.node_from_volume(slicer_app.scene, read_volume(image_path), "input")
    warp = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in [((0, 0, 0), (0, 0, 0)), ((100, 0, 0), (100, 5, 0)), ((0, 100, 0), (0, 100, 9)),
                 ((0, 0, 100), (4, 0, 100)), ((50, 50, 50), (52, 49, 50))]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(q)
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    warp.SetBasisToR()
    transform = slicer_app.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform.SetAndObserveTransformToParent(warp)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert mrml.volume_from_node(node).shape == node.GetImageData().GetDimensions()[::-1]  # local is fine
    with pytest.raises(InputError, match="Harden"):
        mrml.volume_from_node(node, world=True)


def test_non_volume_nodes_are_refused(slicer_app):
    model = slicer_app.scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    with pytest.raises(InputError, match="scalar volume"):
        mrml.volume_from_node(model)
    empty = slicer_app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        mrml.volume_from_node(empty)


# ------------------------------------------------------------------------------------------ preview


def test_preview_node_is_created_then_reused_and_user_nodes_untouched(slicer_app, real_case):
    import slicer

    scene = slicer_app.scene
    image_path, _, _ = real_case("Dataset503", "pat_06")
    volume = read_volume(image_path)
    input_node = mrml.node_from_volume(scene, volume, "heart")
    transform, _ = _linear_transform(scene)
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    # a volume the user named exactly like the preview, by hand
    user_node = mrml.node_from_volume(scene, volume.with_array(np.zeros_like(volume.array)),
                                      "heart (source-matched)")
    user_mtime = user_node.GetImageData().GetMTime()
    # subject hierarchy: the input lives in a folder
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 6")
    sh.CreateItem(folder, input_node)

    matched = volume.with_array(volume.array.astype(np.float32) * 0.5)
    first = mrml.update_preview_node(scene, input_node, matched)
    assert first.GetID() != user_node.GetID()
    assert first.GetAttribute(mrml.PREVIEW_ATTRIBUTE) == input_node.GetID()
    assert first.GetName().startswith("heart (source-matched)")
    assert first.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(first)) == folder
    assert np.array_equal(slicer.util.arrayFromVolume(first), matched.array)
    assert np.allclose(_matrix(first.GetIJKToRASMatrix), volume.ijk_to_ras(), atol=1e-6)

    again = volume.with_array(volume.array.astype(np.float32) * 2.0)
    second = mrml.update_preview_node(scene, input_node, again)
    assert second.GetID() == first.GetID()
    assert np.array_equal(slicer.util.arrayFromVolume(second), again.array)
    assert len([n for n in mrml._nodes_by_class(scene, "vtkMRMLScalarVolumeNode")
                if n.GetAttribute(mrml.PREVIEW_ATTRIBUTE)]) == 1

    # the user's node: same name, same voxels, never written
    assert user_node.GetName() == "heart (source-matched)"
    assert user_node.GetAttribute(mrml.PREVIEW_ATTRIBUTE) is None
    assert user_node.GetImageData().GetMTime() == user_mtime
    assert not np.any(slicer.util.arrayFromVolume(user_node))


def test_preview_given_in_world_coordinates_lands_on_the_input(slicer_app, real_case):
    import slicer

    image_path, _, _ = real_case("Dataset503", "pat_06")
    input_node = mrml.node_from_volume(slicer_app.scene, read_volume(image_path), "heart")
    transform, _ = _linear_transform(slicer_app.scene)
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    world = mrml.volume_from_node(input_node, world=True)  # what the pipeline works on
    preview = mrml.update_preview_node(slicer_app.scene, input_node, world.with_array(world.array * 2))
    # same local grid as the input, under the same transform: displayed exactly on top of it
    assert np.allclose(_matrix(preview.GetIJKToRASMatrix), _matrix(input_node.GetIJKToRASMatrix), atol=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(preview), world.array * 2)


# ------------------------------------------------------------------------------------ segmentations

SEG_CASES = [("Dataset503", "pat_06"), ("Dataset502", "chaos_02")]


def _check_segments(node, table):
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(table.labels)
    assert segmentation.GetNumberOfLayers() == 1
    for label in table.labels:
        segment = segmentation.GetSegment(segment_id(label.value))
        assert segment is not None, label.name
        assert segment.GetName() == label.name
        assert np.allclose(segment.GetColor(), label.color, atol=1e-6)
        assert segment.GetLabelValue() == label.value
        assert segment.GetTerminology() == label.terminology.to_slicer_string()
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        assert segment.GetRepresentation(BINARY_LABELMAP) is not None
        assert segment.GetRepresentation(CLOSED_SURFACE) is not None  # 3D surface created
    assert node.GetDisplayNode() is not None


@pytest.mark.parametrize("dataset,case", SEG_CASES, ids=["cardiac-oblique", "mr-left-handed"])
def test_segmentation_from_labelmap_round_trip(slicer_app, real_case, same_labels_physically, dataset, case):
    scene = slicer_app.scene
    image_path, label_path, table = real_case(dataset, case)
    # the input loaded by Slicer's own reader (which reverses slices of left-handed files) and the
    # prediction as the pipeline produces it (read with SimpleITK): different arrays, same anatomy
    input_node = slicer_app.volumes.AddArchetypeVolume(str(image_path), "input")
    labelmap = read_volume(label_path)
    absent = table.labels[-1].value
    labelmap = labelmap.with_array(np.where(labelmap.array == absent, 0, labelmap.array).astype(np.uint8))

    node = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node)
    assert node.GetName() == "input segmentation"
    _check_segments(node, table)  # the absent label is still there, as an empty segment
    # the segments lie exactly on the input's voxel grid (re-laid if the reader reversed slices)
    layer = node.GetSegmentation().GetSegment(segment_id(1)).GetRepresentation(BINARY_LABELMAP)
    assert np.allclose(_matrix(layer.GetImageToWorldMatrix), _matrix(input_node.GetIJKToRASMatrix), atol=1e-6)
    reference = node.GetSegmentation().GetConversionParameter("Reference image geometry")
    slicer_reference = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    slicer_reference.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    assert reference == slicer_reference.GetSegmentation().GetConversionParameter("Reference image geometry")

    exported = mrml.labelmap_from_segmentation(scene, node, input_node, table)
    input_volume = mrml.volume_from_node(input_node)
    assert exported.shape == input_volume.shape
    assert exported.geometry.almost_equal(input_volume.geometry, tol=1e-6)
    assert not np.any(exported.array == absent)
    same_labels_physically(exported, labelmap)  # original label values, same places
    # the temporary export nodes are gone
    assert not [n for n in mrml._nodes_by_class(scene, "vtkMRMLLabelMapVolumeNode")]
    assert not [n for n in mrml._nodes_by_class(scene, "vtkMRMLColorTableNode")
                if n.GetName().startswith("SRCSM export")]


def test_segmentation_follows_the_input_transform(slicer_app, real_case, same_labels_physically):
    scene = slicer_app.scene
    image_path, label_path, table = real_case("Dataset503", "pat_06")
    input_node = mrml.node_from_volume(scene, read_volume(image_path), "heart")
    transform, _ = _linear_transform(scene)
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    labelmap = read_volume(label_path)

    local = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node)
    assert local.GetTransformNodeID() == transform.GetID()
    same_labels_physically(mrml.labelmap_from_segmentation(scene, local, input_node, table), labelmap)

    # the same prediction in world coordinates (as computed from volume_from_node(world=True))
    world_geometry = mrml.volume_from_node(input_node, world=True).geometry
    world = mrml.segmentation_from_labelmap(scene, Volume(labelmap.array, world_geometry), table, input_node)
    assert world.GetTransformNodeID() == transform.GetID()
    same_labels_physically(mrml.labelmap_from_segmentation(scene, world, input_node, table), labelmap)
    # and its voxels sit at the transformed positions in the world
    segment_image = world.GetSegmentation().GetSegment(segment_id(1)).GetRepresentation(BINARY_LABELMAP)
    m = _matrix(segment_image.GetImageToWorldMatrix)
    assert np.allclose(m, _matrix(input_node.GetIJKToRASMatrix), atol=1e-6)


def test_existing_segmentation_is_not_overwritten_unless_asked(slicer_app, real_case):
    scene = slicer_app.scene
    image_path, label_path, table = real_case("Dataset503", "pat_06")
    input_node = mrml.node_from_volume(scene, read_volume(image_path), "heart")
    labelmap = read_volume(label_path)
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my edits")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("hand-drawn", "hand-drawn", [1.0, 0.0, 0.0])

    with pytest.raises(InputError, match="already has 1 segment.*overwrit"):
        mrml.segmentation_from_labelmap(scene, labelmap, table, input_node, segmentation_node=mine)
    assert mine.GetSegmentation().GetNumberOfSegments() == 1
    assert mine.GetSegmentation().GetSegment("hand-drawn") is not None

    out = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node, segmentation_node=mine,
                                          overwrite=True)
    assert out.GetID() == mine.GetID() and out.GetName() == "my edits"
    _check_segments(out, table)
    assert out.GetSegmentation().GetSegment("hand-drawn") is None

    # an existing but empty segmentation is simply filled; a second run makes a new node
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert mrml.segmentation_from_labelmap(scene, labelmap, table, input_node, empty).GetID() == empty.GetID()
    first = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node)
    second = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node)
    assert first.GetID() != second.GetID()


def test_bad_labelmaps_are_refused(slicer_app, real_case):
    image_path, label_path, table = real_case("Dataset503", "pat_06")
    input_node = mrml.node_from_volume(slicer_app.scene, read_volume(image_path), "heart")
    labelmap = read_volume(label_path)
    array = labelmap.array.copy()
    array[0, 0, 0] = 9
    with pytest.raises(InputError, match="does not define"):
        mrml.segmentation_from_labelmap(slicer_app.scene, labelmap.with_array(array), table, input_node)
    model = slicer_app.scene.AddNewNodeByClass("vtkMRMLModelNode")
    with pytest.raises(InputError, match="not a segmentation"):
        mrml.segmentation_from_labelmap(slicer_app.scene, labelmap, table, input_node,
                                        segmentation_node=model)


def test_load_seg_nrrd_written_by_the_cli(slicer_app, real_case, tmp_path, same_labels_physically):
    scene = slicer_app.scene
    image_path, label_path, table = real_case("Dataset502", "chaos_02")
    input_node = slicer_app.volumes.AddArchetypeVolume(str(image_path), "chaos")
    labelmap = read_volume(label_path)
    path = write_seg_nrrd(labelmap, table, tmp_path / "result.seg.nrrd")

    node = mrml.load_seg_nrrd(scene, path, input_node, table)
    assert node.GetName() == "chaos segmentation"
    _check_segments(node, table)
    same_labels_physically(mrml.labelmap_from_segmentation(scene, node, input_node, table), labelmap)

    _, _, other_table = real_case("Dataset503", "pat_06")  # a different model's labels
    with pytest.raises(InputError, match="another model"):
        mrml.load_seg_nrrd(scene, path, input_node, other_table)


def test_no_global_scene_or_modules_needed(slicer_app, real_case, monkeypatch, same_labels_physically):
    """Library code takes the scene explicitly: it works with slicer.mrmlScene / slicer.modules gone."""
    import slicer

    monkeypatch.delattr(slicer, "mrmlScene")
    monkeypatch.delattr(slicer, "modules")
    scene = slicer_app.scene
    image_path, label_path, table = real_case("Dataset503", "pat_06")
    volume = read_volume(image_path)
    input_node = mrml.node_from_volume(scene, volume, "heart")
    mrml.update_preview_node(scene, input_node, volume)
    labelmap = read_volume(label_path)
    node = mrml.segmentation_from_labelmap(scene, labelmap, table, input_node)
    same_labels_physically(mrml.labelmap_from_segmentation(scene, node, input_node, table), labelmap)


def test_library_imports_without_slicer_or_vtk():
    code = ("import sys\n"
            "for name in ('slicer', 'vtk', 'vtkmodules', 'qt', 'ctk'):\n"
            "    sys.modules[name] = None  # any import of them now fails\n"
            "import SRCSMSegmenterLib, SRCSMSegmenterLib.segio, SRCSMSegmenterLib.mrml\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_labelmap_on_a_reordered_grid_lands_exactly_on_the_input_grid(slicer_app, real_case):
    """A prediction whose axes run differently (swapped I/J, reversed K) is re-laid, not resampled."""
    from vtkmodules.util import numpy_support

    image_path, label_path, table = real_case("Dataset503", "pat_06")
    input_node = mrml.node_from_volume(slicer_app.scene, read_volume(image_path), "heart")
    labelmap = read_volume(label_path)
    g = labelmap.geometry
    d, (si, sj, sk) = g.direction_matrix, g.spacing
    k_last = np.asarray(g.origin) + d[:, 2] * sk * (labelmap.shape[0] - 1)
    reordered = Volume(
        np.ascontiguousarray(labelmap.array[::-1].transpose(0, 2, 1)),  # K reversed, I and J swapped
        Geometry(tuple(k_last), (sj, si, sk), tuple(np.c_[d[:, 1], d[:, 0], -d[:, 2]].ravel())),
    )
    node = mrml.segmentation_from_labelmap(slicer_app.scene, reordered, table, input_node)
    layer = node.GetSegmentation().GetSegment(segment_id(1)).GetRepresentation(BINARY_LABELMAP)
    assert np.allclose(_matrix(layer.GetImageToWorldMatrix), _matrix(input_node.GetIJKToRASMatrix), atol=1e-6)
    assert layer.GetExtent() == (0, labelmap.shape[2] - 1, 0, labelmap.shape[1] - 1, 0, labelmap.shape[0] - 1)
    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(labelmap.shape)
    assert np.array_equal(voxels, labelmap.array)
