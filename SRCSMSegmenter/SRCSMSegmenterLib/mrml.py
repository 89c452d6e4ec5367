"""MRML helpers: volume nodes ⇄ :class:`~.image.Volume`, labelmaps ⇄ segmentation nodes.

Every function takes the scene explicitly and never touches ``slicer.mrmlScene``, ``slicer.app``,
``slicer.modules`` or Qt, so the same code serves the Slicer module, tests on ``slicer-core`` and a
trame-slicer web front end. ``slicer`` and ``vtk`` are imported lazily, inside the functions: importing
``SRCSMSegmenterLib`` (e.g. by the ``srcsm`` command) must never require them.

Geometry conventions
--------------------
A node's IJK→RAS matrix is converted to the LPS geometry of a :class:`Volume` exactly (LPS = diag(-1,-1,1)
· RAS), keeping left-handed matrices as they are, so voxel arrays are never reordered in memory.

A labelmap or preview handed back for an input node is placed under the input's parent transform,
on the input's own voxel grid whenever it lies on that grid: in the node's local frame (as
:func:`volume_from_node` returns it) or in world coordinates (``volume_from_node(node, world=True)``,
what the pipeline works on when the input sits under a transform), with axes possibly reversed or
permuted (a left-handed file read by SimpleITK versus by Slicer). Its voxels are then re-laid exactly
onto the input grid — never interpolated. A volume on any other grid is kept as is, in the input
node's local frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError
from .image import Volume
from .labels import LabelTable
from .segio import BINARY_LABELMAP, TERMINOLOGY_TAG, labelmap_as_uint8, read_seg_nrrd, segment_id

#: Attribute marking the preview volume this module created, valued with the input node's ID.
PREVIEW_ATTRIBUTE = "SRCSMSegmenter.PreviewOf"
#: Suffix of the preview volume's name.
PREVIEW_SUFFIX = " (source-matched)"
#: Suffix of a new output segmentation's name.
SEGMENTATION_SUFFIX = " segmentation"


def _slicer() -> Any:
    """Import ``slicer`` on first use, with a message that says what is missing."""
    try:
        import slicer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "This function needs 3D Slicer's MRML library: run it inside Slicer, or install the "
            "'slicer-core' package (pip install 'srcsm-segmenter[slicer]')."
        ) from exc
    return slicer


def _vtk_matrix(array: np.ndarray) -> Any:
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _np_matrix(matrix: Any) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _node_label(node: Any) -> str:
    return f"'{node.GetName()}'" if node is not None and node.GetName() else "the node"


def _require_volume_node(node: Any, what: str = "The input", voxels: bool = False) -> None:
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName() if node is not None else "nothing"
        raise InputError(f"{what} must be a scalar volume node, got {kind}. Select a grey-value volume.")
    if voxels and (node.GetImageData() is None or node.GetImageData().GetNumberOfPoints() == 0):
        raise InputError(f"Volume {_node_label(node)} has no voxels (no image data). Load or select "
                         f"a volume that shows in the slice views.")


# ------------------------------------------------------------------------------------- geometry


def _local_ijk_to_ras(node: Any) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _np_matrix(m)


def transform_to_world(node: Any) -> np.ndarray:
    """4×4 matrix taking the node's local RAS coordinates to world RAS (identity without a transform).

    Raises :class:`InputError` for a non-linear (warping) transform: a voxel grid cannot follow it.
    """
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{_node_label(node)} is under the non-linear transform '{parent.GetName()}', which a voxel "
            f"grid cannot follow. Harden the transform on the volume first (Data module: right-click "
            f"the volume → 'Harden transform'), then try again."
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _np_matrix(m)


def _checked_volume(array: np.ndarray, ijk_to_ras: np.ndarray, node: Any) -> Volume:
    volume = Volume.from_ijk_to_ras(array, ijk_to_ras)
    d = volume.geometry.direction_matrix
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise InputError(
            f"The transform above {_node_label(node)} shears or scales the volume unevenly, so it no "
            f"longer has a regular voxel grid. Harden the transform and resample the volume "
            f"(Resample Scalar/Vector/DWI Volume), then try again."
        )
    return volume


def volume_from_node(node: Any, world: bool = False) -> Volume:
    """The node's voxels (a copy, K,J,I) and geometry as a :class:`Volume`.

    ``world=False`` gives the node's own geometry (its IJK→RAS matrix); ``world=True`` applies the
    parent transforms, giving where the voxels are actually displayed — what the anatomy-aware
    pipeline needs when a volume has been moved by a (linear) transform.
    """
    slicer = _slicer()
    _require_volume_node(node, voxels=True)
    image = node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume {_node_label(node)} has {image.GetNumberOfScalarComponents()} components per voxel "
            f"(colour or vector). Segmentation needs a scalar volume; extract one component first "
            f"(Vector to Scalar Volume module)."
        )
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    ijk_to_ras = _local_ijk_to_ras(node)
    if world:
        ijk_to_ras = transform_to_world(node) @ ijk_to_ras
    return _checked_volume(array, ijk_to_ras, node)


def _vtk_friendly(array: np.ndarray) -> np.ndarray:
    """VTK renders 64-bit integer volumes wrongly (slicer.util refuses them) and has no bool."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        lo, hi = (array.min(), array.max()) if array.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
        return array.astype(np.float64)
    return array


