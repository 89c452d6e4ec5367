"""Volumes with their geometry, and reading/writing them safely.

A :class:`Volume` is a numpy array in K,J,I (z,y,x) order plus the geometry that places it in the
world: origin, spacing and direction in ITK's LPS convention (what SimpleITK, NIfTI-via-ITK and NRRD
readers give). Geometry always travels with the array; nothing in this library passes a bare array
across a module boundary.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError

#: File endings the readers and writers understand (besides DICOM series folders).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Voxel spacings outside this range (mm) are almost certainly a broken header (e.g. metres, or 0).
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 100.0


@dataclass(frozen=True)
class Geometry:
    """Where a K,J,I array sits in the world (LPS, millimetres).

    ``spacing`` and ``origin`` are in x,y,z (I,J,K) order, as in ITK; ``direction`` is the 3×3 matrix
    whose *columns* are the world directions of the I, J and K axes.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical_matrix(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) to LPS (x, y, z, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices (..., 3) in i,j,k order → LPS points (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) → continuous indices (..., 3) in i,j,k order."""
        xyz = np.asarray(xyz, dtype=float)
        inv = np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))
        return (xyz - np.asarray(self.origin)) @ inv.T

    def corners(self, shape_kji: tuple[int, int, int]) -> np.ndarray:
        """World positions (8, 3) of the centres of the eight corner voxels."""
        k, j, i = shape_kji
        ijk = np.array([[a, b, c] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)], dtype=float)
        return self.index_to_physical(ijk)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def almost_equal(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass
class Volume:
    """A 3D scalar image: array in K,J,I order plus its :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return Volume(array, self.geometry, dict(self.metadata))

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        return self.geometry.apply_to(image)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build from a Slicer-style 4×4 IJK→RAS matrix (the array still in K,J,I order)."""
        m = np.asarray(ijk_to_ras, dtype=float)
        lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :4]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        if np.any(spacing <= 0):
            raise InputError("The IJK→RAS matrix has a zero column: the volume has no valid geometry.")
        direction = lps[:, :3] / spacing
        return cls(array, Geometry(tuple(lps[:, 3]), tuple(spacing), tuple(direction.ravel())))

    def ijk_to_ras(self) -> np.ndarray:
        """The Slicer-style 4×4 IJK→RAS matrix of this volume."""
        m = self.geometry.index_to_physical_matrix()
        m[:3, :] = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :]
        return m


# --------------------------------------------------------------------------------------------- IO


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


#: Slice gaps this much larger than the usual slice distance are reported (a missing slice).
SLICE_GAP_TOLERANCE = 0.1

Report = Callable[[str], None]


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder, as a user recognises it (description, UID, slice count)."""

    uid: str
    description: str
    files: tuple[str, ...]

    def describe(self) -> str:
        desc = f"'{self.description}'" if self.description else "(no description)"
        return f"{desc} {self.uid}, {len(self.files)} slice{'s' if len(self.files) != 1 else ''}"


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK prints its warnings straight to the process's stderr (raw text that would break the CLI's JSON
    progress stream); where we read, we check for those conditions ourselves and report them in words."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """The DICOM series in ``folder``, largest first."""
    reader = sitk.ImageSeriesReader()
    out = []
    with _itk_warnings_off():
        for uid in reader.GetGDCMSeriesIDs(str(folder)):
            files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
            description = ""
            try:
                head = sitk.ImageFileReader()
                head.SetFileName(files[0])
                head.ReadImageInformation()
                if head.HasMetaDataKey("0008|103e"):
                    description = head.GetMetaData("0008|103e").strip()
            except RuntimeError:
                pass
            out.append(DicomSeries(uid, description, files))
    return sorted(out, key=lambda s: -len(s.files))


def _check_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, series: DicomSeries,
                         report: Report) -> None:
    """Report uneven slice positions (a missing slice) in our own words: ITK reads the series as if its
    slices were evenly spaced at the mean distance, so the geometry beyond a gap is off."""
    n = image.GetSize()[2]
    if n < 3:
        return
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient: nothing to check against
    steps = np.diff(pos @ normal)
    usual = float(np.median(np.abs(steps)))
    if usual <= 0:
        return
    worst = int(np.argmax(np.abs(np.abs(steps) - usual)))
    if abs(abs(steps[worst]) - usual) <= SLICE_GAP_TOLERANCE * usual:
        return
    gap = abs(float(steps[worst]))
    what = "a missing slice?" if gap > usual else "overlapping or duplicated slices?"
    report(
        f"The DICOM series {series.describe()} has uneven slice positions: its slices are {usual:.3g} mm apart, but "
        f"{gap:.3g} mm between slices {worst + 1} and {worst + 2} ({what}). It is read as evenly spaced at "
        f"{image.GetSpacing()[2]:.3g} mm, so the result is misplaced by up to {abs(gap - usual):.3g} mm along the "
        f"slice axis. Re-export the complete series from the scanner or PACS."
    )


def _read_dicom_folder(path: Path, series_uid: str | None, report: Report) -> sitk.Image:
    series = dicom_series(path)
    if not series:
        raise InputError(
            f"'{path}' is a folder but holds no DICOM series. Point to a DICOM series folder, or to "
            f"an image file ({', '.join(IMAGE_SUFFIXES)})."
        )
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            raise InputError(
                f"'{path}' holds no DICOM series with UID {series_uid}. Its series: "
                + "; ".join(s.describe() for s in series) + ". Pass one of these UIDs to --series."
            )
    else:
        # The largest series is what a user almost always means (localisers are small) — but say so.
        chosen = series[0]
        if len(series) > 1:
            report(
                f"'{path.name}' holds {len(series)} DICOM series; using the largest, {chosen.describe()}. The "
                f"others: " + "; ".join(s.describe() for s in series[1:]) + ". Choose one with --series UID."
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    with _itk_warnings_off():
        image = reader.Execute()
    if image.GetDimension() == 3:
        _check_slice_spacing(reader, image, chosen, report)
    return image


def _warn(text: str) -> None:
    import warnings

    warnings.warn(text, stacklevel=3)


def _read_sitk(path: Path, series_uid: str | None = None, report: Report | None = None) -> sitk.Image:
    if not path.exists():
        raise InputError(f"Input not found: '{path}'. Check the path (and that the drive is mounted).")
    if series_uid is not None and not path.is_dir():
        raise InputError(f"--series selects a series of a DICOM folder, but '{path.name}' is a file. Drop "
                         f"--series, or give the DICOM folder.")
    try:
        if path.is_dir():
            return _read_dicom_folder(path, series_uid, report or _warn)
        if not is_image_path(path):
            raise InputError(
                f"'{path.name}' has an unsupported file type. Use NIfTI (.nii/.nii.gz), NRRD (.nrrd), "
                f"MetaImage (.mha/.mhd) or a DICOM series folder."
            )
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every read failure as RuntimeError
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"Could not read '{path}': {first}. The file may be truncated or not an image; re-export it "
            f"from the scanner or viewer."
        ) from exc


def validate_image(image: sitk.Image, source: str = "the input") -> None:
    """Reject images the pipeline cannot segment, with a message naming the fix."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            f"image). Segmentation needs a scalar (grey-value) 3D volume; extract one channel first."
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4:
        raise InputError(
            f"{source} is 4D ({' × '.join(map(str, size))}): a time series or multi-channel stack. "
            f"Extract a single 3D frame first (e.g. in Slicer: Sequences, or 'Split Volume')."
        )
    if dim != 3 or (dim == 3 and min(size) < 2):
        raise InputError(
            f"{source} is 2D (size {' × '.join(map(str, size))}). SRCSM segments 3D volumes; load the "
            f"whole series (a DICOM folder) rather than a single slice."
        )
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"{source} has an implausible voxel spacing {tuple(round(float(s), 6) for s in spacing)} mm "
            f"(expected {MIN_SPACING_MM}–{MAX_SPACING_MM} mm). The header is probably wrong (metres instead "
            f"of millimetres, or missing); fix the spacing in the header."
        )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(
            f"{source} has a degenerate orientation (direction matrix is not orthonormal). Fix the header's "
            f"direction cosines."
        )


