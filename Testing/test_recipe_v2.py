"""Training recipe v2: whole-volume sampling, field-of-view augmentation, instance normalisation, the
learning-rate schedule — and the trainer's protection of an existing run and its console progress.

Sampling and FOV tests run on a real cached CT case (BTCV ``sabs_09`` at 9.6 mm), so borders, fill value
and labels are the real ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_fixtures import SHARED_DATA, make_subset_dataset
from train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
V2_RECIPES = sorted((REPO / "train" / "recipes").glob("*_v2_cpu.yaml"))


def _tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    ds = make_subset_dataset(tmp_path / "Dataset501_AbdomenCT", SHARED_DATA / "Dataset501_AbdomenCT",
                             ["sabs_09"], [])
    base = dict(
        dataset=str(ds), val_split=None, model={"id": "t", "name": "t", "anatomy": "abdomen"},
        spacing=(9.6, 9.6, 9.6), patch_size=(16, 16, 16),
        network={"architecture": "srcsm_unet", "parameters": {"channels": [4, 8], "dropout": 0.0,
                                                              "norm": "instance"}},
        augmentation="src", iterations=6, batch_size=1, learning_rate=1e-3, val_every=0,
        checkpoint_every=3, log_every=1, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
        precision="fp32", seed=3, loss="gdl_ce",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cached_case(tmp_path_factory):
    """One real CT case preprocessed by the trainer's own cache code."""
    from SRCSMSegmenterLib.normalization import default_normalization
    from train.cache import build_cache, load_cached
    from train.datasets import load_dataset

    tmp = tmp_path_factory.mktemp("v2cache")
    cfg = _tiny_config(tmp)
    ds = load_dataset(cfg.dataset)
    folder = build_cache(ds, ds.split("train"), Path(cfg.cache_dir), cfg.spacing, default_normalization("CT"),
                         log=lambda m: None)
    return load_cached(folder, ["sabs_09"])[0]


# ---------------------------------------------------------------------------------- sampling
def test_v2_patches_reach_every_border_and_the_padding_beyond(cached_case):
    """Two thirds of v2's patch centres are uniform over the volume: over a few hundred patches the
    crops must cover the first and last voxel of every axis and hang over them into padding (fill value,
    background) — what a sliding window over a whole scan sees; v1's 80 % landmark-centred patches
    hang over a border far less often."""
    from train.trainer import PatchSampler

    case = cached_case
    shape = np.array(case.image.shape)
    crop = (16, 16, 16)

    def coverage(landmark: float, fg: float) -> tuple[np.ndarray, np.ndarray, int]:
        sampler = PatchSampler([case], crop, fg, np.random.default_rng(0), landmark)
        lo, hi, padded = shape.copy(), np.zeros(3, int), 0
        for _ in range(300):
            centre = sampler._centre(case)
            start = centre - np.array(crop) // 2
            lo = np.minimum(lo, np.maximum(start, 0))
            hi = np.maximum(hi, np.minimum(start + crop, shape))
            img, lab = sampler.crop_case(case, centre)
            outside = np.any(start < 0) or np.any(start + crop > shape)
            if outside:
                padded += 1
                assert np.any(img == case.fill_value)
        return lo, hi, padded

    lo, hi, padded = coverage(landmark=0.0, fg=0.33)
    assert np.all(lo == 0) and np.all(hi == shape), (lo, hi, shape)
    assert padded > 100  # a real share of patches hang over a border
    _, _, padded_v1 = coverage(landmark=0.8, fg=0.33)  # v1: landmark-centred patches stay inside
    assert padded > 2 * padded_v1, (padded, padded_v1)


def test_v2_one_third_of_patches_are_forced_onto_foreground(cached_case):
    from train.trainer import PatchSampler

    sampler = PatchSampler([cached_case], (16, 16, 16), 0.33, np.random.default_rng(1), 0.0)
    on_label = [cached_case.label[tuple(sampler._centre(cached_case))] > 0 for _ in range(600)]
    share = float(np.mean(on_label))
    fg_share = float(np.mean(np.asarray(cached_case.label) > 0))
    # forced third + the uniform two thirds that land on an organ by chance
    assert 0.33 + 0.67 * fg_share - 0.07 < share < 0.33 + 0.67 * fg_share + 0.07, (share, fg_share)


