"""Whole-volume inference: exact output geometry, physical consistency, precision, progress, cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SRCSMSegmenterLib.errors import CancelledError
from SRCSMSegmenterLib.image import Geometry, Volume, read_volume
from SRCSMSegmenterLib.inference import Segmenter, count_windows, keep_largest_components
from SRCSMSegmenterLib.modelpackage import load_package
from SRCSMSegmenterLib.preprocessing import argmax_in_target_grid, model_grid, needed_mask, to_model_grid
from SRCSMSegmenterLib.resampling import axis_positions


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

    def _predict(self, x, device, precision, needed=None, messages=None):
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

    def predict(self, x, device, precision, **kwargs):
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, x, device, precision, **kwargs)

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


@pytest.mark.parametrize("variant", ["as_is", "flipped", "oblique", "header_noise"])
def test_separable_resampling_matches_simpleitk(shared_data, variant):
    """The fast paths (axis-aligned: separable; rotated: per-slab affine; both interpolating only
    mixed cells) give the labels of per-channel SimpleITK resampling + argmax."""
    from scipy import ndimage

    from SRCSMSegmenterLib.preprocessing import resample_channel_to

    # CHAOS case 1 is axis-aligned (case 2, the module's mr_case, is tilted by 0.27°)
    image = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "imagesTr" / "chaos_01_0000.nii.gz")
    if variant == "flipped":
        image = _flip_x(image)
    if variant == "oblique":
        image = _rotate_header(image, 25)
    if variant == "header_noise":  # direction cosines off by 1e-8, as scanners write them: still axis-aligned
        image = _rotate_header(image, 1e-6)
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
    aligned = axis_positions(grid.geometry, grid.shape_kji, image.geometry, image.shape) is not None
    assert aligned == (variant != "oblique")


# ------------------------------------------------------------------ issue 16: cost ∝ what is produced

BUNDLED = Path(__file__).resolve().parents[1] / "Resources" / "Models"


@pytest.fixture(scope="module")
def bundled():
    return {name: load_package(BUNDLED / name) for name in ("abdomen-ct-srcsm", "cardiac-bssfp-srcsm")}


@pytest.fixture(scope="module")
def cine_stack(shared_data):
    """A real oblique bSSFP short-axis stack (192×192×13, 1.25×1.25×12 mm)."""
    return read_volume(shared_data / "Dataset503_CardiacBSSFP" / "imagesTr" / "pat_01_0000.nii.gz")


def test_needed_mask_holds_every_model_voxel_the_resampling_back_reads(bundled, cine_stack):
    """Physically: each input voxel centre, mapped to world and into the model grid, has its eight
    interpolation corners in the mask; and the mask of an oblique stack is a small part of its box."""
    card = bundled["cardiac-bssfp-srcsm"].card
    grid = model_grid(cine_stack.geometry, cine_stack.shape, card.spacing)
    needed = needed_mask(grid, cine_stack.geometry, cine_stack.shape)
    k, j, i = np.meshgrid(*[np.arange(n) for n in cine_stack.shape], indexing="ij")
    world = cine_stack.geometry.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1).astype(float))
    idx = grid.geometry.physical_to_index(world)  # (N, 3) x, y, z continuous model indices
    lo = np.floor(idx).astype(int)
    for corner in np.ndindex(2, 2, 2):
        c = np.clip(lo + np.array(corner), 0, np.array(grid.size) - 1)
        assert needed[c[:, 2], c[:, 1], c[:, 0]].all(), corner
    assert needed.mean() < 0.5


def test_skipped_windows_do_not_change_the_field_of_view(bundled, cine_stack):
    """Windows holding no needed voxel are skipped; where the output reads, the probabilities are
    bit-identical to MONAI's sliding_window_inference over the whole world-aligned box."""
    from monai.inferers import sliding_window_inference

    from SRCSMSegmenterLib.sliding_window import needed_windows, sliding_window_probabilities

    package = bundled["cardiac-bssfp-srcsm"]
    seg = Segmenter(package, device="cpu", precision="fp32")
    # 32³ windows at 3 mm: small enough beside the stack that some hold no needed voxel, cheap to run
    seg.card = package.card.model_copy(update={"spacing": (3.0, 3.0, 3.0), "patch_size": (32, 32, 32)})
    x, grid, _ = seg.prepare(cine_stack, target_modality="MR")
    needed = needed_mask(grid, cine_stack.geometry, cine_stack.shape)
    net = seg.network(torch.device("cpu"), "fp32")
    roi = (32, 32, 32)

    def predictor(patch):
        return torch.softmax(net(patch), dim=1)

    with torch.inference_mode():
        ours = sliding_window_probabilities(torch.from_numpy(x), roi, predictor, overlap=0.5, mode="gaussian",
                                            cval=float(x.min()), needed=needed)
        monai = sliding_window_inference(torch.from_numpy(x)[None, None], roi, 1, predictor, overlap=0.5,
                                         mode="gaussian", padding_mode="constant", cval=float(x.min()))[0]
    run, total = needed_windows(needed, roi, 0.5)
    assert total == count_windows(x.shape, roi, 0.5)
    assert len(run) < total, (len(run), total)
    mask = torch.from_numpy(needed)
    assert torch.equal(ours[:, mask], monai[:, mask])
    a = argmax_in_target_grid(ours.numpy(), grid, cine_stack.geometry, cine_stack.shape)
    b = argmax_in_target_grid(monai.numpy(), grid, cine_stack.geometry, cine_stack.shape)
    assert np.array_equal(a, b)
    assert (a > 0).mean() > 0.01  # the network does label the heart, so the comparison is not vacuous


