"""Slicer's segmentation file format (``.seg.nrrd``) and plain labelmaps, without Slicer or VTK.

The ``srcsm`` command must write files that open in 3D Slicer with every structure named, coloured
and coded, yet it runs where neither slicer-core nor VTK is installed. So the ``.seg.nrrd`` header is
written here by hand, following what Slicer's own ``vtkMRMLSegmentationStorageNode`` writes and reads
(checked against the files slicer-core 5.11 writes, and read back with it in the tests):

* one 3D ``unsigned char`` volume on the **full reference grid** of the input (so the file is also a
  plain labelmap for SimpleITK / ITK-SNAP / nibabel, voxel for voxel on the input's grid);
* one *layer* (``SegmentN_Layer:=0``) that every segment shares, each segment identified by its
  ``SegmentN_LabelValue`` — the label values of the model are kept;
* every label of the :class:`~.labels.LabelTable`, also those absent from the labelmap (an empty
  segment), so that Slicer lists every structure the model can produce;
* ``SegmentN_Tags:=TerminologyEntry:<Slicer terminology string>|`` carrying the SNOMED-CT codes;
* ``Segmentation_ConversionParameters`` with the *reference image geometry* (Slicer uses it as the
  segmentation's geometry for editing and for the 3D surface).

SimpleITK's NRRD writer was not used for writing: it controls neither the order nor the formatting of
the ``key:=value`` fields, and writing the header ourselves keeps it byte-for-byte what Slicer
expects. Reading uses SimpleITK (ITK's NRRD reader is also what Slicer uses), which handles every
encoding and the detached ``.seg.nhdr`` variant.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import TypedDict

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .image import Geometry, Volume, atomic_output, is_image_path, write_volume
from .labels import LabelTable

#: Slicer's name of the voxel representation (``vtkSegmentationConverter``).
BINARY_LABELMAP = "Binary labelmap"
#: Slicer's name of the 3D surface representation.
CLOSED_SURFACE = "Closed surface"
#: Tag under which Slicer stores a segment's terminology (``vtkSegment::GetTerminologyEntryTagName``).
TERMINOLOGY_TAG = "TerminologyEntry"
#: Conversion parameter that holds the reference grid (``vtkSegmentationConverter``).
REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class SegmentInfo(TypedDict):
    """One segment as stored in a ``.seg.nrrd`` header."""

    id: str
    name: str
    color: tuple[float, float, float]
    label_value: int
    layer: int
    terminology: str | None
    name_auto_generated: bool
    color_auto_generated: bool


def segment_id(value: int) -> str:
    """Segment ID used for a label value, in files and in segmentation nodes alike.

    Stable IDs (rather than Slicer's random ones) let a re-run replace the same segments and let
    scripts find a structure by value.
    """
    return f"Segment_{value}"


# ------------------------------------------------------------------------------------------ helpers


def _fmt(x: float) -> str:
    """Shortest text that reads back to the same double (NRRD readers use strtod)."""
    value = float(x)
    if value == 0.0:
        return "0"  # also turns -0.0 into 0
    return repr(value)


def _check_header_text(text: str, what: str) -> str:
    """NRRD header values are single lines; a newline would corrupt the file for every reader."""
    if "\n" in text or "\r" in text:
        raise InputError(f"{what} {text!r} contains a line break, which a .seg.nrrd header cannot store. "
                         f"Remove the line break from the label table.")
    return text


def labelmap_as_uint8(labelmap: Volume, table: LabelTable | None, source: str = "The labelmap") -> np.ndarray:
    """The labelmap's voxels as uint8, refusing values that would be silently lost or wrapped
    (and, given a table, values the table does not define)."""
    array = np.asarray(labelmap.array)
    if array.ndim != 3:
        raise InputError(f"{source} must be a 3D labelmap, got an array of shape {array.shape}.")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{source} holds non-integer values; a labelmap must hold whole label values. "
                             f"Round or argmax the prediction before writing it.")
    elif array.dtype.kind not in "iub":
        raise InputError(f"{source} has voxel type {array.dtype}; a labelmap must be an integer array.")
    values = np.unique(array)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InputError(f"{source} holds values outside 0..255 ({values.min()}..{values.max()}); a "
                         f"labelmap for Slicer is stored as 8-bit. Map the labels to 1..255 first.")
    if table is not None:
        known = {lab.value for lab in table.labels} | {0}
        unknown = sorted(int(v) for v in values if int(v) not in known)
        if unknown:
            raise InputError(
                f"{source} holds label value(s) {unknown} that the label table does not define "
                f"(it defines {sorted(known - {0})}). Use the label table of the model that produced it."
            )
    return np.ascontiguousarray(array, dtype=np.uint8)


def reference_geometry_string(geometry: Geometry, shape_kji: tuple[int, int, int]) -> str:
    """Slicer's serialised image geometry: IJK→RAS matrix row by row, then the extent, ``;``-separated.

    Same layout as ``vtkSegmentationConverter::SerializeImageGeometry``.
    """
    ijk_to_ras = geometry.index_to_physical_matrix()
    ijk_to_ras[:3, :] = _LPS_TO_RAS @ ijk_to_ras[:3, :]
    k, j, i = shape_kji
    numbers = [_fmt(v) for v in ijk_to_ras.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(f"{n};" for n in numbers)


def seg_nrrd_header(shape_kji: tuple[int, int, int], geometry: Geometry, table: LabelTable) -> str:
    """The text header of a single-layer ``.seg.nrrd`` (ends with the blank line before the data)."""
    k, j, i = shape_kji
    columns = geometry.direction_matrix @ np.diag(geometry.spacing)  # LPS vector of each voxel axis
    directions = " ".join("(" + ",".join(_fmt(c) for c in columns[:, axis]) + ")" for axis in range(3))
    origin = "(" + ",".join(_fmt(c) for c in geometry.origin) + ")"
    extent = f"0 {i - 1} 0 {j - 1} 0 {k - 1}"
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        f"space directions: {directions}",
        "kinds: domain domain domain",
        "encoding: gzip",
        f"space origin: {origin}",
    ]
    for index, label in enumerate(table.labels):
        prefix = f"Segment{index}_"
        name = _check_header_text(label.name, "Label name")
        terminology = _check_header_text(label.terminology.to_slicer_string(), "Terminology of label")
        if "|" in terminology:
            raise InputError(f"The terminology of label '{name}' contains '|', which separates tags in "
                             f"a .seg.nrrd file. Remove it from the code meanings in the label table.")
        lines += [
            f"{prefix}Color:={' '.join(_fmt(c) for c in label.color)}",
            f"{prefix}ColorAutoGenerated:=0",
            # Every segment of the shared layer covers the whole grid: Slicer builds the layer's
            # image from the first segment's extent, so all of them must state the same one.
            f"{prefix}Extent:={extent}",
            f"{prefix}ID:={segment_id(label.value)}",
            f"{prefix}LabelValue:={label.value}",
            f"{prefix}Layer:=0",
            f"{prefix}Name:={name}",
            f"{prefix}NameAutoGenerated:=0",
            f"{prefix}Tags:={TERMINOLOGY_TAG}:{terminology}|",
        ]
    lines += [
        f"Segmentation_ContainedRepresentationNames:={BINARY_LABELMAP}|",
        "Segmentation_ConversionParameters:="
        f"{REFERENCE_GEOMETRY_PARAMETER}|{reference_geometry_string(geometry, shape_kji)}|"
        "Geometry (IJK to RAS matrix and extent) of the image the segmentation was computed on.&",
        f"Segmentation_MasterRepresentation:={BINARY_LABELMAP}",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return "\n".join(lines) + "\n\n"


# ------------------------------------------------------------------------------------------ writing


def write_seg_nrrd(labelmap: Volume, table: LabelTable, path: str | os.PathLike[str],
                   overwrite: bool = True) -> Path:
    """Write ``labelmap`` as a Slicer segmentation (``.seg.nrrd``) named, coloured and coded by ``table``.

    The file holds the labelmap on its own (full) grid, so it lines up with the image it was computed
    on in any viewer. Every label of the table becomes a segment, present in the labelmap or not.
    The write is atomic: a failure leaves no file (and an existing file untouched).
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"'{path.name}' is not a .seg.nrrd path. Name the output '<name>.seg.nrrd'.")
    voxels = labelmap_as_uint8(labelmap, table, "The labelmap")
    header = seg_nrrd_header(voxels.shape, labelmap.geometry, table)  # type: ignore[arg-type]
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("utf-8"))
            # NRRD's fastest axis is the first size (I): exactly numpy's C order of a K,J,I array.
            fh.write(gzip.compress(voxels.tobytes(order="C"), compresslevel=6))
    return path