def test_fov_boxes_are_slabs_and_partial_views_that_hold_the_centre():
    from train.trainer import FieldOfView

    fov = FieldOfView(probability=1.0, min_slab_mm=40.0, min_inplane=0.5)
    rng = np.random.default_rng(0)
    shape, spacing = (60, 100, 120), np.array([4.8, 4.8, 4.8])
    thinnest_z, any_inplane = 10 ** 9, False
    for _ in range(400):
        centre = rng.integers(0, shape)
        lo, hi = fov.box(shape, centre, spacing, rng)
        assert np.all(lo >= 0) and np.all(hi <= shape) and np.all(lo <= centre) and np.all(centre < hi)
        assert (hi[0] - lo[0]) * spacing[0] >= 40.0 - 4.8  # never thinner than the thinnest slab (± a voxel)
        assert np.all(hi[1:] - lo[1:] >= np.round(0.5 * np.array(shape[1:])))
        thinnest_z = min(thinnest_z, hi[0] - lo[0])
        any_inplane |= bool(np.any(hi[1:] - lo[1:] < np.array(shape[1:])))
    assert thinnest_z * spacing[0] <= 50.0  # slabs as thin as 40 mm do occur
    assert any_inplane
    assert FieldOfView(probability=0.0).box(shape, np.array([1, 1, 1]), spacing, rng) is None


def test_log_uniform_extents_show_thin_slabs_more_often_and_uniform_keeps_v2_draws():
    """``fov_length_sampling: log_uniform`` (recipe v3 lead): a BTCV-like 300 mm CT (100 slices of 3 mm)
    gets a slab of at most 60 mm in ln(60/40)/ln(303/40) ≈ 20 % of its z crops, against 20/263 ≈ 8 % when
    drawn uniformly; both stay within [40 mm, the whole scan] and hold the patch centre. ``uniform`` must
    draw exactly as recipe v2 did (one integer per axis), so that v2 runs resume on the same sequence."""
    from train.trainer import FieldOfView

    shape, spacing, centre = (100, 64, 64), np.array([3.0, 6.0, 6.0]), np.array([50, 32, 32])

    def z_extents(sampling: str, n: int = 3000) -> np.ndarray:
        fov, rng = FieldOfView(1.0, 40.0, 0.5, sampling), np.random.default_rng(1)
        out = []
        for _ in range(n):
            lo, hi = fov.box(shape, centre, spacing, rng)
            assert np.all(lo <= centre) and np.all(centre < hi) and np.all(lo >= 0) and np.all(hi <= shape)
            if hi[0] - lo[0] < shape[0] or lo[0] > 0:
                out.append((hi[0] - lo[0]) * spacing[0])
        return np.array(out)

    uniform, log_uniform = z_extents("uniform"), z_extents("log_uniform")
    for extents in (uniform, log_uniform):
        assert extents.min() >= 39.0 and extents.max() <= 300.0
    thin_u, thin_l = np.mean(uniform <= 60.0), np.mean(log_uniform <= 60.0)
    assert 0.05 < thin_u < 0.12 and 0.16 < thin_l < 0.26, (thin_u, thin_l)
    assert np.median(log_uniform) < np.median(uniform) - 40.0

    # uniform = recipe v2's draws: crop choice, then one integer per cropped axis for extent and start
    fov, rng, twin = FieldOfView(1.0, 40.0, 0.5), np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(50):
        lo, hi = fov.box(shape, centre, spacing, rng)
        twin.random()
        crop_z, crop_xy = [(True, True), (True, False), (False, True)][twin.integers(3)]
        for axis in range(3):
            if (axis == 0 and crop_z) or (axis > 0 and crop_xy):
                smallest = min(shape[axis], max(1, int(round(40.0 / spacing[0])))) if axis == 0 else \
                    min(shape[axis], max(1, int(round(0.5 * shape[axis]))))
                length = int(twin.integers(smallest, shape[axis] + 1))
                first, last = max(0, centre[axis] - length + 1), min(centre[axis], shape[axis] - length)
                start = int(twin.integers(first, last + 1))
                assert (lo[axis], hi[axis]) == (start, start + length)