def node_from_volume(scene: Any, volume: Volume, name: str, node: Any = None) -> Any:
    """Put ``volume`` into ``node`` (a new ``vtkMRMLScalarVolumeNode`` named ``name`` if None).

    The voxels are copied unchanged and the IJK→RAS matrix set exactly (left-handed ones included).
    An existing node keeps its name, display settings and transform.
    """
    slicer = _slicer()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    else:
        _require_volume_node(node, "The target node")
    array = np.ascontiguousarray(_vtk_friendly(np.asarray(volume.array)))
    if array.ndim != 3:
        raise InputError(f"A volume node needs a 3D array; got shape {array.shape}.")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras()))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _index_map(m_from: np.ndarray, shape_from: tuple[int, ...], m_to: np.ndarray,
               shape_to: tuple[int, ...]) -> tuple[list[int], list[bool]] | None:
    """How to re-lay an array from grid ``from`` onto grid ``to`` when both have the same voxel centres.

    Readers may run an axis the other way (Slicer reverses the slices of left-handed files) or
    permute axes; then the voxels are identical and only their order differs. Returns, for each
    I,J,K axis of ``to``, the axis of ``from`` it comes from and whether it runs reversed — or None
    if the grids differ.
    """
    a = np.linalg.inv(m_from) @ m_to  # index in "to" -> index in "from"
    p = np.rint(a[:3, :3])
    if not np.allclose(a[:3, :3], p, atol=1e-4) or not (
            np.all(np.abs(p).sum(axis=0) == 1) and np.all(np.abs(p).sum(axis=1) == 1)):
        return None
    if not np.allclose(a[:3, 3], np.rint(a[:3, 3]), atol=1e-3):
        return None
    t = np.rint(a[:3, 3]).astype(int)
    size_from, size_to = tuple(shape_from)[::-1], tuple(shape_to)[::-1]  # I,J,K sizes
    axes, flips = [], []
    for axis in range(3):
        source = int(np.argmax(np.abs(p[:, axis])))
        reverse = bool(p[source, axis] < 0)
        if size_from[source] != size_to[axis] or t[source] != (size_from[source] - 1 if reverse else 0):
            return None
        axes.append(source)
        flips.append(reverse)
    return axes, flips


def _relayout(array_kji: np.ndarray, axes: list[int], flips: list[bool]) -> np.ndarray:
    out = np.asarray(array_kji).transpose(2, 1, 0).transpose(axes)  # I,J,K order of the target grid
    for axis, reverse in enumerate(flips):
        if reverse:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def _node_shape(node: Any) -> tuple[int, int, int]:
    dims = node.GetImageData().GetDimensions() if node.GetImageData() is not None else (0, 0, 0)
    return dims[2], dims[1], dims[0]


