"""Fixtures for the web front end's tests (Testing/web/): a data folder holding a real MR case.

The case is read from ../shared/data at test time and copied into the test's temporary folder (the
page's data folder must be writable; the shared data are read-only) — never into the project.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

#: A small real MR T2 case (CHAOS, 256×256×36): the bundled CT model's cross-domain target.
MR_CASE = ("Dataset502", "chaos_01")


@pytest.fixture
def mr_data_dir(tmp_path, real_case, monkeypatch) -> Path:
    """A fresh data folder with one real MR case in the nnU-Net layout (``imagesTr/…``)."""
    image, _, _ = real_case(*MR_CASE)
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    shutil.copyfile(image, data / "imagesTr" / image.name)
    os.chmod(data / "imagesTr" / image.name, 0o644)
    # Models: only the bundled ones (a user's installed models must not change what the tests see).
    monkeypatch.setenv("SRCSM_HOME", str(tmp_path / "srcsm-home"))
    return data


@pytest.fixture
def mr_relative() -> str:
    return f"imagesTr/{MR_CASE[1]}_0000.nii.gz"
