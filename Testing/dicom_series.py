"""Small synthetic DICOM series cut from a real case (SimpleITK's writer, real geometry tags).

Used by the image-IO and CLI tests: a folder with two series (which one is read, and said), a series
with a missing slice (our message, not ITK's raw warning).
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

STUDY_UID = "1.2.826.0.1.3680043.2.1125.77"


def write_series(image: sitk.Image, folder: Path, uid: str, description: str, k0: int, k1: int,
                 skip: tuple[int, ...] = ()) -> list[Path]:
    """Slices ``k0 … k1-1`` of ``image`` (minus ``skip``) as one MR DICOM series in ``folder``.

    Each slice carries the position and orientation of its place in ``image``, so the series read back
    must lie where the slab lies in the world."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    sx, sy, sz = image.GetSpacing()
    written = []
    for k in range(k0, k1):
        if k in skip:
            continue
        sl = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
            "0008|0018": f"{uid}.{k}",
            "0008|0060": "MR",
            "0008|103e": description,
            "0010|0020": "SRCSM-TEST",
            "0020|000d": STUDY_UID,
            "0020|000e": uid,
            "0020|0013": str(k - k0 + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",
            "0018|0050": f"{sz:.6f}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        path = folder / f"{uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        written.append(path)
    return written