def test_fov_crop_pads_outside_the_box_as_inference_pads_and_renormalises_mr(cached_case):
    """Outside the box the patch must be exactly the fill value and background; inside, the case's voxels.
    For a percentile-normalised modality (MR) the affine is that of what the box shows."""
    from SRCSMSegmenterLib.normalization import default_normalization, intensity_affine
    from train.trainer import FieldOfView, PatchSampler

    case = cached_case
    shape = np.array(case.image.shape)
    centre = shape // 2
    box = (np.array([centre[0] - 2, 0, 0]), np.array([centre[0] + 2, shape[1], shape[2]]))  # a 4-slice slab
    sampler = PatchSampler([case], (16, 16, 16), 0.33, np.random.default_rng(0), 0.0)
    img, lab = sampler.crop_case(case, centre, box)
    k0 = 8 - 2  # patch index of the slab's first slice
    inside = np.zeros(img.shape, bool)
    inside[k0:k0 + 4] = True
    assert np.all(img[~inside] == np.float32(case.fill_value)) and np.all(lab[~inside] == 0)
    np.testing.assert_array_equal(img[inside].reshape(4, 16, 16),
                                  np.asarray(case.image[centre[0] - 2:centre[0] + 2, centre[1] - 8:centre[1] + 8,
                                                        centre[2] - 8:centre[2] + 8]))
    # CT window: the affine does not depend on the view; MR percentiles do, and follow the box
    ct = PatchSampler([case], (16, 16, 16), 0.33, np.random.default_rng(0), 0.0,
                      fov=FieldOfView(1.0), norm=default_normalization("CT"))
    assert ct._box_norm(case, box) == (case.norm_scale, case.norm_offset)
    mr_norm = default_normalization("MR")
    mr = PatchSampler([case], (16, 16, 16), 0.33, np.random.default_rng(0), 0.0, fov=FieldOfView(1.0), norm=mr_norm)
    view = np.asarray(case.image[box[0][0]:box[1][0]])
    assert mr._box_norm(case, box) == pytest.approx(intensity_affine(view, mr_norm)[:2])
    assert mr._box_norm(case, box) != pytest.approx(intensity_affine(np.asarray(case.image), mr_norm)[:2])


def test_replicate_padding_continues_the_edge_voxels_and_their_labels(cached_case):
    """``fov_padding: [replicate]``: beyond a slab (or the volume) a patch holds the nearest voxel that is
    shown, and its label — what inference with ``padding_mode="replicate"`` feeds the network; the
    visible part is the same as with constant padding."""
    from train.trainer import PatchSampler

    case = cached_case
    shape = np.array(case.image.shape)
    centre = shape // 2
    slab_lo, slab_hi = centre[0] - 2, centre[0] + 2
    box = (np.array([slab_lo, 0, 0]), np.array([slab_hi, shape[1], shape[2]]))
    sampler = PatchSampler([case], (16, 16, 16), 0.33, np.random.default_rng(0), 0.0)
    const_img, const_lab = sampler.crop_case(case, centre, box, "constant")
    img, lab = sampler.crop_case(case, centre, box, "replicate")
    k0 = 8 - 2
    np.testing.assert_array_equal(img[k0:k0 + 4], const_img[k0:k0 + 4])  # what the slab shows: unchanged
    np.testing.assert_array_equal(lab[k0:k0 + 4], const_lab[k0:k0 + 4])
    for k in range(k0):  # above the slab: its first slice, repeated
        np.testing.assert_array_equal(img[k], img[k0])
        np.testing.assert_array_equal(lab[k], lab[k0])
    for k in range(k0 + 4, 16):  # below: its last
        np.testing.assert_array_equal(img[k], img[k0 + 3])
        np.testing.assert_array_equal(lab[k], lab[k0 + 3])
    # at the volume's corner, without a box: numpy's edge padding of what is inside
    corner = np.array([3, 3, 3])
    img, lab = sampler.crop_case(case, corner, None, "replicate")
    visible = np.asarray(case.image[:11, :11, :11])
    np.testing.assert_array_equal(img, np.pad(visible, ((5, 0), (5, 0), (5, 0)), mode="edge"))
    np.testing.assert_array_equal(lab, np.pad(np.asarray(case.label[:11, :11, :11]), ((5, 0), (5, 0), (5, 0)),
                                              mode="edge"))
    with pytest.raises(ValueError, match="constant or replicate"):
        sampler.crop_case(case, centre, box, "reflect")
    with pytest.raises(ValueError, match="constant and/or replicate"):
        PatchSampler([case], (16, 16, 16), 0.33, np.random.default_rng(0), 0.0, paddings=("mirror",))


