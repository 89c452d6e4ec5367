"""Reading volumes: geometry on real files, every kind of bad input, atomic writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Geometry, Volume, atomic_output, read_volume, write_volume


def _mr_path(shared_data):
    return next(shared_data.glob("Dataset502_*")) / "imagesTr" / "chaos_01_0000.nii.gz"


def test_real_volume_geometry_matches_simpleitk(shared_data):
    path = _mr_path(shared_data)
    vol = read_volume(path)
    ref = sitk.ReadImage(str(path))
    assert vol.shape == tuple(reversed(ref.GetSize()))
    # the physical point of a voxel agrees with SimpleITK's own transform
    for ijk in [(0, 0, 0), (10, 200, 30), (255, 255, vol.shape[0] - 1)]:
        assert np.allclose(vol.geometry.index_to_physical(np.array(ijk, float)),
                           ref.TransformContinuousIndexToPhysicalPoint([float(x) for x in ijk]), atol=1e-6)
    back = vol.geometry.physical_to_index(vol.geometry.index_to_physical(np.array([3.0, 4.0, 5.0])))
    assert np.allclose(back, [3, 4, 5])


def test_ijk_to_ras_round_trip(shared_data):
    vol = read_volume(_mr_path(shared_data))
    again = Volume.from_ijk_to_ras(vol.array, vol.ijk_to_ras())
    assert again.geometry.almost_equal(vol.geometry, 1e-9)
    # RAS is LPS with x and y negated
    ras = vol.ijk_to_ras() @ np.array([1, 2, 3, 1.0])
    lps = vol.geometry.index_to_physical(np.array([1, 2, 3.0]))
    assert np.allclose(ras[:3], lps * [-1, -1, 1])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip_oblique(tmp_path, shared_data, suffix):
    vol = read_volume(_mr_path(shared_data))
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = Volume(vol.array, Geometry(vol.geometry.origin, vol.geometry.spacing, tuple(rot.ravel())))
    out = write_volume(oblique, tmp_path / f"v{suffix}")
    back = read_volume(out)
    assert np.array_equal(back.array, oblique.array)
    assert back.geometry.almost_equal(oblique.geometry, 1e-5)


def _write(tmp_path, name, image):
    p = tmp_path / name
    sitk.WriteImage(image, str(p))
    return p


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_unreadable_file(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError, match="Could not read"):
        read_volume(p)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "image.png"
    p.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported file type"):
        read_volume(p)


def test_2d_image(tmp_path):
    p = _write(tmp_path, "slice.nrrd", sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)))
    with pytest.raises(InputError, match="2D"):
        read_volume(p)


def test_single_slice_3d_is_2d(tmp_path):
    p = _write(tmp_path, "slice3d.nrrd", sitk.GetImageFromArray(np.random.rand(1, 32, 32).astype(np.float32)))
    with pytest.raises(InputError, match="2D"):
        read_volume(p)


def test_4d_image(tmp_path):
    p = _write(tmp_path, "series.nii.gz", sitk.GetImageFromArray(np.random.rand(3, 8, 16, 16).astype(np.float32), isVector=False))
    with pytest.raises(InputError, match="4D"):
        read_volume(p)


def test_multicomponent_image(tmp_path):
    img = sitk.GetImageFromArray(np.random.rand(8, 16, 16, 3).astype(np.float32), isVector=True)
    p = _write(tmp_path, "rgb.nrrd", img)
    with pytest.raises(InputError, match="components per voxel"):
        read_volume(p)


def test_all_nan(tmp_path):
    p = _write(tmp_path, "nan.nrrd", sitk.GetImageFromArray(np.full((8, 16, 16), np.nan, np.float32)))
    with pytest.raises(InputError, match="no finite values"):
        read_volume(p)


def test_some_nonfinite(tmp_path):
    a = np.random.rand(8, 16, 16).astype(np.float32)
    a[2, 3, 4] = np.inf
    p = _write(tmp_path, "inf.nrrd", sitk.GetImageFromArray(a))
    with pytest.raises(InputError, match="non-finite"):
        read_volume(p)


def test_constant(tmp_path):
    p = _write(tmp_path, "const.nrrd", sitk.GetImageFromArray(np.full((8, 16, 16), 7, np.int16)))
    with pytest.raises(InputError, match="constant"):
        read_volume(p)


@pytest.mark.parametrize("spacing", [(0.0001, 1, 1), (1, 1, 500.0)])
def test_absurd_spacing(tmp_path, spacing):
    img = sitk.GetImageFromArray(np.random.rand(8, 16, 16).astype(np.float32))
    img.SetSpacing(spacing)
    p = _write(tmp_path, "sp.nrrd", img)
    with pytest.raises(InputError, match="implausible voxel spacing"):
        read_volume(p)


def test_dicom_series_folder(tmp_path, shared_data):
    """A DICOM series written from a real case reads back with the same voxels and geometry."""
    vol = read_volume(_mr_path(shared_data))
    sub = vol.array[:6, ::4, ::4].astype(np.int16)
    geom = Geometry(vol.geometry.origin, (vol.geometry.spacing[0] * 4, vol.geometry.spacing[1] * 4,
                                          vol.geometry.spacing[2]), vol.geometry.direction)
    image = Volume(sub, geom).to_sitk()
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        sl.SetMetaData("0008|0060", "MR")
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.2")
        sl.SetMetaData("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7]))))
        sl.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_volume(folder)
    # DICOM frames are right-handed: this left-handed case comes back with its slice order reversed,
    # so compare physically: voxel (i, j, k) of the result sits where voxel (i, j, K-1-k) was.
    n = sub.shape[0]
    assert np.array_equal(back.array[::-1], sub)
    for i, j, k in [(0, 0, 0), (5, 7, 2), (63, 63, n - 1)]:
        assert np.allclose(back.geometry.index_to_physical(np.array([i, j, k], float)),
                           geom.index_to_physical(np.array([i, j, n - 1 - k], float)), atol=1e-3)


def test_folder_without_dicom(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_output_gives_the_permissions_of_a_plain_write(tmp_path, shared_data):
    """Results must not come out private (mkstemp's 0600): a new file gets 0666 minus the umask, a
    replaced file keeps its mode."""
    from SRCSMSegmenterLib import image

    vol = read_volume(_mr_path(shared_data))
    mask = os.umask(0o027)
    image._umask.cache_clear()  # the umask is read once per process; this test changes it
    try:
        fresh = write_volume(vol, tmp_path / "fresh.nii.gz")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    finally:
        os.umask(mask)
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(b"")
    expected = stat.S_IMODE(plain.stat().st_mode)
    image._umask.cache_clear()  # the process umask is back to the session's: read it again
    assert stat.S_IMODE(write_volume(vol, tmp_path / "new.nii.gz").stat().st_mode) == expected
    kept = tmp_path / "kept.nii.gz"
    kept.write_bytes(b"")
    os.chmod(kept, 0o604)
    write_volume(vol, kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and read_volume(kept).shape == vol.shape


def test_write_refuses_to_overwrite_unless_asked(tmp_path, shared_data):
    vol = read_volume(_mr_path(shared_data))
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"user data")
    with pytest.raises(InputError, match="already exists"):
        write_volume(vol, target, overwrite=False)
    assert target.read_bytes() == b"user data"


# ----------------------------------------------------------------------------------- DICOM series
SERIES_A, SERIES_B = "1.2.826.0.1.3680043.2.1125.77.1", "1.2.826.0.1.3680043.2.1125.77.2"


@pytest.fixture(scope="module")
def mr_sitk(shared_data):
    return sitk.ReadImage(str(_mr_path(shared_data)))


def _assert_lies_where_the_source_does(vol, source: sitk.Image) -> None:
    """Physical check: voxels of the read series hold the source's values at the same world points."""
    src = sitk.GetArrayViewFromImage(source)
    shape = vol.shape
    for kji in [(0, 0, 0), (shape[0] - 1, 100, 130), (shape[0] // 2, 200, 40), (1, 128, 128)]:
        world = vol.geometry.index_to_physical(np.array(kji[::-1], float))
        i, j, k = np.rint(source.TransformPhysicalPointToContinuousIndex(world.tolist())).astype(int)
        assert np.allclose(source.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)]), world,
                           atol=1e-3)
        assert vol.array[kji] == src[k, j, i]