def write_labelmap(labelmap: Volume, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Write a plain 8-bit labelmap (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) on the labelmap's grid.

    For a file that opens in Slicer with segment names and colours use :func:`write_seg_nrrd`.
    """
    path = Path(path)
    if path.name.lower().endswith((".seg.nrrd", ".seg.nhdr")):
        raise InputError(f"'{path.name}' is a segmentation path; write it with write_seg_nrrd (it needs "
                         f"the label table), or choose a .nii.gz / .nrrd labelmap name.")
    if not is_image_path(path):
        raise InputError(f"Unsupported labelmap type '{path.name}'. Use .nii.gz, .nii, .nrrd or .mha.")
    voxels = labelmap_as_uint8(labelmap, None, "The labelmap")
    return write_volume(Volume(voxels, labelmap.geometry), path, overwrite=overwrite)


# ------------------------------------------------------------------------------------------ reading

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(\w+)$")


def _parse_tags(text: str) -> dict[str, str]:
    """``key:value|key:value|`` → dict (Slicer's ``SetSegmentTagsFromString`` format)."""
    tags: dict[str, str] = {}
    for item in text.split("|"):
        if not item:
            continue
        key, _, value = item.partition(":")
        tags[key] = value
    return tags


def _parse_segments(meta: dict[str, str], source: str) -> list[SegmentInfo]:
    fields: dict[int, dict[str, str]] = {}
    for key, value in meta.items():
        match = _SEGMENT_KEY.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = value
    segments: list[SegmentInfo] = []
    for index in sorted(fields):
        f = fields[index]
        try:
            color = tuple(float(c) for c in f.get("Color", "0.5 0.5 0.5").split())
            label_value = int(f.get("LabelValue", "1"))
            layer = int(f.get("Layer", str(index)))
        except ValueError as exc:
            raise InputError(f"'{source}' has a malformed header for segment {index} ({exc}). The file "
                             f"is damaged; save the segmentation again from Slicer.") from exc
        if len(color) != 3:
            raise InputError(f"'{source}': segment {index} has a colour with {len(color)} components; "
                             f"the file is damaged. Save the segmentation again from Slicer.")
        segments.append(
            SegmentInfo(
                id=f.get("ID", segment_id(label_value)),
                name=f.get("Name", f.get("ID", f"Segment_{index}")),
                color=color,  # type: ignore[typeddict-item]
                label_value=label_value,
                layer=layer,
                terminology=_parse_tags(f.get("Tags", "")).get(TERMINOLOGY_TAG),
                name_auto_generated=f.get("NameAutoGenerated", "0") == "1",
                color_auto_generated=f.get("ColorAutoGenerated", "0") == "1",
            )
        )
    return segments


def read_seg_nrrd(path: str | os.PathLike[str]) -> tuple[Volume, list[SegmentInfo]]:
    """Read a ``.seg.nrrd`` into one labelmap (segments' label values) on the file's grid + its segments.

    Files with several layers (overlapping segments, as Slicer writes when segments overlap) are
    merged when the segments do not overlap and their label values are distinct; otherwise the
    labelmap cannot represent them and an :class:`InputError` says so.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Segmentation file not found: '{path}'. Check the path.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Could not read '{path}' as NRRD: {str(exc).strip().splitlines()[-1]}. The file "
                         f"may be truncated; write it again.") from exc
    meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    segments = _parse_segments(meta, path.name)
    geometry = Geometry.from_sitk(image) if image.GetDimension() == 3 else None
    if geometry is None:
        raise InputError(f"'{path.name}' is a {image.GetDimension()}D image; a segmentation is 3D.")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 3:
        array = array[..., np.newaxis]  # one layer
    labelmap = np.zeros(array.shape[:3], dtype=np.uint8)
    if not segments:  # a plain labelmap saved as .seg.nrrd: voxel values are the labels
        if array.shape[3] != 1:
            raise InputError(f"'{path.name}' has {array.shape[3]} layers but no segment information; "
                             f"open it in Slicer and export the segments as a labelmap.")
        return Volume(labelmap_as_uint8(Volume(array[..., 0], geometry), None, f"'{path.name}'"),
                      geometry), []
    layers = array.shape[3]
    seen_values: set[int] = set()
    for seg in segments:
        if not 0 <= seg["layer"] < layers:
            raise InputError(f"'{path.name}': segment '{seg['name']}' refers to layer {seg['layer']} but "
                             f"the file has {layers}. The file is damaged; save it again from Slicer.")
        if seg["label_value"] in seen_values and layers > 1:
            raise InputError(
                f"'{path.name}' has overlapping layers whose segments share label value "
                f"{seg['label_value']}; one labelmap cannot hold them. In Slicer, export the segments "
                f"you need to a labelmap instead."
            )
        seen_values.add(seg["label_value"])
        mask = array[..., seg["layer"]] == seg["label_value"]
        if layers > 1 and np.any(labelmap[mask] != 0):
            raise InputError(f"'{path.name}': segment '{seg['name']}' overlaps another segment; one "
                             f"labelmap cannot hold overlapping segments. Remove the overlap in Slicer.")
        labelmap[mask] = seg["label_value"]
    return Volume(labelmap, geometry), segments
