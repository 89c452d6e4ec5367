"""Whole-volume inference: exact output geometry, physical consistency, precision, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SRCSMSegmenterLib.errors import CancelledError
from SRCSMSegmenterLib.image import Geometry, Volume, read_volume
from SRCSMSegmenterLib.inference import Segmenter, count_windows, keep_largest_components
from SRCSMSegmenterLib.modelpackage import load_package
from SRCSMSegmenterLib.preprocessing import to_model_grid


@pytest.fixture(scope="module")
def package(tiny_model):
    return load_package(tiny_model)


@pytest.fixture(scope="module")
def mr_case(shared_data):
    root = next(shared_data.glob("Dataset502_*"))
    return read_volume(root / "imagesTr" / "chaos_02_0000.nii.gz"), read_volume(root / "labelsTr" / "chaos_02.nii.gz")


def _flip_x(vol: Volume) -> Volume:
    """Same physical image with the I axis reversed (LPS-ish → LAS-ish header)."""
    d = vol.geometry.direction_matrix.copy()
    n = vol.array.shape[2]
    origin = vol.geometry.index_to_physical(np.array([n - 1, 0, 0], float))
    d[:, 0] *= -1
    return Volume(vol.array[:, :, ::-1].copy(), Geometry(tuple(origin), vol.geometry.spacing, tuple(d.ravel())))


def _rotate_header(vol: Volume, degrees: float) -> Volume:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Volume(vol.array, Geometry(vol.geometry.origin, vol.geometry.spacing,
                                      tuple((rot @ vol.geometry.direction_matrix).ravel())))


def test_output_has_the_input_grid(package, mr_case):
    image, _ = mr_case
    for variant in (image, _flip_x(image), _rotate_header(image, 25)):
        result = Segmenter(package, device="cpu").segment(variant)
        assert result.labelmap.array.shape == variant.array.shape
        assert result.labelmap.array.dtype == np.uint8
        assert result.labelmap.geometry == variant.geometry
        assert set(np.unique(result.labelmap.array)) <= {0, 1, 2, 3, 4}


def test_flipped_header_gives_the_physically_same_segmentation(package, mr_case):
    """An LAS copy (array reversed, header adjusted) is the same physical image: the model grid and so
    the prediction are the same, and the result flipped back equals the original's."""
    image, _ = mr_case
    seg = Segmenter(package, device="cpu", precision="fp32")
    a = seg.segment(image).labelmap.array
    b = seg.segment(_flip_x(image)).labelmap.array[:, :, ::-1]
    assert np.mean(a == b) > 0.999


class _OracleSegmenter(Segmenter):
    """Replaces the network by the reference labels on the model grid: isolates the geometry chain
    (model grid, resampling, probabilities back to the input grid) from model quality."""

    def __init__(self, package, reference: Volume, spacing):
        super().__init__(package, device="cpu", precision="fp32")
        self.card = package.card.model_copy(update={"spacing": spacing})
        self.reference = reference

    def prepare(self, volume, *args, **kwargs):
        x, grid, norm = super().prepare(volume, *args, **kwargs)
        self._grid = grid
        return x, grid, norm

    def _predict(self, x, device, precision):
        lab = to_model_grid(self.reference, self._grid, is_label=True).array
        return torch.nn.functional.one_hot(torch.from_numpy(lab).long(), 5).permute(3, 0, 1, 2).float()


@pytest.mark.parametrize("variant", ["as_is", "flipped", "oblique"])
def test_geometry_chain_with_an_oracle_network(package, mr_case, variant):
    image, reference = mr_case
    if variant == "flipped":
        image, reference = _flip_x(image), _flip_x(reference)
    if variant == "oblique":
        image, reference = _rotate_header(image, 30), _rotate_header(reference, 30)
    result = _OracleSegmenter(package, reference, (2.0, 2.0, 2.0)).segment(image, source_matching=False)
    pred, ref = result.labelmap.array, reference.array
    for value in (1, 2, 3, 4):
        p, r = pred == value, ref == value
        dice = 2 * (p & r).sum() / (p.sum() + r.sum())
        assert dice > 0.9, (variant, value, dice)


