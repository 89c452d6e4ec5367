"""Tests of train.metrics (Dice / ASSD / HD95 / max SD in mm) and train.report (CSV, Markdown, PNG)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Geometry, Volume, read_volume
from train.metrics import (
    METRIC_NAMES,
    ROW_KEYS,
    evaluate_case,
    evaluate_files,
    read_label_map,
    surface_distances,
)
from train.report import (
    COLUMNS,
    SUMMARY_COLUMNS,
    median_case,
    overlay_figure,
    read_csv,
    summarize,
    tag_rows,
    write_reports,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAOS = DATA / "Dataset502_AbdomenMRT2"
ABDOMEN = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


def _rotation(seed: int) -> tuple[float, ...]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return tuple((q * np.sign(np.linalg.det(q))).ravel())


def _blob(shape, seed: int, level: float = 0.05) -> np.ndarray:
    return ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2) > level


def _vol(mask: np.ndarray, geometry: Geometry, value: int = 1) -> Volume:
    return Volume(mask.astype(np.uint8) * np.uint8(value), geometry)


GEO = Geometry((10.0, -20.0, 5.0), (0.7, 1.3, 2.9), _rotation(1))


# ------------------------------------------------------------------------------ reference implementations


def _srcsm_surface_distance(pred: np.ndarray, ref: np.ndarray, geometry: Geometry) -> tuple[float, float]:
    """SRCSM's utils/sitk_image.py::surface_distance (mean, max), re-typed with SimpleITK."""

    def image(mask):
        return geometry.apply_to(sitk.GetImageFromArray(mask.astype(np.uint8)))

    p, r = image(pred), image(ref)
    arr = sitk.GetArrayFromImage
    ref_map = arr(sitk.SignedMaurerDistanceMap(r, squaredDistance=False, useImageSpacing=True))
    seg_map = arr(sitk.SignedMaurerDistanceMap(p, squaredDistance=False, useImageSpacing=True))
    ref_surface, seg_surface = arr(sitk.LabelContour(r)), arr(sitk.LabelContour(p))
    d = np.concatenate([np.abs(ref_map[seg_surface == 1]), np.abs(seg_map[ref_surface == 1])])
    return float(d.mean()), float(d.max())


def _brute_force(pred: np.ndarray, ref: np.ndarray, geometry: Geometry, convention: str):
    """O(n²) pooled/directed surface distances with contours found by explicit neighbour tests."""

    def contour(mask, full: bool, outside: bool):
        padded = np.pad(mask, 1, constant_values=outside)
        offsets = [o for o in np.ndindex(3, 3, 3) if o != (1, 1, 1)]
        if not full:
            offsets = [o for o in offsets if sum(abs(c - 1) for c in o) == 1]
        n = mask.shape
        has_outside_neighbour = np.zeros(n, bool)
        for o in offsets:
            has_outside_neighbour |= ~padded[o[0] : o[0] + n[0], o[1] : o[1] + n[1], o[2] : o[2] + n[2]]
        return mask & has_outside_neighbour

    if convention == "srcsm":
        sample = lambda m: contour(m, False, True)  # noqa: E731  LabelContour
        target = lambda m: contour(m, True, True)  # noqa: E731  Maurer's fully connected contour
    else:
        sample = target = lambda m: contour(m, False, False)  # noqa: E731

    def points(mask):
        return geometry.index_to_physical(np.argwhere(mask)[:, ::-1])

    d_pr = cdist(points(sample(pred)), points(target(ref))).min(axis=1)
    d_rp = cdist(points(sample(ref)), points(target(pred))).min(axis=1)
    return d_pr, d_rp


# ---------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("convention", ["srcsm", "monai"])
def test_identical_masks_give_dice_one_and_zero_distances(convention):
    mask = _blob((12, 14, 16), 0)
    rows = evaluate_case(_vol(mask, GEO), _vol(mask, GEO), {1: "blob"}, convention=convention)
    assert len(rows) == 1 and tuple(rows[0]) == ROW_KEYS
    row = rows[0]
    assert row["dice"] == 1.0
    assert row["assd"] == row["hd95"] == row["max_sd"] == 0.0
    assert row["ref_voxels"] == row["pred_voxels"] == int(mask.sum())