@pytest.mark.parametrize("image_size, roi, overlap", [
    ((202, 225, 212), (80, 80, 80), 0.5), ((65, 64, 65), (80, 64, 80), 0.25), ((81, 160, 79), (80, 64, 80), 0.5),
    ((7, 300, 33), (32, 32, 32), 0.25), ((96, 96, 96), (96, 96, 96), 0.5), ((100, 41, 250), (48, 40, 64), 0.6)])
def test_window_tiling_and_weights_are_monais(image_size, roi, overlap):
    """Our window positions, their order and the Gaussian blending weights are MONAI's (restated so a
    cold ``srcsm segment`` need not import monai): equal slices, bit-equal weights."""
    from monai.data.utils import compute_importance_map, dense_patch_slices

    from SRCSMSegmenterLib.sliding_window import gaussian_importance_map, scan_interval, window_slices

    padded = tuple(max(s, r) for s, r in zip(image_size, roi))
    theirs = dense_patch_slices(padded, roi, scan_interval(padded, roi, overlap))
    assert window_slices(image_size, roi, overlap) == list(theirs)
    assert torch.equal(gaussian_importance_map(roi), compute_importance_map(roi, mode="gaussian", sigma_scale=0.125))


def test_segmenting_does_not_import_monai(tmp_path, shared_data):
    """Importing monai costs seconds of every cold ``srcsm segment``; the inference path must not."""
    import subprocess
    import sys

    image = shared_data / "Dataset502_AbdomenMRT2" / "imagesTr" / "chaos_01_0000.nii.gz"
    code = ("import sys; from SRCSMSegmenterLib.cli import main; rc = main(['segment', sys.argv[1], sys.argv[2], "
            "'--progress', 'none', '--device', 'cpu']); "
            "assert 'monai' not in sys.modules, 'monai was imported'; sys.exit(rc)")
    out = tmp_path / "seg.nii.gz"
    proc = subprocess.run([sys.executable, "-c", code, str(image), str(out)], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()


@pytest.mark.parametrize("case", ["sabs_00", "chaos_01_flipped", "chaos_02_tilted"])
def test_fast_resampling_to_the_model_grid_matches_simpleitk(shared_data, case):
    """Smoothing + resampling per axis (axis-aligned inputs) gives SimpleITK's model-grid image;
    a slightly tilted input (CHAOS case 2, 0.27°) falls back to SimpleITK itself."""
    from SRCSMSegmenterLib.preprocessing import smooth
    from SRCSMSegmenterLib.resampling import smooth_and_resample

    name = case.split("_")[0] + "_" + case.split("_")[1]
    root = shared_data / ("Dataset501_AbdomenCT" if name.startswith("sabs") else "Dataset502_AbdomenMRT2")
    vol = read_volume(root / "imagesTr" / f"{name}_0000.nii.gz")
    if case.endswith("flipped"):
        vol = _flip_x(vol)
    for spacing in ((4.8, 4.8, 4.8), (2.0, 2.0, 2.0)):
        grid = model_grid(vol.geometry, vol.shape, spacing)
        default = float(vol.array.min()) - 1000.0  # a value no voxel holds (the CT is clipped at its min)
        fast = smooth_and_resample(vol.array, vol.geometry, grid.geometry, grid.shape_kji, 1.0, default)
        if case.endswith("tilted"):
            assert fast is None
            continue
        ref = sitk.Resample(smooth(vol, 1.0), grid.geometry.apply_to(sitk.Image(list(grid.size), sitk.sitkFloat32)),
                            sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        ref = sitk.GetArrayFromImage(ref)
        span = float(vol.array.max() - vol.array.min())
        assert np.abs(fast - ref).max() < 1e-5 * span
        assert np.array_equal(fast == default, ref == default)  # the same voxels fall outside


@pytest.mark.parametrize("model, dataset, case, modality", [
    ("abdomen-ct-srcsm", "Dataset501_AbdomenCT", "sabs_00", "CT"),
    ("abdomen-ct-srcsm", "Dataset502_AbdomenMRT2", "chaos_02", "MR"),  # tilted 0.27°: SimpleITK in, general out
])
def test_segment_gives_the_plain_libraries_labels(bundled, shared_data, model, dataset, case, modality):
    """End to end with a bundled model on real data: the same labels as SimpleITK resampling →
    MONAI sliding window → SimpleITK per-channel resampling back → argmax (≥ 99.9 % of voxels)."""
    from plain_pipeline import plain_segment

    vol = read_volume(shared_data / dataset / "imagesTr" / f"{case}_0000.nii.gz")
    package = bundled[model]
    ours = Segmenter(package, device="cpu", precision="fp32", strategy="sliding_window").segment(
        vol, target_modality=modality)
    plain, _ = plain_segment(vol, package, modality=modality, precision="fp32")
    assert (plain > 0).mean() > 0.02
    assert np.mean(ours.labelmap.array == plain) >= 0.999


# ------------------------------------- SM's lookup inside the resampling; mixed cells by candidate channels


@pytest.mark.parametrize("variant", ["int16", "float32", "oblique", "flipped"])
def test_source_matching_inside_the_resampling_gives_the_matched_input(bundled, shared_data, variant):
    """For an integer image SM's lookup runs tile by tile inside the first resampling pass (no full
    matched copy): the network input must be exactly that of match() → to_model_grid → normalize.
    float32 images are matched in full; a rotated header takes SimpleITK on the converted image."""
    from SRCSMSegmenterLib.matching import match
    from SRCSMSegmenterLib.normalization import normalize

    vol = read_volume(shared_data / "Dataset501_AbdomenCT" / "imagesTr" / "sabs_00_0000.nii.gz")
    if variant == "float32":
        vol = Volume(vol.array.astype(np.float32), vol.geometry)
    if variant == "oblique":
        vol = _rotate_header(vol, 25)
    if variant == "flipped":
        vol = _flip_x(vol)
    package = bundled["abdomen-ct-srcsm"]
    x, grid, norm = Segmenter(package, device="cpu").prepare(vol, target_modality="CT")
    matched = match(vol, package.card.source_profile, "CT")
    fill = float(matched.array.min())
    resampled = to_model_grid(matched, grid, pre_smoothing_mm=package.card.inference.pre_smoothing_mm,
                              default_value=fill)
    expected = normalize(resampled.array, norm, fill)
    assert x.shape == expected.shape == grid.shape_kji
    if variant == "oblique":  # SimpleITK on the same values: the same arithmetic
        assert np.array_equal(x, expected)
    else:
        assert np.abs(x - expected).max() < 1e-5
    assert (x > -1).mean() > 0.1  # the body is in view, not only fill


def test_first_axis_tiles_equal_the_plain_contraction():
    """The tiled first pass (any tile width and group size, with a conversion) is the same linear map
    as the per-group torch contraction."""
    from SRCSMSegmenterLib.resampling import Band, gaussian_matrix, linear_matrix

    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1000, size=(37, 11, 13)).astype(np.int16)
    lin, _ = linear_matrix(np.linspace(-0.4, 36.2, 9), 37)
    band = Band.from_dense(lin @ gaussian_matrix(37, 0.9, 1.3))
    reference = band.apply(torch.from_numpy(array.astype(np.float32) * 2 + 1), 0).numpy()

    def convert(values: np.ndarray, out: np.ndarray) -> None:
        out[...] = values.astype(np.float32) * 2 + 1

    for group, tile in ((8, 2048), (3, 7), (1, 1), (16, 50)):
        got = band.apply_first_axis(array, convert, group=group, tile=tile).numpy()
        assert got.shape == reference.shape
        assert np.allclose(got, reference, rtol=1e-5, atol=1e-3), (group, tile)
    plain = band.apply_first_axis(array, None, tile=5).numpy()
    assert np.allclose(plain, band.apply(torch.from_numpy(array), 0).numpy(), rtol=1e-5, atol=1e-3)


def _separable_reference_labels(probs: np.ndarray, positions: list[np.ndarray], shape_kji) -> np.ndarray:
    """Brute force: every channel interpolated at every target voxel in float32 — x, then y, then z,
    neighbours clamped, outside → background — then np.argmax (first maximum wins)."""
    c = probs.shape[0]
    out = probs.astype(np.float32)
    inside = np.ones(shape_kji, bool)
    for axis, pos in zip((3, 2, 1), positions):  # x, y, z
        n = out.shape[axis]
        i0 = np.floor(pos).astype(int)
        w = (pos - i0).astype(np.float32)
        lo, hi = np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1)
        shape = [1, 1, 1, 1]
        shape[axis] = len(pos)
        w = w.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
        ok = ((pos >= -0.5) & (pos < n - 0.5)).reshape(shape[1:])
        inside &= ok
    labels = np.argmax(out, axis=0).astype(np.uint8)
    labels[~inside] = 0
    assert c == probs.shape[0]
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_mixed_cells_give_the_all_channel_argmax_exactly(seed):
    """Mixed cells are interpolated only in the channels that can win there (a sound bound): the
    labels equal those of interpolating all channels everywhere, to the voxel, including ties and
    cells where a channel that wins at no corner wins inside."""
    from SRCSMSegmenterLib.resampling import argmax_axis_aligned

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(5, 9, 10, 11)) * (1 + 3 * seed)
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    probs[3] = probs[4]  # exact ties between two channels: the lower index must win
    if seed % 2:  # the "middle class" case: 0 and 1 dominate the corners, 2 peaks between them
        probs[:] = 0
        probs[0, :, :, :5], probs[1, :, :, 5:] = 0.55, 0.55
        probs[2] = 0.45
        probs /= probs.sum(0)
    positions = [np.linspace(-0.7, 10.6, 41), np.linspace(-0.2, 9.4, 23), np.linspace(-0.6, 8.9, 17)]
    shape = (17, 23, 41)
    reference = _separable_reference_labels(probs, positions, shape)
    for chunk in (1, 7, 512):
        got = argmax_axis_aligned(probs, positions, shape, np.array([1, 0, 0, 0, 0], np.float32), chunk_cells=chunk)
        assert np.array_equal(got, reference), chunk
    if seed % 2:
        assert (reference == 2).any()  # the class that wins at no corner did win somewhere