def test_dicom_folder_with_two_series_says_which_it_reads(tmp_path, mr_sitk):
    from dicom_series import write_series

    write_series(mr_sitk, tmp_path, SERIES_A, "T2 SPIR axial", 8, 20)
    write_series(mr_sitk, tmp_path, SERIES_B, "localiser", 0, 4)
    notes: list[str] = []
    vol = read_volume(tmp_path, report=notes.append)
    assert vol.shape[0] == 12
    _assert_lies_where_the_source_does(vol, mr_sitk)
    assert len(notes) == 1
    assert "2 DICOM series" in notes[0] and "'T2 SPIR axial'" in notes[0] and "12 slices" in notes[0]
    assert SERIES_A in notes[0] and SERIES_B in notes[0] and "'localiser'" in notes[0] and "4 slices" in notes[0]
    assert "--series" in notes[0]
    notes.clear()
    small = read_volume(tmp_path, series=SERIES_B, report=notes.append)
    assert small.shape[0] == 4 and not notes
    _assert_lies_where_the_source_does(small, mr_sitk)
    with pytest.raises(InputError, match="no DICOM series with UID 1.2.3") as exc:
        read_volume(tmp_path, series="1.2.3")
    assert SERIES_A in str(exc.value) and SERIES_B in str(exc.value)
    with pytest.raises(InputError, match="is a file"):
        read_volume(_mr_path(_shared_data_root()), series=SERIES_A)


def _shared_data_root():
    from model_fixtures import SHARED_DATA

    return SHARED_DATA


def test_dicom_missing_slice_is_our_message_not_itks(tmp_path, mr_sitk, capfd):
    from dicom_series import write_series

    write_series(mr_sitk, tmp_path, SERIES_A, "T2 SPIR axial", 8, 20, skip=(13,))
    notes: list[str] = []
    vol = read_volume(tmp_path, report=notes.append)
    assert vol.shape[0] == 11
    err = capfd.readouterr().err
    assert "WARNING" not in err and "itk" not in err.lower(), err  # ITK's raw text never reaches stderr
    assert len(notes) == 1 and "missing slice" in notes[0] and "Re-export the complete series" in notes[0]
    spacing = mr_sitk.GetSpacing()[2]
    assert f"{spacing:.3g} mm apart" in notes[0] and f"{2 * spacing:.3g} mm between slices" in notes[0]
    # the same series complete raises no such note
    notes.clear()
    write_series(mr_sitk, tmp_path / "complete", SERIES_A, "T2 SPIR axial", 8, 20)
    assert read_volume(tmp_path / "complete", report=notes.append).shape[0] == 12 and notes == []