@pytest.mark.parametrize("convention", ["srcsm", "monai"])
@pytest.mark.parametrize("hd95_mode", ["pooled", "max_directed"])
def test_disjoint_boxes_known_distances(convention, hd95_mode):
    # Two 3×3×3 boxes along x (spacing 2 mm), B = A shifted by 6 voxels. Every voxel but the centre is
    # surface; A's faces x=2,3,4 are 12, 10, 8 mm from B's facing x=8 face (9, 8, 9 voxels), and back.
    geo = Geometry((0.0, 0.0, 0.0), (2.0, 1.0, 1.5))
    a = np.zeros((7, 7, 13), bool)
    b = np.zeros_like(a)
    a[2:5, 2:5, 2:5] = True
    b[2:5, 2:5, 8:11] = True
    row = evaluate_case(_vol(b, geo), _vol(a, geo), {1: "box"}, convention=convention, hd95_mode=hd95_mode)[0]
    assert row["dice"] == 0.0
    assert row["assd"] == pytest.approx((9 * 12 + 8 * 10 + 9 * 8) / 26)  # = 10 mm
    assert row["hd95"] == pytest.approx(12.0)
    assert row["max_sd"] == pytest.approx(12.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.7, 1.5)])
def test_two_spheres_with_known_offset(spacing):
    # Spheres of radius R = 10 mm, offset d = 3 mm along x (a whole number of voxels).
    # Continuous answers: Dice = (4R+d)(2R-d)²/(16R³), Hausdorff = d, mean surface distance
    # = mean over cosθ~U(-1,1) of |sqrt(R²+d²-2Rd cosθ) - R| (≈ d/2).
    r, d = 10.0, 3.0
    sx, sy, sz = spacing
    k, j, i = np.indices([int(math.ceil(30 / s)) for s in (sz, sy, sx)])
    x, y, z = i * sx - 15, j * sy - 15, k * sz - 15
    ref = x**2 + y**2 + z**2 <= r * r
    pred = (x - d) ** 2 + y**2 + z**2 <= r * r
    geo = Geometry((0.0, 0.0, 0.0), spacing)
    t = np.linspace(-1, 1, 100001)
    mean_analytic = float(np.abs(np.sqrt(r * r + d * d - 2 * r * d * t) - r).mean())
    dice_analytic = (4 * r + d) * (2 * r - d) ** 2 / (16 * r**3)
    rows = {
        c: evaluate_case(_vol(pred, geo), _vol(ref, geo), {1: "s"}, convention=c)[0]
        for c in ("srcsm", "monai")
    }
    for row in rows.values():
        assert row["dice"] == pytest.approx(dice_analytic, abs=0.01)
        assert d - 0.5 <= row["max_sd"] <= d + 1e-9  # voxel surfaces are exact shifted copies
        assert 0 < row["hd95"] <= row["max_sd"]
        assert row["assd"] == pytest.approx(mean_analytic, abs=0.5)
    # SRCSM measures to the thicker (26-connected) contour, so its distances are never larger.
    assert rows["srcsm"]["assd"] <= rows["monai"]["assd"]


def test_empty_prediction_is_dice_zero_and_nan_distances():
    ref = _blob((10, 12, 12), 3)
    row = evaluate_case(_vol(np.zeros_like(ref), GEO), _vol(ref, GEO), {1: "x"})[0]
    assert row["dice"] == 0.0
    assert all(math.isnan(row[m]) for m in ("assd", "hd95", "max_sd"))
    assert row["pred_voxels"] == 0 and row["ref_voxels"] == int(ref.sum())