def _onto_input_grid(volume: Volume, input_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and local IJK→RAS to show ``volume`` with ``input_node`` (under the same transform).

    A volume on the input's grid — in its local frame, or in world coordinates as
    ``volume_from_node(input_node, world=True)`` gives it, with axes possibly reversed — is re-laid
    exactly onto the input node's own grid, so that the result matches the input voxel for voxel.
    Any other grid is kept as it is and read in the input's local frame.
    """
    local = _local_ijk_to_ras(input_node)
    frames = [local]
    if input_node.GetParentTransformNode() is not None:
        try:
            frames.append(transform_to_world(input_node) @ local)
        except InputError:
            pass  # under a warping transform, only the local frame is meaningful
    matrix = volume.ijk_to_ras()
    for frame in frames:
        mapping = _index_map(matrix, volume.shape, frame, _node_shape(input_node))
        if mapping is not None:
            return _relayout(volume.array, *mapping), local
    return np.asarray(volume.array), matrix


# -------------------------------------------------------------------------------- scene helpers


def _nodes_by_class(scene: Any, class_name: str) -> list[Any]:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return nodes


def _place_next_to(scene: Any, node: Any, input_node: Any) -> None:
    """Put ``node`` in the same subject-hierarchy folder/study as ``input_node`` (if there is one).

    Headless scenes without a hierarchy, or inputs without a hierarchy item, are left alone.
    """
    slicer = _slicer()
    hierarchies = _nodes_by_class(scene, "vtkMRMLSubjectHierarchyNode")
    if not hierarchies:
        return
    sh = slicer.vtkMRMLSubjectHierarchyNode.SafeDownCast(hierarchies[0])
    input_item = sh.GetItemByDataNode(input_node)
    if not input_item:
        return
    parent = sh.GetItemParent(input_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def find_preview_node(scene: Any, input_node: Any) -> Any:
    """The source-matched preview this module made for ``input_node`` earlier, or None.

    Found by :data:`PREVIEW_ATTRIBUTE`, never by name, so a user's volume that happens to carry the
    same name is never overwritten.
    """
    for node in _nodes_by_class(scene, "vtkMRMLScalarVolumeNode"):
        if node.GetAttribute(PREVIEW_ATTRIBUTE) == input_node.GetID():
            return node
    return None


def update_preview_node(scene: Any, input_node: Any, matched: Volume) -> Any:
    """Show ``matched`` (the source-matched input) as "<input> (source-matched)", reusing our node.

    The node lies under the input's parent transform and next to it in the subject hierarchy, so
    the two can be compared side by side.
    """
    _require_volume_node(input_node, voxels=True)
    node = find_preview_node(scene, input_node)
    if node is None:
        name = scene.GenerateUniqueName(f"{input_node.GetName()}{PREVIEW_SUFFIX}")
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetAttribute(PREVIEW_ATTRIBUTE, input_node.GetID())
    voxels, ijk_to_ras = _onto_input_grid(matched, input_node)
    node_from_volume(scene, Volume.from_ijk_to_ras(voxels, ijk_to_ras), node.GetName(), node=node)
    node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    display = node.GetDisplayNode()
    if display is not None and hasattr(display, "AutoWindowLevelOn"):
        display.AutoWindowLevelOn()  # the matched intensities live in the source's range, not the input's
    _place_next_to(scene, node, input_node)
    return node


# ------------------------------------------------------------------------------- segmentations


def _ensure_converters() -> None:
    """Register Slicer's labelmap⇄surface converters if nobody has (Slicer does it at start-up via the
    Segmentations module; a bare slicer-core scene may not have them)."""
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _oriented_image(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """A ``vtkOrientedImageData`` (uint8) holding ``voxels`` (K,J,I) at ``ijk_to_ras``."""
    import vtk
    from vtkmodules.util import numpy_support

    slicer = _slicer()
    image = slicer.vtkOrientedImageData()
    k, j, i = voxels.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)
    target[:] = voxels
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return image


def _set_terminology(segment: Any, entry: str) -> None:
    if hasattr(segment, "SetTerminology"):  # Slicer ≥ 5.7 has a typed accessor
        segment.SetTerminology(entry)
    else:
        segment.SetTag(TERMINOLOGY_TAG, entry)


def segmentation_from_labelmap(
    scene: Any,
    labelmap: Volume,
    table: LabelTable,
    input_node: Any,
    segmentation_node: Any = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Turn a labelmap into a segmentation node named, coloured and coded by ``table``.

    * New node "<input> segmentation" by default (or ``name``); an existing ``segmentation_node`` that
      already has segments is only replaced with ``overwrite=True``.
    * One segment per label of the table — absent labels give empty segments, so every structure is
      listed — all sharing one labelmap layer, label values kept.
    * Reference geometry = the input volume (Segment Editor then edits on the input's grid); same
      parent transform as the input; display nodes and the 3D surface created.
    """
    slicer = _slicer()
    _require_volume_node(input_node, voxels=True)
    voxels, ijk_to_ras = _onto_input_grid(
        Volume(labelmap_as_uint8(labelmap, table, "The labelmap"), labelmap.geometry), input_node)

    if segmentation_node is None:
        base = name or f"{input_node.GetName()}{SEGMENTATION_SUFFIX}"
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(base))
    else:
        if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"The output {_node_label(segmentation_node)} is a "
                             f"{segmentation_node.GetClassName()}, not a segmentation. Choose a segmentation "
                             f"node or 'Create new segmentation'.")
        existing = segmentation_node.GetSegmentation().GetNumberOfSegments()
        if existing and not overwrite:
            raise InputError(
                f"Segmentation {_node_label(segmentation_node)} already has {existing} segment(s), which "
                f"would be replaced. Choose 'Create new segmentation' as output, or allow overwriting it."
            )
        if name:
            segmentation_node.SetName(name)

    _ensure_converters()
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
        # One image object shared by all segments = one layer; each segment is its label value in it
        # (exactly what Slicer builds when it reads a single-layer .seg.nrrd).
        shared = _oriented_image(voxels, ijk_to_ras)
        for label in table.labels:
            segment = slicer.vtkSegment()
            segment.SetName(label.name)
            segment.SetNameAutoGenerated(False)
            segment.SetColor(*label.color)
            segment.SetColorAutoGenerated(False)
            segment.SetLabelValue(label.value)
            _set_terminology(segment, label.terminology.to_slicer_string())
            segment.AddRepresentation(BINARY_LABELMAP, shared)
            segmentation.AddSegment(segment, segment_id(label.value))
        segmentation_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    finally:
        segmentation_node.EndModify(was_modifying)

    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.CreateClosedSurfaceRepresentation()
    _place_next_to(scene, segmentation_node, input_node)
    return segmentation_node


