"""The robustness benchmark (train/robustness.py) and its perturbations (train/perturbations.py), on
real cases: every geometric perturbation keeps the anatomy's world position, the raw-HU synthesis
has the properties of a scanner CT, the report is written from the results, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SRCSMSegmenterLib.image import Volume, read_volume
from train import perturbations as P
from train.metrics import read_label_map
from train.robustness import (UNPERTURBED, bar_failures, empty_details, load_results, match_previous,
                              run_robustness, summarize, write_report)

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


@pytest.fixture(scope="module")
def cardiac(real_case):
    """An oblique, thick-slice short-axis stack (bSSFP, 1.25 × 1.25 × 8 mm)."""
    image, label, _ = real_case("Dataset503", "pat_36")
    return read_volume(image), read_label_map(label)


@pytest.fixture(scope="module")
def abdomen(real_case):
    """An axial CHAOS T2 volume (1.25 × 1.25 × 7.7 mm, flipped y axis)."""
    image, label, _ = real_case("Dataset502", "chaos_01")
    return read_volume(image), read_label_map(label)


def _world_of_voxels(v: Volume, mask: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask)
    return v.geometry.index_to_physical(kji[:, ::-1].astype(float))


def _centroid(v: Volume, value: int) -> np.ndarray:
    return _world_of_voxels(v, v.array == value).mean(0)


def _volume_mm3(v: Volume, value: int) -> float:
    return float((v.array == value).sum() * np.prod(v.geometry.spacing))


def _values_at(v: Volume, world: np.ndarray) -> np.ndarray:
    ijk = np.rint(v.geometry.physical_to_index(world)).astype(int)
    return v.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]]


def _same_voxels_in_the_world(orig: Volume, new: Volume, lab_orig: Volume, lab_new: Volume) -> None:
    """Every voxel of ``new`` sits exactly on a voxel of ``orig`` with the same value (crops, pads,
    flips: nothing resampled)."""
    k, j, i = np.indices(new.shape).reshape(3, -1)
    world = new.geometry.index_to_physical(np.stack([i, j, k], 1).astype(float))
    idx = orig.geometry.physical_to_index(world)
    assert np.allclose(idx, np.rint(idx), atol=1e-4), "voxel centres moved off the original grid"
    idx = np.rint(idx).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(orig.shape[::-1])), axis=1)
    flat_new = new.array.reshape(-1)
    assert np.array_equal(flat_new[inside], orig.array[idx[inside, 2], idx[inside, 1], idx[inside, 0]])
    assert np.array_equal(lab_new.array.reshape(-1)[inside],
                          lab_orig.array[idx[inside, 2], idx[inside, 1], idx[inside, 0]])
    assert np.all(flat_new[~inside] == orig.array.min())  # padding is air
    assert not lab_new.array.reshape(-1)[~inside].any()


@pytest.mark.parametrize("thickness", [40, 60, 90, 150])
def test_slab_is_centred_on_the_anatomy_along_the_slice_axis(abdomen, thickness):
    image, label = abdomen
    img, lab = P.slab(image, label, thickness)
    _same_voxels_in_the_world(image, img, label, lab)
    centre = P.foreground_centre(label)
    axis = image.geometry.direction_matrix[:, 2]
    offsets = (_world_of_voxels(img, np.ones(img.shape, bool)) - centre) @ axis
    assert offsets.min() >= -thickness / 2 - 1e-6 and offsets.max() <= thickness / 2 + 1e-6
    assert offsets.max() - offsets.min() >= thickness - 2 * image.geometry.spacing[2] - 1e-6 or img.shape == image.shape
    # the slab's labels are the original's inside it (and every organ in the slab has voxels)
    assert lab.array.any() and img.shape[1:] == image.shape[1:]


def test_in_plane_crop_and_padding_keep_the_world(abdomen):
    image, label = abdomen
    img, lab = P.crop_in_plane(image, label)
    _same_voxels_in_the_world(image, img, label, lab)
    assert img.shape == (image.shape[0], image.shape[1] // 2, image.shape[2] // 2)
    ijk = img.geometry.physical_to_index(P.foreground_centre(label)[None])[0]
    assert np.all((ijk[:2] >= 0) & (ijk[:2] < np.array(img.shape[:0:-1])))
    img, lab = P.pad_in_plane(image, label, 500.0)
    _same_voxels_in_the_world(image, img, label, lab)
    fov = np.array(img.shape[:0:-1]) * np.array(img.geometry.spacing[:2])
    assert np.all(fov >= 500.0) and np.all(fov < 500.0 + 2 * np.array(img.geometry.spacing[:2]))
    for v in (1, 2, 3, 4):
        assert np.allclose(_centroid(lab, v), _centroid(label, v), atol=1e-6)


@pytest.mark.parametrize("axis", ["i", "k"])
def test_flips_store_the_same_physical_image(cardiac, axis):
    image, label = cardiac
    img, lab = P.flip(image, label, axis)
    assert not np.array_equal(img.array, image.array)  # really stored the other way round
    assert np.linalg.det(img.geometry.direction_matrix) == pytest.approx(-np.linalg.det(image.geometry.direction_matrix))
    _same_voxels_in_the_world(image, img, label, lab)


def test_oblique_grid_keeps_every_structure_in_place(cardiac):
    image, label = cardiac
    img, lab = P.oblique(image, label, 25.0)
    r = img.geometry.direction_matrix @ image.geometry.direction_matrix.T  # the rotation in the world
    assert np.degrees(np.arccos((np.trace(r) - 1) / 2)) == pytest.approx(25.0)
    cos = np.clip(np.diag(image.geometry.direction_matrix.T @ img.geometry.direction_matrix), -1, 1)
    assert np.degrees(np.arccos(cos[2])) > 20  # the slices tilt
    for v in (1, 2, 3):
        # the centroid stays within a fraction of the thick slice; the volume within a few per cent
        assert np.linalg.norm(_centroid(lab, v) - _centroid(label, v)) < 2.0
        assert _volume_mm3(lab, v) == pytest.approx(_volume_mm3(label, v), rel=0.08)
    # grey values follow: the image at the blood pool's world positions is the blood pool's
    pool = _world_of_voxels(label, label.array == 2)
    assert np.median(_values_at(img, pool)) == pytest.approx(np.median(image.array[label.array == 2]), rel=0.1)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0), (None, None, 10.0)])
def test_resampling_keeps_extent_position_and_volume(abdomen, spacing):
    image, label = abdomen
    img, lab = P.respace(image, label, spacing)
    want = [s if s is not None else image.geometry.spacing[a] for a, s in enumerate(spacing)]
    assert np.allclose(img.geometry.spacing, want)
    assert np.allclose(img.geometry.direction, image.geometry.direction)
    ext = np.array(image.shape[::-1]) * np.array(image.geometry.spacing)
    new_ext = np.array(img.shape[::-1]) * np.array(img.geometry.spacing)
    assert np.all(new_ext >= ext - 1e-6) and np.all(new_ext < ext + np.array(want) + 1e-6)
    assert np.allclose(P.foreground_centre(lab), P.foreground_centre(label), atol=max(want))
    for v in (1, 4):  # liver and spleen: large enough for a 10 mm slice
        assert np.linalg.norm(_centroid(lab, v) - _centroid(label, v)) < max(want)
        assert _volume_mm3(lab, v) == pytest.approx(_volume_mm3(label, v), rel=0.1)


def test_follow_labels_carries_a_prediction_onto_a_perturbed_grid(abdomen):
    image, label = abdomen
    img, lab = P.oblique(image, label, 25.0)
    carried = P.follow_labels(label, img.geometry, img.shape)
    assert np.array_equal(carried.array, lab.array)  # the same nearest-neighbour map as the reference's


def test_raw_hu_synthesis_is_a_scanner_like_ct(real_case):
    image_path, _, _ = real_case("Dataset501", "sabs_02")
    ct = read_volume(image_path)
    floor, ceiling = float(ct.array.min()), float(ct.array.max())
    assert (floor, ceiling) == (-125.0, 275.0)  # the shared copy's window
    raw = P.raw_hu(ct, seed=5)
    a, b = ct.array, raw.array
    assert raw.array.dtype == np.int16 and raw.geometry == ct.geometry
    inside = (a > floor) & (a < ceiling)
    assert np.array_equal(b[inside], a[inside])  # nothing changes inside the window
    air, bone = b[a <= floor], b[a >= ceiling]
    assert air.min() >= -1024 and air.max() <= -880 and np.unique(air).size > 100  # a continuum of air
    assert bone.min() >= ceiling and bone.max() <= 1500 and bone.max() > 1000 and np.unique(bone).size > 100
    assert np.array_equal(P.raw_hu(ct, seed=5).array, b)  # deterministic
    assert not np.array_equal(P.raw_hu(ct, seed=6).array, b)
    # the guess that picks the SM rule sees a CT either way
    from SRCSMSegmenterLib.matching import guess_modality

    assert guess_modality(b) == guess_modality(a) == "CT"


def test_scaled_intensities_and_modalities(abdomen):
    image, label = abdomen
    scaled = P.scale_intensities(image)
    assert scaled.array.dtype == np.float32 and np.allclose(scaled.array, image.array * 1e4)
    mr = [p.name for p in P.perturbations_for("MR")]
    ct = [p.name for p in P.perturbations_for("CT")]
    assert "scale_1e4" in mr and "raw_hu" not in mr and "raw_hu" in ct and "scale_1e4" not in ct
    with pytest.raises(ValueError, match="unknown perturbation"):
        P.perturbations_for("MR", ["slab_40mm", "tilt"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, shared_data):
    """The cardiac model on one LGE case under four perturbations, through the real pipeline."""
    out = tmp_path_factory.mktemp("robustness") / "cardiac-lge"
    run_robustness(MODELS / "cardiac-bssfp-srcsm", shared_data / "Dataset504_CardiacLGE", out, split="test",
                   cases=1, perturbations=["slab_40mm", "flip_k", "scale_1e4", "raw_hu"], device="cpu",
                   command="python -m train robustness (test)", log=lambda m: None)
    return out


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_at_its_first_unfinished_case(shared_data, tmp_path):
    """A run stopped after its first case (here: by its log, as a session's end or Ctrl-C stops it) keeps
    that case; run again with the same model and settings it measures only the rest and its result is the
    uninterrupted run's. Other settings (a seed) measure every case again; a complete run leaves no
    partial cases behind."""
    model, data = MODELS / "abdomen-mr-srcsm", shared_data / "Dataset502_AbdomenMRT2"
    kw = dict(split="test", cases=2, perturbations=["flip_k"], device="cpu", command="test")

    def stop_after_first_case(message: str) -> None:
        if "unperturbed mean Dice" in message:
            raise _Stop(message)

    out = tmp_path / "rob"
    with pytest.raises(_Stop):
        run_robustness(model, data, out, log=stop_after_first_case, **kw)
    assert not (out / "robustness.json").exists()
    kept = json.loads(next((out / "partial").glob("*.json")).read_text(encoding="utf-8"))
    first = kept["case"]

    messages: list[str] = []
    result = run_robustness(model, data, out, log=messages.append, **kw)
    assert result["meta"]["resumed_cases"] == [first]
    assert sum("kept from an interrupted run" in m for m in messages) == 1
    assert sum("unperturbed mean Dice" in m for m in messages) == 1  # only the second case is measured
    assert not (out / "partial").exists()
    # the kept rows are those measured before the stop (their timings too), the second case measured now
    rows = result["rows"]
    assert [r for r in rows if r["case"] == first] == kept["rows"]
    assert len({r["case"] for r in rows}) == 2 and {r["perturbation"] for r in rows} == {UNPERTURBED, "flip_k"}
    for r in rows:  # a storage flip changes nothing, so both cases are real, consistent results
        assert r["agreement"] >= 0.99 and r["dice"] > 0.5

    # a partial case measured under other settings is not taken
    with pytest.raises(_Stop):
        run_robustness(model, data, tmp_path / "rob2", log=stop_after_first_case, **kw)
    other: list[str] = []
    run_robustness(model, data, tmp_path / "rob2", log=other.append, **{**kw, "seed": 1})
    assert not any("kept from" in m for m in other)


def test_end_to_end_run_scores_each_perturbation_in_its_own_view(small_run, shared_data):
    result = load_results([small_run])[0]
    meta, rows = result["meta"], result["rows"]
    assert meta["perturbations"] == ["slab_40mm", "flip_k", "scale_1e4"]  # raw_hu is CT only
    from SRCSMSegmenterLib.modelpackage import load_package

    assert meta["cases"] == ["pat_06"]
    assert meta["postprocessing"] == load_package(MODELS / "cardiac-bssfp-srcsm").card.postprocessing.cli_value()
    assert {(r["perturbation"], r["label"]) for r in rows} == {
        (p, v) for p in ["none", *meta["perturbations"]] for v in (1, 2, 3)}
    # the slab is scored inside the slab: fewer reference voxels than the whole volume
    ref = read_label_map(shared_data / "Dataset504_CardiacLGE" / "labelsTr" / "pat_06.nii.gz")
    slab = {r["label"]: r for r in rows if r["perturbation"] == "slab_40mm"}
    whole = {r["label"]: r for r in rows if r["perturbation"] == "none"}
    for v in (1, 2, 3):
        assert whole[v]["ref_voxels"] == int((ref.array == v).sum())
        assert 0 < slab[v]["ref_voxels"] < whole[v]["ref_voxels"]
        assert whole[v]["agreement"] == 1.0 and whole[v]["dice"] == whole[v]["dice_unperturbed"]
        # how much of the label is in view, physically: the whole scan holds it all, the slab a part
        organ_ml = int((ref.array == v).sum()) * float(np.prod(ref.geometry.spacing)) / 1000.0
        assert whole[v]["organ_ml"] == pytest.approx(organ_ml)
        assert slab[v]["organ_ml"] == pytest.approx(organ_ml)
        assert whole[v]["ref_ml"] == pytest.approx(organ_ml)
        assert 0 < slab[v]["ref_ml"] < organ_ml
    # physical no-ops give the unperturbed result: a flipped storage order and a header scale
    for p in ("flip_k", "scale_1e4"):
        for r in (r for r in rows if r["perturbation"] == p):
            assert r["agreement"] >= 0.99, r
            assert r["dice"] == pytest.approx(r["dice_unperturbed"], abs=0.01)
    s = summarize(result)
    assert list(s) == ["none", "slab_40mm", "flip_k", "scale_1e4"]
    assert s["none"]["dice"] > 0.3  # a real segmentation, not an empty one


def test_report_is_written_from_the_results_deterministically(small_run, tmp_path):
    md = write_report([small_run], tmp_path / "docs" / "robustness.md", tmp_path / "docs" / "figures",
                      log=lambda m: None)
    text = md.read_text(encoding="utf-8")
    figure = tmp_path / "docs" / "figures" / "robustness_cardiac-bssfp-srcsm.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](figures/robustness_cardiac-bssfp-srcsm.png)" in text
    result = load_results([small_run])[0]
    s = summarize(result)
    for p, v in s.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| `{p}`"))
        assert f"| {v['dice']:.2f} | {v['dice_unperturbed']:.2f} |" in line
        assert f"| {v['empty']}/{v['in_view']} |" in line
    assert "cross-domain Dataset504_CardiacLGE (test)" in text and result["meta"]["command"] in text
    first = (md.read_bytes(), figure.read_bytes())
    write_report([small_run], md, tmp_path / "docs" / "figures", log=lambda m: None)
    assert (md.read_bytes(), figure.read_bytes()) == first
    with pytest.raises(ValueError, match="robustness.json"):
        write_report([tmp_path], md, tmp_path / "docs" / "figures")
    assert json.loads((small_run / "robustness.json").read_text(encoding="utf-8"), parse_constant=float)


def test_report_says_how_much_of_a_label_left_empty_was_in_view(small_run, tmp_path):
    """An empty label is listed with its case and how much of it the view held, so a sliver at a slab's
    edge reads differently from a missed organ; results from before ``ref_ml`` name voxels."""
    result = load_results([small_run])[0]
    assert empty_details(result) == [] or all("mL in view" in e for e in empty_details(result))
    slab_row = next(r for r in result["rows"] if r["perturbation"] == "slab_40mm" and r["label"] == 1)
    emptied = json.loads(json.dumps(result))
    for r in emptied["rows"]:
        r["empty_in_view"] = r["perturbation"] == "slab_40mm" and r["label"] == 1
        r["pred_voxels"] = 0 if r["empty_in_view"] else r["pred_voxels"]
    share = slab_row["ref_ml"] / slab_row["organ_ml"]
    name = result["meta"]["labels"]["1"]
    assert empty_details(emptied) == [f"`slab_40mm` pat_06 {name} ({slab_row['ref_ml']:.1f} mL in view, "
                                      f"{share:.0%} of its {slab_row['organ_ml']:.0f} mL)"]
    older = json.loads(json.dumps(emptied))
    for r in older["rows"]:
        del r["ref_ml"], r["organ_ml"]
    assert empty_details(older) == [f"`slab_40mm` pat_06 {name} ({slab_row['ref_voxels']} voxels in view)"]
    folder = tmp_path / "emptied"
    folder.mkdir()
    (folder / "robustness.json").write_text(json.dumps(emptied), encoding="utf-8")
    md = write_report([folder], tmp_path / "r.md", tmp_path / "fig", log=lambda m: None)
    text = md.read_text(encoding="utf-8")
    assert "Left empty where in view: " + empty_details(emptied)[0] + "." in text


def _setting(dice: float, same_view: float, empty: int = 0, in_view: int = 3) -> dict:
    return {"dice": dice, "dice_unperturbed": same_view, "agreement": 1.0, "empty": empty, "in_view": in_view,
            "labels": {}}


def test_the_bar_holds_every_perturbation_but_the_thinnest_views_to_five_hundredths():
    met = {UNPERTURBED: _setting(0.85, 0.85), "slab_60mm": _setting(0.80, 0.85), "iso_3mm": _setting(0.84, 0.85),
           "slab_40mm": _setting(0.40, 0.85), "crop_half": _setting(0.50, 0.80)}
    assert bar_failures(met) == []
    failing = dict(met, slab_60mm=_setting(0.79, 0.85), oblique_25deg=_setting(0.70, 0.86),
                   slab_40mm=_setting(0.40, 0.85, empty=2), pad_500mm=_setting(float("nan"), 0.85))
    # a 40 mm slab may lose Dice but never leave a label in view empty; NaN (nothing in view) is no failure
    assert bar_failures(failing) == ["`slab_60mm` -0.06", "`slab_40mm` 2 empty", "`oblique_25deg` -0.16"]
    assert bar_failures({UNPERTURBED: _setting(0.6, 0.6, empty=1)}) == ["`none` 1 empty"]


def test_report_sets_the_earlier_version_beside_the_same_cases_and_states_the_bar(small_run, tmp_path):
    """An earlier version's run on the same cases (another weights hash) goes beside the result; the
    overview says whether the bar is met and why not."""
    result = json.loads((small_run / "robustness.json").read_text(encoding="utf-8"))
    old = json.loads(json.dumps(result))
    old["meta"].update(model_version="0.0.9", weights_sha256="0" * 64, date="2026-01-01")
    for r in old["rows"]:
        if r["perturbation"] == "slab_40mm":
            r.update(dice=0.0, empty_in_view=r["ref_voxels"] > 0)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "robustness.json").write_text(json.dumps(old), encoding="utf-8")
    current, earlier = load_results([small_run]), load_results([tmp_path / "old"])
    assert match_previous(current, earlier) == {0: earlier[0]}
    assert match_previous(current, current) == {}  # the same weights are not an earlier version
    other_cases = json.loads(json.dumps(old))
    other_cases["meta"]["cases"] = ["pat_07"]
    assert match_previous(current, [other_cases]) == {}
    with pytest.raises(ValueError, match="one folder per model and dataset"):
        match_previous(current, earlier + earlier)

    md = write_report([small_run], tmp_path / "robustness.md", tmp_path / "figures", log=lambda m: None,
                      previous=[tmp_path / "old"])
    text = md.read_text(encoding="utf-8")
    s, ps = summarize(current[0]), summarize(earlier[0])
    assert "| perturbation | Dice | same view | Δ | agree | empty | 0.0.9 | Δ 0.0.9 |" in text
    line = next(line for line in text.splitlines() if line.startswith("| `slab_40mm`"))
    assert f"| {s['slab_40mm']['dice']:.2f} |" in line
    assert f"| 0.00 (∅ {ps['slab_40mm']['empty']}/{ps['slab_40mm']['in_view']}) |" in line
    overview = next(line for line in text.splitlines() if line.startswith("| cardiac-bssfp-srcsm "))
    assert f"| {s[UNPERTURBED]['dice']:.2f} (0.0.9: {ps[UNPERTURBED]['dice']:.2f}) |" in overview
    failures = bar_failures(s)
    assert overview.endswith("| met |" if not failures else "| not met: " + "; ".join(failures) + " |")
