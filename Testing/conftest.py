"""Shared pytest fixtures. Each group below belongs to one area; add new groups rather than editing others."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from headless_slicer import new_slicer_app

# =============================================================================================
# Real data (../shared/data) and headless Slicer scenes — used by test_segio.py, test_mrml.py
# =============================================================================================

#: Where the real datasets live: ``shared/data`` beside the repository root (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the real datasets. Missing data is a broken test set-up, so it fails (never skips)."""
    if not (SHARED_DATA / "Dataset502_AbdomenMRT2" / "dataset.json").is_file():
        pytest.fail(
            f"Real test data not found at '{SHARED_DATA}'. The tests read the nnU-Net datasets from "
            f"'shared/data' next to the repository root; mount or copy them there (see "
            f"shared/data/README.md).",
            pytrace=False,
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_case(shared_data):
    """``real_case(dataset_prefix, case)`` → (image path, label path, LabelTable) of a real case.

    ``dataset_prefix`` is e.g. "Dataset502"; the table comes from that dataset's dataset.json.
    """
    from SRCSMSegmenterLib.labels import label_table_from_dataset_labels

    def get(dataset_prefix: str, case: str):
        matches = sorted(shared_data.glob(f"{dataset_prefix}_*"))
        if not matches:
            pytest.fail(f"No dataset '{dataset_prefix}_*' in '{shared_data}'.", pytrace=False)
        root = matches[0]
        image, label = root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz"
        for path in (image, label):
            if not path.is_file():
                pytest.fail(f"Test case file missing: '{path}'.", pytrace=False)
        labels = json.loads((root / "dataset.json").read_text(encoding="utf-8"))["labels"]
        return image, label, label_table_from_dataset_labels(labels)

    return get


@pytest.fixture
def slicer_app():
    """A fresh headless Slicer "application" per test: ``.scene``, ``.app_logic``, ``.colors``,
    ``.volumes``, ``.segmentations``.

    Like Slicer, it also sets the ``slicer.mrmlScene`` global and a ``slicer.modules`` shim (some
    ``slicer.util`` helpers read them); both are restored afterwards. Library code must not rely on
    them — test_mrml.py checks that by removing them.
    """
    import slicer

    missing = object()
    saved = {key: getattr(slicer, key, missing) for key in ("mrmlScene", "modules")}
    app = new_slicer_app()
    slicer.mrmlScene = app.scene
    slicer.modules = types.SimpleNamespace(
        **{key: types.SimpleNamespace(logic=lambda lg=lg: lg)
           for key, lg in (("colors", app.colors), ("volumes", app.volumes),
                           ("segmentations", app.segmentations))})
    try:
        yield app
    finally:
        app.scene.Clear(1)
        for key, value in saved.items():
            if value is missing:
                if hasattr(slicer, key):
                    delattr(slicer, key)
            else:
                setattr(slicer, key, value)


def _same_labels_physically(actual, expected, values=None) -> None:
    """Assert that two labelmaps put the same labels at the same places in the world.

    Compares physically, not array against array, because readers may legitimately run an axis the
    other way (Slicer reverses the slices of left-handed images). Every voxel of ``actual`` holding
    a label must sit on a voxel centre of ``expected`` holding the same label, and the counts agree.
    """
    import numpy as np

    assert sorted(actual.shape) == sorted(expected.shape), (actual.shape, expected.shape)
    if values is None:
        found = set(np.unique(actual.array).tolist()) | set(np.unique(expected.array).tolist())
        values = sorted(found - {0})
    for value in values:
        kji = np.argwhere(np.asarray(actual.array) == value)
        expected_count = int(np.count_nonzero(np.asarray(expected.array) == value))
        assert len(kji) == expected_count, f"label {value}: {len(kji)} voxels, expected {expected_count}"
        if not len(kji):
            continue
        world = actual.geometry.index_to_physical(kji[:, ::-1].astype(float))
        index = expected.geometry.physical_to_index(world)
        nearest = np.rint(index)
        assert np.abs(index - nearest).max() < 1e-3, "voxel centres do not coincide"
        i, j, k = nearest.astype(int).T
        shape = np.asarray(expected.array).shape
        assert i.min() >= 0 and j.min() >= 0 and k.min() >= 0
        assert i.max() < shape[2] and j.max() < shape[1] and k.max() < shape[0]
        assert np.all(np.asarray(expected.array)[k, j, i] == value), f"label {value} misplaced"


@pytest.fixture(scope="session")
def same_labels_physically():
    """The physical labelmap comparison above, as a fixture (conftest helpers are not importable)."""
    return _same_labels_physically


# =============================================================================================
# Model packages trained by the tests themselves (real trainer, real cases) — see model_fixtures.py
# =============================================================================================
from model_fixtures import tiny_model  # noqa: E402,F401
