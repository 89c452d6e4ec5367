"""Source matching (SRCSM §2) on real CT and MR volumes."""

from __future__ import annotations

import numpy as np
import pytest

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Volume, read_volume
from SRCSMSegmenterLib.matching import (
    SourceProfile,
    fit_mapping,
    guess_modality,
    histogram,
    match,
    preprocess_for_matching,
)

CT_CASES = ["sabs_09", "sabs_10", "sabs_11", "sabs_12"]
MR_CASES = ["chaos_13", "chaos_15", "chaos_19"]


def _img(shared_data, ds: str, case: str) -> Volume:
    root = next(shared_data.glob(f"{ds}_*"))
    return read_volume(root / "imagesTr" / f"{case}_0000.nii.gz")


@pytest.fixture(scope="module")
def ct_profile(shared_data) -> SourceProfile:
    return SourceProfile.fit((_img(shared_data, "Dataset501", c).array for c in CT_CASES), "CT")


@pytest.fixture(scope="module")
def mr_profile(shared_data) -> SourceProfile:
    return SourceProfile.fit((_img(shared_data, "Dataset502", c).array for c in MR_CASES), "MR")


@pytest.fixture(scope="module")
def mr_volume(shared_data) -> Volume:
    return _img(shared_data, "Dataset502", "chaos_01")


def _wasserstein_to_profile(values: np.ndarray, profile: SourceProfile) -> float:
    """W1 distance between the masked value distribution of ``values`` and the profile (via quantiles)."""
    v = values.reshape(-1)
    v = v[(v != v.min()) & (v != v.max())].astype(np.float64)
    q = np.linspace(0.001, 0.999, 999)
    return float(np.mean(np.abs(np.quantile(v, q) - profile.quantile(q))))


def test_profile_pools_counts(shared_data, ct_profile):
    # pooled counts: the profile's voxel total equals the sum of the per-image masked histograms
    total = 0
    for c in CT_CASES:
        values, _ = preprocess_for_matching(_img(shared_data, "Dataset501", c).array, "CT")
        total += int(histogram(values).counts.sum())
    assert ct_profile.num_voxels == total
    assert ct_profile.num_images == len(CT_CASES)
    assert ct_profile.cdf[-1] == pytest.approx(1.0)
    # the CT data are clipped to [-125, 275] HU: the clip values are the image min/max and are excluded
    assert ct_profile.overall_min == -125
    assert -125 < ct_profile.values[0] and ct_profile.values[-1] < 275


def test_mr_moves_onto_ct_profile(mr_volume, ct_profile):
    before_values, _ = preprocess_for_matching(mr_volume.array, "MR")
    matched = match(mr_volume, ct_profile, "MR")
    w_before = _wasserstein_to_profile(before_values, ct_profile)
    w_after = _wasserstein_to_profile(matched.array, ct_profile)
    assert w_after < w_before / 10, (w_before, w_after)
    assert w_after < 5.0  # HU
    # geometry travels unchanged
    assert matched.geometry == mr_volume.geometry
    assert matched.array.shape == mr_volume.array.shape
    assert matched.array.dtype == np.int16
    # the target minimum maps to the source overall minimum, the maximum to the source's top key
    assert matched.array[mr_volume.array == mr_volume.array.min()].max() == ct_profile.overall_min
    assert matched.array[mr_volume.array == mr_volume.array.max()].min() == ct_profile.values[-1]


def test_ct_moves_onto_mr_profile(shared_data, mr_profile):
    ct = _img(shared_data, "Dataset501", "sabs_00")
    before, _ = preprocess_for_matching(ct.array, "CT")
    matched = match(ct, mr_profile, "CT")
    assert _wasserstein_to_profile(matched.array, mr_profile) < _wasserstein_to_profile(before, mr_profile) / 10


def test_mapping_is_monotone(mr_volume, ct_profile):
    mapping = fit_mapping(mr_volume.array, ct_profile, "MR")
    assert np.all(np.diff(mapping.lut.astype(int)) >= 0)
    # voxel-wise: a brighter input voxel never becomes darker than a dimmer one
    matched = match(mr_volume, ct_profile, "MR").array.reshape(-1)
    order = np.argsort(mr_volume.array.reshape(-1), kind="stable")
    assert np.all(np.diff(matched[order].astype(int)) >= 0)


def test_matching_twice_changes_almost_nothing(mr_volume, ct_profile):
    once = match(mr_volume, ct_profile, "MR")
    twice = match(once, ct_profile)  # auto modality
    diff = np.abs(twice.array.astype(int) - once.array.astype(int))
    # The paper's step mapping lands one profile key below the textbook quantile, and the second pass's
    # mask drops the voxels the first pass sent to the source minimum: in HU this is ~1 on average...
    assert diff.mean() < 2.0
    # ...and in rank (source CDF) terms the voxels barely move, even in the sparse bright tail.
    g = lambda a: np.interp(a.reshape(-1), ct_profile.values, ct_profile.cdf)  # noqa: E731
    rank_shift = np.abs(g(twice.array) - g(once.array))
    assert np.percentile(rank_shift, 99) < 0.02
    assert np.mean(twice.array == once.array) > 0.4


def test_float_mr_is_not_truncated(mr_volume, ct_profile):
    # the same image scaled into 0..1 floats must match exactly like its integer original
    as_float = Volume(mr_volume.array.astype(np.float32) / float(mr_volume.array.max()), mr_volume.geometry)
    a = match(mr_volume, ct_profile, "MR").array
    b = match(as_float, ct_profile, "MR").array
    assert np.mean(a == b) > 0.999
    # a naive int cast would have collapsed it to {0, 1}: the matched image keeps many levels
    assert np.unique(b).size > 100