def test_padding_both_ways_draws_each_per_patch_and_one_way_keeps_the_random_sequence(cached_case):
    from train.trainer import FieldOfView, PatchSampler

    case = cached_case
    fov = FieldOfView(1.0, min_slab_mm=40.0, min_inplane=0.5)
    spacing = (9.6, 9.6, 9.6)

    def patches(paddings, n=24):
        sampler = PatchSampler([case], (16, 16, 16), 0.0, np.random.default_rng(5), 0.0, fov=fov,
                               spacing_kji=spacing, paddings=paddings)
        return [sampler.sample(1)[0][0, 0] for _ in range(n)]

    fill = np.float32(case.fill_value)
    const = patches(("constant",))
    default = PatchSampler([case], (16, 16, 16), 0.0, np.random.default_rng(5), 0.0, fov=fov, spacing_kji=spacing)
    np.testing.assert_array_equal(default.sample(1)[0][0, 0], const[0])  # the default is constant
    both = patches(("constant", "replicate"))
    # a patch reaching beyond the view holds whole fill-valued faces only when padded constantly
    faces = [np.any([np.all(p[0] == fill), np.all(p[-1] == fill), np.all(p[:, 0] == fill), np.all(p[:, -1] == fill),
                     np.all(p[:, :, 0] == fill), np.all(p[:, :, -1] == fill)]) for p in both]
    assert any(faces) and not all(faces)
    replicated = patches(("replicate",))
    assert sum(np.all(p[0] == fill) or np.all(p[-1] == fill) for p in replicated) < sum(
        np.all(p[0] == fill) or np.all(p[-1] == fill) for p in const)


def test_v2_tiny_run_trains_padding_both_ways(tmp_path):
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, fov_augmentation=1.0, fov_padding=["constant", "replicate"], iterations=3)
    Trainer(cfg, log=lambda m: None).fit()
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["fov_padding"] == ["constant", "replicate"]
    older = {k: v for k, v in saved.items() if k != "fov_padding"}  # a run's config.json from before the key
    assert TrainConfig.model_validate(older).fov_padding == ["constant"]  # as it was trained


def test_v2_tiny_run_draws_fov_extents_as_its_recipe_says(tmp_path):
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, fov_augmentation=1.0, fov_length_sampling="log_uniform", iterations=2)
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.fit()
    assert trainer.sampler.fov.length_sampling == "log_uniform"
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["fov_length_sampling"] == "log_uniform"
    older = {k: v for k, v in saved.items() if k != "fov_length_sampling"}  # config.json from before the key
    assert TrainConfig.model_validate(older).fov_length_sampling == "uniform"  # as v2 runs were drawn


