"""The web page's data folder: confined paths, listing, limited uploads, reserved output names.

Plain Python (no trame, no slicer); the files are real volumes where the content matters.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.web.datafolder import DataFolder


@pytest.fixture
def folder(mr_data_dir) -> DataFolder:
    return DataFolder(mr_data_dir, max_upload_bytes=3 * 2**20)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist.*--data"):
        DataFolder(tmp_path / "nope")


@pytest.mark.parametrize("bad, why", [
    ("../secret.nii.gz", "goes up"),
    ("imagesTr/../../secret.nii.gz", "goes up"),
    ("/etc/passwd", "absolute"),
    ("C:/Windows/x.nii", "absolute"),
    ("", "No file chosen"),
    ("a\x00b.nii", "No file chosen"),
])
def test_paths_outside_the_folder_are_refused(folder, bad, why):
    with pytest.raises(InputError, match=why):
        folder.resolve(bad)


def test_symlinks_out_of_the_folder_are_refused(folder, tmp_path, mr_relative):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(folder.resolve(mr_relative), outside / "case.nii.gz")
    (folder.root / "link.nii.gz").symlink_to(outside / "case.nii.gz")
    (folder.root / "linkdir").symlink_to(outside, target_is_directory=True)
    for relative in ("link.nii.gz", "linkdir/case.nii.gz"):
        with pytest.raises(InputError, match="outside the data folder"):
            folder.resolve(relative)
    listed = folder.volumes()
    assert "link.nii.gz" not in listed and not any(p.startswith("linkdir") for p in listed)
    # A link that stays inside the folder is fine.
    (folder.root / "inside.nii.gz").symlink_to(folder.resolve(mr_relative))
    assert folder.resolve("inside.nii.gz") == folder.resolve(mr_relative)


def test_listing_finds_volumes_and_dicom_series(folder, mr_relative):
    import SimpleITK as sitk

    vol = read_volume(folder.resolve(mr_relative))
    small = sitk.GetImageFromArray(vol.array[:3, ::8, ::8].astype(np.int16))
    (folder.root / "more").mkdir()
    sitk.WriteImage(small, str(folder.root / "more" / "a.nrrd"))
    sitk.WriteImage(small, str(folder.root / "more" / "b.mha"))
    sitk.WriteImage(small, str(folder.root / "more" / "result.seg.nrrd"))  # a result, not an input
    (folder.root / "more" / ".a.nii.gz.partial.nii.gz").write_bytes(b"")  # a write in progress
    series = folder.root / "dicom"
    series.mkdir()
    for k in range(3):
        sitk.WriteImage(small[:, :, k], str(series / f"IM{k:04d}"), imageIO="GDCMImageIO")  # no suffix
    (folder.root / "notes").mkdir()
    (folder.root / "notes" / "readme.txt").write_text("not an image")
    assert folder.volumes() == ["dicom/", mr_relative, "more/a.nrrd", "more/b.mha"]


def test_upload_is_size_limited_and_never_replaces(folder, mr_relative):
    content = folder.resolve(mr_relative).read_bytes()  # a real 2.1 MB NIfTI
    first = folder.save_upload("../../evil/name chaos.nii.gz", content)
    assert first == "uploads/name chaos.nii.gz"
    second = folder.save_upload("name chaos.nii.gz", content)
    assert second == "uploads/name chaos-2.nii.gz"
    assert np.array_equal(read_volume(folder.resolve(second)).array, read_volume(folder.resolve(mr_relative)).array)
    with pytest.raises(InputError, match="over the upload limit of 3 MiB"):
        folder.save_upload("big.nii.gz", content + b"\0" * (2 * 2**20))
    with pytest.raises(InputError, match="not a volume file"):
        folder.save_upload("script.py", b"print(1)")
    assert sorted(p.name for p in (folder.root / "uploads").iterdir()) == ["name chaos-2.nii.gz", "name chaos.nii.gz"]


def test_output_names_are_reserved_against_a_second_tab(folder):
    stem = folder.free_stem("case_srcsm", (".seg.nrrd", "_labels.nii.gz"))
    assert stem == "case_srcsm"
    entered, release, errors = threading.Event(), threading.Event(), []

    def first_tab():
        with folder.reserve(f"{stem}.seg.nrrd") as target:
            entered.set()
            release.wait(5)
            target.write_bytes(b"first")

    t = threading.Thread(target=first_tab)
    t.start()
    entered.wait(5)
    try:
        # While the first tab writes, the second is refused and offered another name.
        with pytest.raises(InputError, match="being written by another tab"):
            with folder.reserve(f"{stem}.seg.nrrd"):
                errors.append("second writer got in")
        assert folder.free_stem("case_srcsm", (".seg.nrrd", "_labels.nii.gz")) == "case_srcsm-2"
    finally:
        release.set()
        t.join()
    assert not errors
    assert (folder.root / f"{stem}.seg.nrrd").read_bytes() == b"first"
    with pytest.raises(InputError, match="already exists"):
        with folder.reserve(f"{stem}.seg.nrrd"):
            pass
    with folder.reserve(f"{stem}.seg.nrrd", overwrite=True) as target:
        target.write_bytes(b"replaced")
    assert (folder.root / f"{stem}.seg.nrrd").read_bytes() == b"replaced"