def test_label_absent_from_reference_is_nan():
    ref = np.zeros((8, 9, 10), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    pred = ref.copy()
    pred[6:8, 6:8, 6:8] = 2  # false positive of label 2, which the reference lacks
    rows = evaluate_case(Volume(pred, GEO), Volume(ref, GEO), {1: "a", 2: "b", 3: "c"})
    assert [r["label"] for r in rows] == [1, 2, 3]
    assert rows[0]["dice"] == 1.0
    for row in rows[1:]:
        assert all(math.isnan(row[m]) for m in METRIC_NAMES)
        assert row["ref_voxels"] == 0
    assert rows[1]["pred_voxels"] == 8 and rows[2]["pred_voxels"] == 0


def test_unlisted_labels_are_ignored_and_label_maps_may_be_float():
    ref = np.zeros((8, 9, 10), np.float32)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[3, 3, 3] = 7  # a value not scored: background for label 1
    row = evaluate_case(Volume(pred, GEO), Volume(ref, GEO), {1: "a"})[0]
    assert row["dice"] == pytest.approx(2 * 63 / (63 + 64))


@pytest.mark.parametrize(
    "change",
    [
        {"origin": (10.5, -20.0, 5.0)},
        {"spacing": (0.7, 1.3, 3.0)},
        {"direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
    ],
)
def test_grid_mismatch_is_a_clear_error(change):
    mask = _blob((8, 9, 10), 4).astype(np.uint8)
    fields = {"origin": GEO.origin, "spacing": GEO.spacing, "direction": GEO.direction, **change}
    with pytest.raises(InputError, match="same voxel grid.*resample"):
        evaluate_case(Volume(mask, Geometry(**fields)), Volume(mask, GEO), {1: "x"})
    with pytest.raises(InputError, match="shape"):
        evaluate_case(Volume(mask[:-1], GEO), Volume(mask, GEO), {1: "x"})


def test_bad_inputs_are_rejected():
    mask = _blob((8, 9, 10), 5).astype(np.uint8)
    with pytest.raises(InputError, match="not a label map"):
        evaluate_case(Volume(mask * 0.5, GEO), Volume(mask, GEO), {1: "x"})
    with pytest.raises(InputError, match="negative"):
        evaluate_case(Volume(mask.astype(np.int16) - 1, GEO), Volume(mask, GEO), {1: "x"})
    with pytest.raises(ValueError, match="background"):
        evaluate_case(Volume(mask, GEO), Volume(mask, GEO), {0: "background", 1: "x"})
    with pytest.raises(ValueError, match="hd95_mode"):
        evaluate_case(Volume(mask, GEO), Volume(mask, GEO), {1: "x"}, hd95_mode="mean")


# ------------------------------------------------------------------------------------ physical & exact


def test_metrics_are_physical_under_flips_and_axis_permutations():
    pred, ref = _blob((9, 12, 15), 6), _blob((9, 12, 15), 7)
    base = evaluate_case(_vol(pred, GEO), _vol(ref, GEO), {1: "x"})[0]
    m = GEO.direction_matrix
    ni = pred.shape[2]
    # Flip the I axis: same world content with the first direction column negated, origin at the old last I.
    flipped = Geometry(
        tuple(GEO.index_to_physical([ni - 1, 0, 0])), GEO.spacing, tuple((m @ np.diag([-1, 1, 1])).ravel())
    )
    # Swap the I and K axes (array transposed), spacing and direction columns swapped accordingly.
    swapped = Geometry(GEO.origin, GEO.spacing[::-1], tuple(m[:, ::-1].ravel()))
    for geo, fn in ((flipped, lambda a: a[:, :, ::-1]), (swapped, lambda a: a.transpose(2, 1, 0))):
        p, r = np.ascontiguousarray(fn(pred)), np.ascontiguousarray(fn(ref))
        other = evaluate_case(_vol(p, geo), _vol(r, geo), {1: "x"})[0]
        assert other["name"] == base["name"]
        for key in ROW_KEYS[2:]:
            assert other[key] == pytest.approx(base[key], rel=1e-9, abs=1e-9), key


def test_flipped_geometry_places_voxels_identically():
    # Guard for the test above: the flipped geometry maps each flipped voxel to the same world point.
    m = GEO.direction_matrix
    ni = 15
    flipped = Geometry(
        tuple(GEO.index_to_physical([ni - 1, 0, 0])), GEO.spacing, tuple((m @ np.diag([-1, 1, 1])).ravel())
    )
    for i, j, k in [(0, 0, 0), (3, 5, 2), (14, 11, 8)]:
        assert np.allclose(flipped.index_to_physical([ni - 1 - i, j, k]), GEO.index_to_physical([i, j, k]))
    swapped = Geometry(GEO.origin, GEO.spacing[::-1], tuple(m[:, ::-1].ravel()))
    assert np.allclose(swapped.index_to_physical([2, 3, 4]), GEO.index_to_physical([4, 3, 2]))


@pytest.mark.parametrize("convention", ["srcsm", "monai"])
@pytest.mark.parametrize("seed", [10, 11])
def test_against_brute_force_pairwise_distances(convention, seed):
    shape = (9, 11, 13)
    pred, ref = _blob(shape, seed), _blob(shape, seed + 100)  # these touch the image border too
    d_pr, d_rp = _brute_force(pred, ref, GEO, convention)
    pooled = np.concatenate([d_pr, d_rp])
    ours_pr, ours_rp = surface_distances(pred, ref, GEO, convention=convention)
    assert np.allclose(np.sort(ours_pr), np.sort(d_pr)) and np.allclose(np.sort(ours_rp), np.sort(d_rp))
    for mode, hd95 in (("pooled", np.percentile(pooled, 95)),
                       ("max_directed", max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))):
        row = evaluate_case(
            _vol(pred, GEO), _vol(ref, GEO), {1: "x"}, convention=convention, hd95_mode=mode
        )[0]
        assert row["assd"] == pytest.approx(pooled.mean(), rel=1e-9)
        assert row["max_sd"] == pytest.approx(pooled.max(), rel=1e-9)
        assert row["hd95"] == pytest.approx(hd95, rel=1e-9)
        assert row["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_srcsm_convention_matches_the_papers_simpleitk_code(seed):
    pred, ref = _blob((10, 14, 16), seed), _blob((10, 14, 16), seed + 1)
    row = evaluate_case(_vol(pred, GEO), _vol(ref, GEO), {1: "x"}, convention="srcsm")[0]
    mean, maximum = _srcsm_surface_distance(pred, ref, GEO)
    assert row["assd"] == pytest.approx(mean, rel=1e-5)
    assert row["max_sd"] == pytest.approx(maximum, rel=1e-5)


def test_monai_convention_matches_monai():
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    spacing = (0.7, 1.3, 2.9)
    geo = Geometry((0.0, 0.0, 0.0), spacing)
    pred, ref = _blob((10, 14, 16), 30), _blob((10, 14, 16), 31)
    row = evaluate_case(
        _vol(pred, geo), _vol(ref, geo), {1: "x"}, convention="monai", hd95_mode="max_directed"
    )[0]
    yp, yr = torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None])
    sp = spacing[::-1]  # MONAI takes spacing in array-axis order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assd = monai_metrics.compute_average_surface_distance(
            yp, yr, include_background=True, symmetric=True, spacing=sp
        )
        hd = monai_metrics.compute_hausdorff_distance(yp, yr, include_background=True, spacing=sp)
        hd95 = monai_metrics.compute_hausdorff_distance(
            yp, yr, include_background=True, spacing=sp, percentile=95
        )
    assert row["assd"] == pytest.approx(assd.item(), rel=1e-5)
    assert row["max_sd"] == pytest.approx(hd.item(), rel=1e-5)
    assert row["hd95"] == pytest.approx(hd95.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def chaos_case(shared_data):
    path = CHAOS / "labelsTr" / "chaos_01.nii.gz"
    return read_label_map(path), read_volume(CHAOS / "imagesTr" / "chaos_01_0000.nii.gz")


def test_real_case_shifted_by_one_voxel(chaos_case):
    ref, _ = chaos_case
    sx = ref.geometry.spacing[0]  # 1.25 mm
    shifted = np.zeros_like(ref.array)
    shifted[:, :, 1:] = ref.array[:, :, :-1]
    rows = evaluate_case(ref.with_array(shifted), ref, ABDOMEN)
    assert [r["name"] for r in rows] == list(ABDOMEN.values())
    for row in rows:
        assert 0.8 < row["dice"] < 1.0
        # Shifted surfaces are copies 1.25 mm apart: nothing is farther, something is that far.
        assert row["max_sd"] == pytest.approx(sx)
        assert 0 < row["assd"] <= sx and 0 < row["hd95"] <= sx
    # Exactly what the paper's SimpleITK code gives, on real data.
    mean, maximum = _srcsm_surface_distance(shifted == 4, ref.array == 4, ref.geometry)
    assert rows[3]["assd"] == pytest.approx(mean, rel=1e-5)
    assert rows[3]["max_sd"] == pytest.approx(maximum, rel=1e-5)


def test_real_case_eroded(chaos_case):
    ref, _ = chaos_case
    eroded = np.zeros_like(ref.array)
    full = ndimage.generate_binary_structure(3, 3)
    for value in ABDOMEN:
        eroded[ndimage.binary_erosion(ref.array == value, full)] = value
    min_spacing = min(ref.geometry.spacing)
    for convention in ("srcsm", "monai"):
        for row in evaluate_case(ref.with_array(eroded), ref, ABDOMEN, convention=convention):
            assert 0.3 < row["dice"] < 0.98
            # No eroded surface voxel is on the reference's contour and vice versa: all distances ≥ 1 voxel.
            assert row["assd"] >= min_spacing - 1e-9 and row["hd95"] >= min_spacing - 1e-9
            assert row["max_sd"] >= row["hd95"]


def test_evaluate_files_accepts_an_empty_prediction(tmp_path, chaos_case):
    ref, _ = chaos_case
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(ref.with_array(np.zeros_like(ref.array)).to_sitk(), str(empty))
    rows = evaluate_files(empty, CHAOS / "labelsTr" / "chaos_01.nii.gz", ABDOMEN)
    assert [r["dice"] for r in rows] == [0.0] * 4
    assert all(math.isnan(r["hd95"]) for r in rows)


# --------------------------------------------------------------------------------------------- reports


def _synthetic_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for setting, offset in (("with SM", 0.1), ("without SM", 0.0)):
        for c in range(3):
            for label, name in ((1, "liver"), (2, "spleen")):
                dice = float(np.clip(0.75 + offset + rng.normal(0, 0.05), 0, 1))
                rows.append({"setting": setting, "case": f"case_{c}", "label": label, "name": name,
                             "dice": dice, "assd": float(rng.uniform(1, 4)),
                             "hd95": float(rng.uniform(4, 12)),
                             "max_sd": float(rng.uniform(12, 30)), "ref_voxels": 1000, "pred_voxels": 990})
    # One miss and one label absent from the reference.
    rows[1].update(dice=0.0, assd=math.nan, hd95=math.nan, max_sd=math.nan, pred_voxels=0)
    rows[3].update(dice=math.nan, assd=math.nan, hd95=math.nan, max_sd=math.nan, ref_voxels=0)
    return rows


def test_summary_aggregation_follows_srcsm():
    rows = _synthetic_rows()
    summary = summarize(rows)
    assert [(s["setting"], s["label"]) for s in summary] == [
        (s, label) for s in ("with SM", "without SM") for label in (1, 2, "mean")
    ]
    spleen = summary[1]  # with SM, label 2: case_0 missed (Dice 0), case_1 absent (NaN)
    values = [rows[i]["dice"] for i in (1, 3, 5)]
    assert spleen["dice_mean"] == pytest.approx(np.nanmean(values)) and spleen["dice_n"] == 2
    assert spleen["dice_sd"] == pytest.approx(np.nanstd(values, ddof=1))
    assert spleen["n_ref"] == 2 and spleen["n_missed"] == 1 and spleen["assd_n"] == 1
    mean = summary[2]
    assert mean["dice_mean"] == pytest.approx((summary[0]["dice_mean"] + spleen["dice_mean"]) / 2)
    per_case = [np.nanmean([rows[i]["dice"], rows[i + 1]["dice"]]) for i in (0, 2, 4)]
    assert mean["dice_sd"] == pytest.approx(np.std(per_case, ddof=1))


def test_median_case():
    rows = []
    for case, dice in (("b", 0.5), ("a", 0.9), ("c", 0.1)):
        rows += tag_rows([{"label": 1, "name": "a", "dice": dice}], case=case)
    assert median_case(rows) == "b"
    assert median_case(rows[:2]) == "b"  # even count: the lower middle
    assert median_case(tag_rows([{"label": 1, "name": "a", "dice": math.nan}], case="x")) is None


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.exists() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0  # not a blank canvas


def test_write_reports(tmp_path):
    rows = _synthetic_rows()
    shape = (12, 20, 24)
    geo = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.5), _rotation(3))
    image = Volume(np.random.default_rng(1).normal(size=shape).astype(np.float32), geo)
    ref = np.zeros(shape, np.uint8)
    ref[3:9, 5:15, 4:12], ref[3:9, 5:15, 14:20] = 1, 2
    reference = Volume(ref, geo)
    prediction = Volume(np.roll(ref, 1, axis=2), geo)
    loaded = []

    def loader(case, setting):
        loaded.append((case, setting))
        return image, reference, prediction

    colors = {1: (1.0, 0.2, 0.2), 2: (0.2, 0.4, 1.0)}
    out = write_reports(
        rows, tmp_path / "eval", case_loader=loader, colors=colors, notes="Convention: srcsm."
    )
    assert set(out) == {"metrics", "summary_csv", "summary_md", "box_dice", "box_assd", "box_hd95",
                        "overlay:with SM", "overlay:without SM"}
    assert loaded == [(median_case(rows, s), s) for s in ("with SM", "without SM")]
    # Only the reports: no temporary files left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(p.name for p in out.values())

    with open(out["metrics"], newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert tuple(table[0]) == COLUMNS and len(table) == 1 + len(rows)
    back = read_csv(out["metrics"])
    assert back[0]["label"] == 1 and back[0]["dice"] == pytest.approx(rows[0]["dice"], rel=1e-5)
    assert math.isnan(back[3]["dice"]) and back[1]["pred_voxels"] == 0

    summary = read_csv(out["summary_csv"])
    assert tuple(summary[0]) == SUMMARY_COLUMNS and len(summary) == 2 * 3

    text = out["summary_md"].read_text(encoding="utf-8")
    words = ("with SM", "without SM", "liver", "spleen", "mean over labels", "HD95", "ASSD", "max SD", "±",
             "Convention: srcsm.")
    for word in words:
        assert word in text
    for key in ("box_dice", "box_assd", "box_hd95", "overlay:with SM", "overlay:without SM"):
        _assert_png(out[key])


def test_write_reports_single_setting(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "setting"} for r in _synthetic_rows()[:6]]
    out = write_reports(rows, tmp_path)
    assert "overlay" not in " ".join(out)
    geo = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[2:4, 2:6, 2:6] = 1
    volumes = (Volume(np.arange(ref.size, dtype=np.float32).reshape(ref.shape), geo), Volume(ref, geo),
               Volume(ref, geo))
    out = write_reports(rows, tmp_path / "one", case_loader=lambda case, setting: volumes)
    assert out["overlay"].name == "overlay.png"
    _assert_png(out["overlay"])
    assert len(read_csv(out["metrics"])) == 6 and read_csv(out["metrics"])[0]["setting"] == ""
    _assert_png(out["box_dice"])
    with pytest.raises(ValueError, match="tag_rows"):
        write_reports([{"label": 1, "dice": 1.0}], tmp_path)


def test_overlay_of_a_real_case(tmp_path, chaos_case):
    ref, image = chaos_case
    prediction = ref.with_array(np.roll(ref.array, 2, axis=1))
    colors = {1: (0.9, 0.3, 0.2), 2: (0.2, 0.8, 0.2), 3: (0.2, 0.4, 0.9), 4: (0.9, 0.8, 0.1)}
    path = overlay_figure(image, ref, prediction, colors, tmp_path / "overlay.png", names=ABDOMEN)
    _assert_png(path)
    moved = Volume(prediction.array, Geometry((0.0, 0.0, 0.0), ref.geometry.spacing, ref.geometry.direction))
    with pytest.raises(InputError, match="same voxel grid"):
        overlay_figure(image, ref, moved, None, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