# ----------------------------------------------------------------------------------- network
def test_instance_norm_unet_is_loaded_from_a_card_and_plain_cards_stay_plain():
    from SRCSMSegmenterLib.network import build_network

    v2 = build_network("srcsm_unet", {"channels": [4, 8], "dropout": 0.0, "norm": "instance", "out_channels": 3})
    v1 = build_network("srcsm_unet", {"channels": [4, 8], "dropout": 0.0, "out_channels": 3})
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in v2.modules()) == 8  # 2 per block, 4 blocks
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in v1.modules())
    # instance norm makes the output invariant to a scaling of the input (zero padding breaks it for an offset)
    x = torch.randn(1, 1, 16, 16, 16)
    v2.eval()
    torch.testing.assert_close(v2(x), v2(3.0 * x), atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown norm"):
        build_network("srcsm_unet", {"channels": [4, 8], "norm": "batch"})


# ------------------------------------------------------------------------------ lr schedule
def test_learning_rate_warms_up_then_decays(tmp_path):
    from train.trainer import learning_rate_at

    cfg = _tiny_config(tmp_path, iterations=1000, learning_rate=1e-3, warmup_iterations=100, lr_schedule="poly")
    lrs = [learning_rate_at(cfg, i) for i in range(1000)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[100] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # then decays
    assert lrs[-1] < 2e-5
    cos = cfg.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate_at(cos, 550) == pytest.approx(5e-4, rel=1e-6)
    const = cfg.model_copy(update={"lr_schedule": "constant", "warmup_iterations": 0})
    assert {learning_rate_at(const, i) for i in (0, 500, 999)} == {1e-3}


def test_v2_tiny_run_trains_with_fov_and_schedule_and_logs_the_rate(tmp_path):
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, fov_augmentation=0.5, warmup_iterations=3, lr_schedule="poly",
                       foreground_oversampling=0.33, landmark_sampling=0.0)
    Trainer(cfg, log=lambda m: None).fit()
    with open(tmp_path / "run" / "log.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-3)
    assert all(np.isfinite(float(r["loss"])) for r in rows)


@pytest.mark.parametrize("recipe", V2_RECIPES, ids=[r.stem for r in V2_RECIPES])
def test_v2_recipes_are_what_issue_15_asks_for(recipe):
    cfg = load_config(recipe)
    assert cfg.loss == "gdl_ce" and cfg.augmentation == "src"
    assert cfg.landmark_sampling == 0.0 and cfg.foreground_oversampling == pytest.approx(0.33)
    assert cfg.fov_augmentation > 0 and cfg.fov_min_slab_mm <= 40
    assert cfg.network["parameters"]["norm"] == "instance"
    assert cfg.iterations >= 12_000 and cfg.warmup_iterations > 0 and cfg.lr_schedule != "constant"
    assert cfg.precision == "auto" and cfg.num_threads == 2
    assert len(V2_RECIPES) == 3
    if "_mr_" in recipe.name or "cardiac" in recipe.name:  # MR percentiles ignore the fill around the anatomy
        assert cfg.normalization is not None and cfg.normalization.exclude_minimum


V3_RECIPES = sorted((REPO / "train" / "recipes").glob("*_v3_cpu.yaml"))


@pytest.mark.parametrize("recipe", V3_RECIPES, ids=[r.stem for r in V3_RECIPES])
def test_v3_recipes_are_v2_plus_the_two_thin_view_leads(recipe):
    """Each v3 recipe names its v2 recipe as ``base:`` and changes exactly the field-of-view sampling, the
    padding of patches and where the run goes — nothing of v2 is restated (one definition)."""
    v2 = load_config(recipe.with_name(recipe.name.replace("_v3_", "_v2_"))).model_dump()
    v3 = load_config(recipe).model_dump()
    changed = {k for k in v2 if v2[k] != v3[k]}
    assert changed == {"fov_length_sampling", "fov_padding", "output_dir"}
    assert v3["fov_length_sampling"] == "log_uniform" and v3["fov_padding"] == ["constant", "replicate"]
    assert v3["output_dir"].endswith("-v3") and v3["output_dir"] != v2["output_dir"]
    assert len(V3_RECIPES) == 3


def test_recipe_base_merges_mappings_chains_and_names_what_is_wrong(tmp_path):
    from train.config import read_recipe

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("iterations: 10\nmodel: {id: a, name: A, anatomy: abdomen}\n"
                                     "network: {architecture: srcsm_unet, parameters: {channels: [4, 8], "
                                     "dropout: 0.1}}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {id: b}\nnetwork: {parameters: "
                                             "{dropout: 0.0}}\nseed: 5\n")
    (tmp_path / "sub" / "c.yaml").write_text("base: b.yaml\niterations: 20\n")
    c = read_recipe(tmp_path / "sub" / "c.yaml")
    # nested mappings merge key by key through the chain; plain values are replaced
    assert c["model"] == {"id": "b", "name": "A", "anatomy": "abdomen"}
    assert c["network"]["parameters"] == {"channels": [4, 8], "dropout": 0.0}
    assert c["iterations"] == 20 and c["seed"] == 5 and "base" not in c
    # the files are left as they were
    assert read_recipe(tmp_path / "a.yaml")["iterations"] == 10
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match="base 'missing.yaml' does not exist"):
        read_recipe(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: f.yaml\n")
    (tmp_path / "f.yaml").write_text("base: e.yaml\n")
    with pytest.raises(ValueError, match=r"cycle \(e.yaml → f.yaml → e.yaml\)"):
        read_recipe(tmp_path / "e.yaml")


# ------------------------------------------------------------- normalisation that ignores empty space
def _affine_on_model_grid(volume, norm):
    from SRCSMSegmenterLib.normalization import intensity_affine
    from SRCSMSegmenterLib.preprocessing import model_grid, to_model_grid

    grid = model_grid(volume.geometry, volume.shape, (2.0, 2.0, 2.0))
    fill = float(volume.array.min())
    resampled = to_model_grid(volume, grid, pre_smoothing_mm=1.0, default_value=fill)
    scale, offset, _, _ = intensity_affine(resampled.array, norm, fill)
    return scale, offset, float((np.abs(resampled.array - fill) < 1.0).mean())


def test_mr_percentiles_above_the_minimum_do_not_change_when_the_scan_is_padded():
    """A real oblique cine stack (MS-CMRSeg pat_36) and the same stack padded in-plane to 500 mm with air,
    each on its world-aligned 2 mm model grid: with ``exclude_minimum`` the normalisation is the same
    (within 2 %); the v1 rule's shifts by more than 10 % (what cost the v1 cardiac model all three
    structures on the padded scan)."""
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.normalization import Normalization
    from train.perturbations import pad_in_plane

    root = SHARED_DATA / "Dataset503_CardiacBSSFP"
    image = read_volume(root / "imagesTr" / "pat_36_0000.nii.gz")
    label = read_volume(root / "labelsTr" / "pat_36.nii.gz")
    padded, _ = pad_in_plane(image, label, 500.0)
    v2 = Normalization(type="mr_robust", exclude_minimum=True)
    v1 = Normalization(type="mr_robust")
    s_orig, o_orig, empty_orig = _affine_on_model_grid(image, v2)
    s_pad, o_pad, empty_pad = _affine_on_model_grid(padded, v2)
    assert empty_pad > empty_orig + 0.15  # the padding really adds empty space (77 % → 96 % here)
    assert s_pad == pytest.approx(s_orig, rel=0.02)
    hi_orig, hi_pad = (1.0 - o_orig) / s_orig, (1.0 - o_pad) / s_pad  # the raw value mapped to +1
    assert hi_pad == pytest.approx(hi_orig, rel=0.02)
    s1_orig, o1_orig, _ = _affine_on_model_grid(image, v1)
    s1_pad, o1_pad, _ = _affine_on_model_grid(padded, v1)
    assert abs((1.0 - o1_pad) / s1_pad - (1.0 - o1_orig) / s1_orig) > 0.1 * abs((1.0 - o1_orig) / s1_orig)


def test_exclude_minimum_is_an_mr_option_and_old_cards_and_caches_keep_the_v1_rule(tmp_path):
    import hashlib

    from SRCSMSegmenterLib.normalization import Normalization
    from train.cache import CACHE_VERSION, cache_key
    from train.datasets import load_dataset

    assert Normalization.model_validate({"type": "mr_robust", "percentiles": [5, 95]}).exclude_minimum is False
    with pytest.raises(ValueError, match="mr_robust percentiles only"):
        Normalization(type="ct_window", window=(-125, 275), exclude_minimum=True)
    dataset = load_dataset(SHARED_DATA / "Dataset503_CardiacBSSFP")
    v1 = Normalization(type="mr_robust")
    old_blob = json.dumps([CACHE_VERSION, dataset.name, [2.0, 2.0, 2.0], 1.0,
                           {"type": "mr_robust", "window": None, "percentiles": [5.0, 95.0]}], sort_keys=True)
    assert cache_key(dataset, (2.0, 2.0, 2.0), 1.0, v1) == hashlib.sha1(old_blob.encode()).hexdigest()[:10]
    v2 = Normalization(type="mr_robust", exclude_minimum=True)
    assert cache_key(dataset, (2.0, 2.0, 2.0), 1.0, v2) != cache_key(dataset, (2.0, 2.0, 2.0), 1.0, v1)


# ----------------------------------------------------------------------- existing runs, progress
def test_fit_refuses_to_replace_an_existing_run_and_overwrite_keeps_it(tmp_path):
    """Running the README's training line twice used to replace a 140-iteration checkpoint with a
    1-iteration one and append to the old log. Now it refuses, naming --resume, --run-dir and --overwrite;
    --overwrite keeps the old run beside the new one."""
    from train.trainer import RunExistsError, Trainer, load_checkpoint

    cfg = _tiny_config(tmp_path, iterations=3)
    Trainer(cfg, log=lambda m: None).fit()
    before = (tmp_path / "run" / "log.csv").read_bytes()
    with pytest.raises(RunExistsError, match=r"iteration 3.*--resume.*--run-dir.*--overwrite"):
        Trainer(cfg.model_copy(update={"iterations": 1}), log=lambda m: None).fit()
    assert (tmp_path / "run" / "log.csv").read_bytes() == before
    assert load_checkpoint(tmp_path / "run")[1]["iteration"] == 3
    said: list[str] = []
    Trainer(cfg.model_copy(update={"iterations": 1}), overwrite=True, log=said.append).fit()
    assert load_checkpoint(tmp_path / "run")[1]["iteration"] == 1
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(kept) == 1 and load_checkpoint(kept[0])[1]["iteration"] == 3
    assert any("moved to" in m for m in said)


def test_fit_command_refuses_with_exit_2_and_run_dir_trains_elsewhere(tmp_path, capsys):
    import yaml

    from train.__main__ import main

    cfg = _tiny_config(tmp_path, iterations=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    assert main(["fit", str(recipe)]) == 0
    assert main(["fit", str(recipe)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", str(recipe), "--run-dir", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "other" / "checkpoint.json").read_text(encoding="utf-8"))["iteration"] == 2


def test_without_a_terminal_training_logs_progress_with_rate_and_eta(tmp_path, monkeypatch):
    """In a log file (no TTY) tqdm's bar is off; the trainer then says where it is, how fast and how long
    it still takes — and the time limit counts training only, not the one-off cache."""
    import time

    import train.trainer as trainer_mod
    from train.trainer import Trainer

    monkeypatch.setattr(trainer_mod, "STATUS_EVERY_S", 0.0)
    real_build = trainer_mod.build_cache

    def slow_cache(*a, **kw):
        time.sleep(2.0)
        return real_build(*a, **kw)

    monkeypatch.setattr(trainer_mod, "build_cache", slow_cache)
    said: list[str] = []
    result = Trainer(_tiny_config(tmp_path, iterations=10_000, checkpoint_every=10_000), log=said.append).fit(
        time_limit_s=1.5)
    status = [m for m in said if m.startswith("iteration ") and "it/s" in m]
    assert status and "ETA" in status[-1] and "/10000" in status[-1]
    assert any(m.startswith("data ready in") for m in said)
    assert result["iteration"] > 1  # the 2 s of caching did not eat the 1.5 s budget
