"""Windowing before source matching: a raw scanner CT and its HU-clipped twin are one image to a model
whose source CT was clipped (docs/departures.md, item "CT window before matching").

The raw CT is synthesised from a real BTCV case (train/perturbations.py ``raw_hu``): the clipped floor
becomes noisy air (−1024…−880 HU), the ceiling bone up to 1500 HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SRCSMSegmenterLib import cli, matching
from SRCSMSegmenterLib.image import read_volume, write_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.modelpackage import load_package
from train.metrics import evaluate_case, read_label_map
from train.perturbations import raw_hu


@pytest.fixture(scope="module")
def ct_package():
    return load_package(Path(__file__).resolve().parents[1] / "Resources" / "Models" / "abdomen-ct-srcsm")


@pytest.fixture(scope="module")
def clipped_and_raw(real_case):
    image_path, label_path, _ = real_case("Dataset501", "sabs_01")
    image = read_volume(image_path)
    return image, raw_hu(image, seed=3), read_label_map(label_path)


def test_the_window_is_the_source_profiles_range(ct_package):
    profile = ct_package.card.source_profile
    assert matching.match_window(profile, "CT") == (profile.overall_min, profile.values[-1]) == (-125, 272)
    assert matching.match_window(profile, "MR") is None  # MR targets keep SM's own rule
    mr_card = load_package(ct_package.location.parent / "abdomen-mr-srcsm").card
    assert matching.match_window(mr_card.source_profile, "CT") is None  # MR source: nothing to window
    # a source profile of raw CT spans SM's whole range: nothing changes
    rng = np.random.default_rng(0)
    raw_source = [rng.integers(-1024, 1500, size=(8, 32, 32)).astype(np.int16) for _ in range(2)]
    raw_profile = matching.SourceProfile.fit(raw_source, "CT")
    assert matching.match_window(raw_profile, "CT") is None


def test_raw_ct_is_matched_exactly_like_its_clipped_twin(ct_package, clipped_and_raw):
    clipped, raw, _ = clipped_and_raw
    profile = ct_package.card.source_profile
    assert raw.array.min() < -880 and raw.array.max() > 1000  # really raw: air and bone outside the window
    a = matching.match(clipped, profile, "CT")
    b = matching.match(raw, profile, "CT")
    assert np.array_equal(a.array, b.array)
    # the preview's mapping curve is the same function too
    ma, mb = matching.fit_mapping(clipped.array, profile, "CT"), matching.fit_mapping(raw.array, profile, "CT")
    assert (ma.minimum, mb.minimum) == (-125, -125) and np.array_equal(ma.lut, mb.lut)


def test_sm_of_the_clipped_ct_is_near_identity(ct_package, clipped_and_raw):
    """Inside the window SM only re-maps tissue monotonically between patients (it normalises contrast
    phase, a few tens of HU); the floor stays the floor. Unwindowed, the raw twin's air is ranked
    against the source's soft tissue and everything moves up (what the window prevents)."""
    clipped, raw, label = clipped_and_raw
    profile = ct_package.card.source_profile
    matched = matching.match(clipped, profile, "CT").array.astype(np.float64)
    original = clipped.array.astype(np.float64)
    inside = (original > -125) & (original < 272)
    assert np.corrcoef(matched[inside], original[inside])[0, 1] > 0.98
    assert np.mean(np.abs(matched[inside] - original[inside]) <= 60) > 0.9
    assert np.all(matched[original == -125] == profile.overall_min)
    organs = label.array > 0
    assert abs(np.median(matched[organs] - original[organs])) < 60
    # what the old rule (no window) did to the raw twin: visibly not the clipped case's mapping
    values, scale = matching.preprocess_for_matching(raw.array, "CT")
    unwindowed = matching.fit_mapping(raw.array, profile, "CT", values=values.copy(), scale=scale)
    old = unwindowed.apply_inplace(values).astype(np.float64)
    assert np.mean(old[organs] == matched[organs]) < 0.5


def test_raw_and_clipped_ct_give_the_same_labels(ct_package, clipped_and_raw):
    clipped, raw, label = clipped_and_raw
    segmenter = Segmenter(ct_package, device="cpu")
    a = segmenter.segment(clipped, target_modality="CT").labelmap
    b = segmenter.segment(raw, target_modality="auto").labelmap  # auto: raw HU is recognised as CT
    assert np.mean(a.array == b.array) >= 0.99
    names = {lab.value: lab.name for lab in ct_package.card.labels.labels}
    for row in evaluate_case(b, a, names):
        assert row["dice"] >= 0.99, row
    # and the result is a real segmentation of the case, not two equally empty maps
    assert np.nanmean([r["dice"] for r in evaluate_case(b, label, names)]) > 0.7


def test_srcsm_match_windows_a_raw_ct(ct_package, clipped_and_raw, tmp_path):
    clipped, raw, _ = clipped_and_raw
    src = write_volume(raw, tmp_path / "raw.nii.gz")
    out = tmp_path / "matched.nii.gz"
    assert cli.main(["match", str(src), str(out), "--model", str(ct_package.location), "--progress", "none"]) == 0
    expected = matching.match(clipped, ct_package.card.source_profile, "CT")
    assert np.array_equal(read_volume(out).array, expected.array)