def test_guess_modality(shared_data, mr_volume):
    assert guess_modality(mr_volume.array) == "MR"
    # the published CT is already windowed to [-125, 275] HU: still recognised as CT
    assert guess_modality(_img(shared_data, "Dataset501", "sabs_00").array) == "CT"
    for case in ("pat_01", "pat_02"):  # cardiac MR
        root = next(shared_data.glob("Dataset503_*"))
        assert guess_modality(read_volume(root / "imagesTr" / f"{case}_0000.nii.gz").array) == "MR"
    hu = Volume(np.concatenate([np.full((2, 8, 8), -1000, np.int16), np.zeros((2, 8, 8), np.int16)]),
                mr_volume.geometry)
    assert guess_modality(hu.array) == "CT"


def test_binary_image_is_rejected(mr_volume, ct_profile):
    binary = (mr_volume.array > 200).astype(np.int16)
    with pytest.raises(InputError, match="fewer than two intensity levels"):
        match(Volume(binary, mr_volume.geometry), ct_profile, "MR")


def test_profile_round_trips_through_json(ct_profile):
    again = SourceProfile.model_validate_json(ct_profile.model_dump_json())
    assert again == ct_profile


def test_profile_validation_rejects_bad_cdf():
    with pytest.raises(ValueError):
        SourceProfile(modality="CT", values=[1, 2, 3], cdf=[0.5, 0.4, 1.0], overall_min=0, num_images=1, num_voxels=3)
    with pytest.raises(ValueError):
        SourceProfile(modality="CT", values=[3, 2, 1], cdf=[0.2, 0.4, 1.0], overall_min=0, num_images=1, num_voxels=3)


# --------------------------------------------------------- integer images: counted and mapped by raw value


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "uint8"])
def test_integer_images_match_exactly_like_their_float_twin(shared_data, mr_volume, ct_profile, mr_profile, dtype):
    """An integer image goes through its raw values (one count, one lookup: RawMapping); the same
    values stored as float go through the general path (preprocess, histogram, lookup). Both must
    give identical voxels and the identical mapping, for CT and MR targets onto CT and MR profiles."""
    from SRCSMSegmenterLib.matching import fit_raw_mapping, source_match

    ct = _img(shared_data, "Dataset501", "sabs_00")
    cases = [(ct, mr_profile, "CT"), (mr_volume, ct_profile, "MR"), (mr_volume, mr_profile, "MR")]
    for volume, profile, modality in cases:
        values = volume.array.astype(np.int64)
        if dtype in ("uint16", "uint8"):  # a scanner's unsigned storage: shifted to start at 0
            values = values - values.min()
        if dtype == "uint8":  # fewer levels: an 8-bit export
            values = values * 255 // values.max()
        if modality == "CT" and dtype.startswith("uint"):
            continue  # unsigned data are not Hounsfield units
        integer = Volume(values.astype(dtype), volume.geometry)
        as_float = Volume(values.astype(np.float64), volume.geometry)
        assert fit_raw_mapping(integer.array, profile, modality) is not None
        assert fit_raw_mapping(as_float.array, profile, modality) is None
        a = match(integer, profile, modality)
        b = match(as_float, profile, modality)
        assert a.array.dtype == b.array.dtype == np.int16
        assert np.array_equal(a.array, b.array), (dtype, modality)
        assert np.array_equal(fit_mapping(integer.array, profile, modality).lut,
                              fit_mapping(as_float.array, profile, modality).lut)
        # float32 output for the network: the same values
        f, mapping = source_match(integer, profile, modality, dtype=np.float32)
        assert f.array.dtype == np.float32 and np.array_equal(f.array, a.array.astype(np.float32))
        assert f.geometry == volume.geometry
        assert mapping.lut[0] == a.array.min()  # the matched minimum, as inference uses it (no pass)


def test_raw_mapping_applies_to_strided_blocks(mr_volume, ct_profile):
    """Resampling hands the lookup column tiles of the volume (strided views): same values."""
    from SRCSMSegmenterLib.matching import fit_raw_mapping

    raw = fit_raw_mapping(mr_volume.array, ct_profile, "MR")
    full = raw.apply(mr_volume.array, np.float32)
    columns = mr_volume.array.reshape(mr_volume.array.shape[0], -1)
    block = columns[:, 1000:3000]
    out = np.empty(block.shape, np.float32)
    raw.apply_into(block, out)
    assert np.array_equal(out, full.reshape(full.shape[0], -1)[:, 1000:3000])


def test_histogram_from_counts_is_the_histogram(mr_volume):
    from SRCSMSegmenterLib.matching import histogram_from_counts

    values, _ = preprocess_for_matching(mr_volume.array, "MR")
    h = histogram(values)
    counts = np.bincount(values.reshape(-1).astype(np.int64) + 7)  # 7 empty values in front
    g = histogram_from_counts(np.concatenate([counts, np.zeros(5, np.int64)]), -7)
    assert np.array_equal(h.keys, g.keys) and np.array_equal(h.counts, g.counts)
    assert (h.minimum, h.maximum) == (g.minimum, g.maximum)
    with pytest.raises(InputError, match="empty"):
        histogram_from_counts(np.zeros(4, np.int64), 0)