def test_bf16_agrees_with_fp32(package, mr_case):
    image, _ = mr_case
    seg32 = Segmenter(package, device="cpu", precision="fp32")
    x, grid, _ = seg32.prepare(image)
    p32 = seg32._predict(x, torch.device("cpu"), "fp32")
    p16 = Segmenter(package, device="cpu", precision="bf16")._predict(x, torch.device("cpu"), "bf16")
    assert p16.dtype == torch.float32
    assert float((p32 - p16).abs().mean()) < 0.01
    assert float((p32.argmax(0) == p16.argmax(0)).float().mean()) > 0.98


def test_progress_and_cancel(package, mr_case):
    image, _ = mr_case
    seen = []
    Segmenter(package, device="cpu", progress=lambda f, m: seen.append((f, m))).segment(image)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("window" in m for _, m in seen)

    calls = {"n": 0}

    def cancel_after_a_few():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(CancelledError):
        Segmenter(package, device="cpu", cancel=cancel_after_a_few).segment(image)


def test_gpu_out_of_memory_falls_back_to_cpu(package, mr_case, monkeypatch):
    image, _ = mr_case
    seg = Segmenter(package, device="cpu")
    seg.device = torch.device("cuda")  # pretend we run on a GPU
    seg.precision = "fp16"
    real = Segmenter._predict

    def predict(self, x, device, precision):
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, x, device, precision)

    monkeypatch.setattr(Segmenter, "_predict", predict)
    result = seg.segment(image)
    assert result.device == "cpu"
    assert any("ran out of memory" in m for m in result.messages)
    assert result.labelmap.array.shape == image.array.shape


def test_roi_limits_the_output(package, mr_case):
    image, _ = mr_case
    lo_idx, hi_idx = np.array([60, 60, 5]), np.array([180, 180, 25])
    a = image.geometry.index_to_physical(lo_idx.astype(float))
    b = image.geometry.index_to_physical(hi_idx.astype(float))
    bounds = (np.minimum(a, b), np.maximum(a, b))
    seg = Segmenter(package, device="cpu")
    lab = seg.segment(image, roi_bounds=bounds).labelmap.array
    outside = np.ones_like(lab, dtype=bool)
    outside[lo_idx[2] + 2:hi_idx[2] - 1, lo_idx[1] + 4:hi_idx[1] - 3, lo_idx[0] + 4:hi_idx[0] - 3] = False
    # nothing is labelled well outside the ROI (a voxel of slack for the resampling)
    k, j, i = np.nonzero(lab)
    pts = image.geometry.index_to_physical(np.stack([i, j, k], 1).astype(float))
    assert np.all((pts >= bounds[0] - 8) & (pts <= bounds[1] + 8))


def test_keep_largest_components():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[6:9, 6:9, 6:9] = 1
    lab[0, 9, 9] = 2
    out = keep_largest_components(lab.copy(), [1, 2, 3])
    assert (out == 1).sum() == 27 and (out == 2).sum() == 1


def test_count_windows_matches_monai(package):
    from monai.inferers import sliding_window_inference

    calls = []
    x = torch.zeros(1, 1, 50, 70, 33)

    def pred(p):
        calls.append(1)
        return p

    sliding_window_inference(x, (32, 32, 32), 1, pred, overlap=0.5)
    assert count_windows((50, 70, 33), (32, 32, 32), 0.5) == len(calls)


@pytest.mark.parametrize("variant", ["as_is", "flipped"])
def test_separable_resampling_matches_simpleitk(mr_case, variant):
    """The fast axis-aligned path gives the labels of per-channel SimpleITK resampling + argmax."""
    from scipy import ndimage

    from SRCSMSegmenterLib.preprocessing import argmax_in_target_grid, model_grid, resample_channel_to

    image, _ = mr_case
    if variant == "flipped":
        image = _flip_x(image)
    grid = model_grid(image.geometry, image.shape, (4.8, 4.8, 4.8))
    rng = np.random.default_rng(0)
    logits = ndimage.gaussian_filter(rng.normal(size=(5, *grid.shape_kji)), (0, 2, 2, 2)) * 20
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    fast = argmax_in_target_grid(probs.astype(np.float32), grid, image.geometry, image.shape)
    channels = [resample_channel_to(probs[c], grid, image.geometry, image.shape, 1.0 if c == 0 else 0.0)
                for c in range(5)]
    reference = np.argmax(np.stack(channels), axis=0)
    assert np.mean(fast == reference) > 0.9999
    assert set(np.unique(fast)) == set(range(5))
