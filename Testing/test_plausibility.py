"""The plausibility check on real label maps and the bundled models' recorded training volumes."""

from __future__ import annotations

import numpy as np
import pytest

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.plausibility import Alternative, check_segmentation, label_volumes_ml

ALTERNATIVES = [Alternative("abdomen-ct-srcsm", "abdomen", "CT"), Alternative("abdomen-mr-srcsm", "abdomen", "MR"),
                Alternative("cardiac-bssfp-srcsm", "heart", "MR (bSSFP)")]


@pytest.fixture(scope="module")
def ct_card():
    return Catalog().find("abdomen-ct-srcsm").card


def _check(labelmap, card, roi=False):
    return check_segmentation(labelmap, card.labels, card.training_label_stats, card.id, card.anatomy, roi=roi,
                              alternatives=ALTERNATIVES)


def test_volumes_are_physical(shared_data):
    lab = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "labelsTr" / "chaos_05.nii.gz")
    card = Catalog().find("abdomen-mr-srcsm").card
    ml = label_volumes_ml(lab, card.labels)
    voxel_ml = float(np.prod(lab.geometry.spacing)) / 1000
    assert ml["liver"] == pytest.approx(np.count_nonzero(lab.array == 1) * voxel_ml)
    assert 800 < ml["liver"] < 3500 and 50 < ml["right kidney"] < 400  # organs in millilitres


def test_real_abdominal_labels_are_plausible_for_the_abdominal_model(shared_data, ct_card):
    """An expert label map of another domain (CHAOS MR) is what a right result looks like: no warning."""
    for case in ("chaos_01", "chaos_05", "chaos_10"):
        lab = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "labelsTr" / f"{case}.nii.gz")
        assert _check(lab, ct_card) == [], case


def test_missing_organ_and_empty_result_are_reported(shared_data, ct_card):
    lab = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "labelsTr" / "chaos_01.nii.gz")
    no_spleen = lab.with_array(np.where(lab.array == 4, 0, lab.array).astype(lab.array.dtype))
    (warning,) = _check(no_spleen, ct_card)
    assert "no spleen" in warning and "--model cardiac-bssfp-srcsm" in warning
    assert _check(no_spleen, ct_card, roi=True) == []  # a region of interest may leave an organ out
    empty = lab.with_array(np.zeros_like(lab.array))
    (warning,) = _check(empty, ct_card)
    assert "found none of its structures" in warning and "--model cardiac-bssfp-srcsm" in warning
    assert "region of interest" in _check(empty, ct_card, roi=True)[0]


def test_cardiac_structures_read_as_abdominal_organs_are_implausible(shared_data, ct_card):
    """What the abdominal model paints into a heart is heart-sized: far from any training liver."""
    lab = read_volume(shared_data / "Dataset504_CardiacLGE" / "labelsTr" / "pat_06.nii.gz")
    (warning,) = _check(lab, ct_card)
    assert "liver" in warning and "far smaller than in any training case" in warning
    assert warning.index("cardiac-bssfp-srcsm") < warning.index("abdomen-mr-srcsm")  # other anatomy first
    cardiac = Catalog().find("cardiac-bssfp-srcsm").card
    assert _check(lab, cardiac) == []  # and it is a plausible result for the cardiac model


def test_structure_far_larger_than_any_training_case(shared_data, ct_card):
    lab = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "labelsTr" / "chaos_01.nii.gz")
    huge = lab.with_array(np.where(lab.array == 0, 3, lab.array).astype(lab.array.dtype))  # background → kidney
    (warning,) = _check(huge, ct_card, roi=True)
    assert "left kidney" in warning and "far larger" in warning