def validate_array(array: np.ndarray, source: str = "the input") -> None:
    """Reject voxel content that cannot be segmented (all NaN, non-finite, constant)."""
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.any():
            raise InputError(f"{source} contains no finite values (all NaN/Inf). Re-export the image.")
        if not finite.all():
            n = int(array.size - np.count_nonzero(finite))
            raise InputError(
                f"{source} contains {n} non-finite voxel(s) (NaN or Inf). Replace them (e.g. with the "
                f"image minimum) before segmenting."
            )
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(
            f"{source} is constant (every voxel = {lo}). There is nothing to segment; check that the "
            f"right series was loaded."
        )


def read_volume(path: str | os.PathLike[str], series: str | None = None, report: Report | None = None) -> Volume:
    """Read a 3D scalar image (NIfTI, NRRD, MHA or a DICOM series folder) with its geometry.

    ``series``: the SeriesInstanceUID to read from a DICOM folder (default: the largest series, said
    through ``report``). ``report`` receives what a user should know but that does not stop the read
    (which series of several, a missing slice); default: a Python warning.
    """
    path = Path(path)
    image = _read_sitk(path, series, report)
    validate_image(image, f"'{path.name}'")
    volume = Volume.from_sitk(image)
    validate_array(volume.array, f"'{path.name}'")
    return volume


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: setting it to read it is not thread-safe, so do it a single time)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A crash or cancellation therefore never leaves a partial file. The temporary name keeps the
    target's suffix so that writers choosing a format by extension still work.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"'{path}' already exists. Choose another output name or pass --overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file private (0600); give it the permissions a plain write would have
        # (those of the file it replaces, else 0666 minus the umask) so colleagues can still read results.
        os.chmod(tmp_path, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_volume(volume: Volume, path: str | os.PathLike[str], overwrite: bool = True, compress: bool = True) -> Path:
    """Write a volume atomically; the format follows the extension (.nii.gz, .nrrd, .mha...)."""
    path = Path(path)
    if not is_image_path(path):
        raise InputError(f"Unsupported output type '{path.name}'. Use .nii.gz, .nii, .nrrd or .mha.")
    image = volume.to_sitk()
    for key, value in volume.metadata.items():
        image.SetMetaData(key, value)
    with atomic_output(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path