def labelmap_from_segmentation(scene: Any, segmentation_node: Any, reference_node: Any,
                               table: LabelTable) -> Volume:
    """Export the table's segments to a labelmap on ``reference_node``'s grid, with the table's values.

    A segment is matched to a label by name, else by this module's segment ID ("Segment_<value>"),
    so renamed-but-ours segments still count. Segments the table does not know are left out (a
    labelmap of the model's labels cannot name them); absent labels stay 0. Returned in the
    reference node's local geometry, like :func:`volume_from_node`.
    """
    import vtk

    slicer = _slicer()
    _require_volume_node(reference_node, "The reference volume", voxels=True)
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("No segmentation node given to export. Select the segmentation to export.")
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode",
                                     scene.GenerateUniqueName("SRCSM export colours"))
    colors.SetHideFromEditors(True)
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(lab.value for lab in table.labels) + 1)
    colors.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for label in table.labels:
        sid = segmentation.GetSegmentIdBySegmentName(label.name) or (
            segment_id(label.value) if segmentation.GetSegment(segment_id(label.value)) else "")
        if sid:
            ids.InsertNextValue(sid)
            # The export gives each segment the value of the colour entry that carries its name.
            colors.SetColor(label.value, segmentation.GetSegment(sid).GetName(), *label.color, 1.0)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                            scene.GenerateUniqueName("SRCSM export"))
    labelmap_node.SetHideFromEditors(True)
    try:
        if ids.GetNumberOfValues() == 0:
            reference = volume_from_node(reference_node)
            return reference.with_array(np.zeros(reference.shape, dtype=np.uint8))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok:
            raise InputError(f"Exporting segmentation {_node_label(segmentation_node)} to a labelmap failed. "
                             f"Check that it has a binary labelmap representation (Segmentations module).")
        exported = volume_from_node(labelmap_node)
        return Volume(exported.array.astype(np.uint8, copy=False), exported.geometry)
    finally:
        display = labelmap_node.GetDisplayNode()
        scene.RemoveNode(labelmap_node)
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(colors)


def load_seg_nrrd(scene: Any, path: Any, input_node: Any, table: LabelTable, segmentation_node: Any = None,
                  name: str | None = None, overwrite: bool = False) -> Any:
    """Load a ``.seg.nrrd`` written by ``srcsm segment`` (e.g. by the module's background process).

    The file's labelmap goes through :func:`segmentation_from_labelmap`, so the result is named,
    coloured, coded and placed exactly like an in-process result. A file whose segments carry other
    names than ``table`` was made by another model: that is refused rather than mislabelled.
    """
    labelmap, segments = read_seg_nrrd(path)
    by_value = {lab.value: lab.name for lab in table.labels}
    mismatched = [s["name"] for s in segments if by_value.get(s["label_value"]) not in (None, s["name"])]
    if mismatched or any(s["label_value"] not in by_value for s in segments):
        raise InputError(
            f"'{path}' does not match the model's labels ({', '.join(table.names())}); its segments are "
            f"{', '.join(s['name'] for s in segments)}. It was probably written by another model: run the "
            f"segmentation again."
        )
    return segmentation_from_labelmap(scene, labelmap, table, input_node, segmentation_node, name, overwrite)


__all__ = [
    "PREVIEW_ATTRIBUTE",
    "find_preview_node",
    "labelmap_from_segmentation",
    "load_seg_nrrd",
    "node_from_volume",
    "segmentation_from_labelmap",
    "transform_to_world",
    "update_preview_node",
    "volume_from_node",
]
