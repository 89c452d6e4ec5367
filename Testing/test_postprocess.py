"""Post-processing as part of the model: the card's default clean-up, the CLI's choice and override,
old cards, and the clean-ups themselves in millimetres on real labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from SRCSMSegmenterLib import cli, postprocess
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import Volume, read_volume
from SRCSMSegmenterLib.modelpackage import ModelCard, load_package
from SRCSMSegmenterLib.postprocess import PostProcessing, resolve

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"
STRUCTURE = np.ones((3, 3, 3), bool)


def _components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=STRUCTURE)[1]


@pytest.mark.parametrize("model", ["abdomen-ct-srcsm", "abdomen-mr-srcsm", "cardiac-bssfp-srcsm"])
def test_cards_without_the_field_load_with_none(model):
    data = json.loads((MODELS / model / "model.json").read_text(encoding="utf-8"))
    data.pop("postprocessing", None)
    assert ModelCard.model_validate(data).postprocessing == PostProcessing(method="none")


@pytest.mark.parametrize("model", ["abdomen-ct-srcsm", "abdomen-mr-srcsm", "cardiac-bssfp-srcsm"])
def test_bundled_cards_carry_a_measured_clean_up(model):
    raw = json.loads((MODELS / model / "model.json").read_text(encoding="utf-8"))
    assert "postprocessing" in raw  # written into the card, not defaulted
    pp = load_package(MODELS / model).card.postprocessing
    assert pp.chosen_by and "choose-postprocessing" in pp.chosen_by  # says how it was measured


def test_schema_refuses_an_incomplete_clean_up():
    with pytest.raises(ValueError, match="min_volume_mm3"):
        PostProcessing(method="min_volume")
    with pytest.raises(ValueError, match="only applies"):
        PostProcessing(method="keep_largest", min_volume_mm3=10)


def test_resolve_the_users_choice_against_the_card():
    card = PostProcessing(method="min_volume", min_volume_mm3=500, chosen_by="validation")
    assert resolve(card, "card") is card
    assert resolve(None, "card").method == "none"
    assert resolve(card, "none").method == "none"
    assert resolve(card, "keep-largest").method == "keep_largest"
    assert resolve(PostProcessing(), "min-volume:250").min_volume_mm3 == 250
    assert resolve(card, "KEEP-LARGEST").method == "keep_largest"
    for bad in ("largest", "min-volume:", "min-volume:-3", "min-volume:abc"):
        with pytest.raises(InputError, match="min-volume:MM3"):
            resolve(card, bad)
    assert card.cli_value() == "min-volume:500" and resolve(None, card.cli_value()) == PostProcessing(
        method="min_volume", min_volume_mm3=500)


def test_min_volume_removes_islands_by_their_physical_size(real_case):
    """Islands of known size in mm³ added to a real cardiac label map (1.25 × 1.25 × 8 mm voxels)."""
    _, label_path, _ = real_case("Dataset503", "pat_36")
    ref = read_volume(label_path)
    voxel = float(np.prod(ref.geometry.spacing))
    labels = ref.array.copy()
    assert _components(labels == 3) == 1
    k = int(np.nonzero((labels > 0).any(axis=(1, 2)))[0][0])
    labels[k, 0:4, 0:4] = 3  # 16 voxels: 200 mm³, far from the heart
    labels[k, 0:8, 180:190] = 3  # 80 voxels: 1000 mm³
    before = (labels == 3).sum()
    out = postprocess.apply(labels.copy(), [1, 2, 3], PostProcessing(method="min_volume", min_volume_mm3=500),
                            ref.geometry.spacing)
    assert _components(out == 3) == 2 and (out == 3).sum() == before - 16
    assert np.array_equal(out[labels != 3], labels[labels != 3])  # other labels untouched
    assert 16 * voxel == pytest.approx(200.0)
    # keep-largest drops both; a threshold above every component still keeps each label's largest one
    kept = postprocess.apply(labels.copy(), [1, 2, 3], postprocess.KEEP_LARGEST, ref.geometry.spacing)
    assert _components(kept == 3) == 1 and np.array_equal(kept, ref.array)
    huge = postprocess.apply(labels.copy(), [1, 2, 3], PostProcessing(method="min_volume", min_volume_mm3=1e9),
                             ref.geometry.spacing)
    assert np.array_equal(huge, ref.array)


def _whole_volume_reference(labels: np.ndarray, values: list[int], min_voxels: float | None) -> np.ndarray:
    """The definition, on the whole array: per label, components of the full mask."""
    out = labels.copy()
    for value in values:
        comp, n = ndimage.label(labels == value, structure=STRUCTURE)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        drop = np.ones_like(sizes, bool) if min_voxels is None else sizes < min_voxels
        drop[int(np.argmax(sizes))] = False
        drop[0] = False
        out[drop[comp]] = 0
    return out


def test_clean_up_in_bounding_boxes_equals_the_whole_volume_definition(shared_data):
    """Components are found inside each label's bounding box (fast on a clinical-size CT); the result is
    the whole-volume definition's, voxel for voxel — with islands at the array's faces and corners, a
    label absent, and a label value above every present one."""
    ref = read_volume(shared_data / "Dataset501_AbdomenCT" / "labelsTr" / "sabs_00.nii.gz")
    labels = ref.array.copy()
    rng = np.random.default_rng(0)
    for value in (1, 2, 4):
        for _ in range(12):
            size = rng.integers(1, 6, 3)
            corner = [int(rng.integers(0, n - s + 1)) for n, s in zip(labels.shape, size)]
            labels[tuple(slice(c, c + s) for c, s in zip(corner, size))] = value
    labels[0, 0, 0] = 3
    labels[-1, -1, -1] = 1
    labels[labels == 2] = np.where(rng.random((labels == 2).sum()) < 0.02, 0, 2)  # a ragged organ
    values = [1, 2, 3, 4, 7]
    assert all(_components(labels == v) > 5 for v in (1, 2, 4))
    kept = postprocess.keep_largest_components(labels.copy(), values)
    assert np.array_equal(kept, _whole_volume_reference(labels, values, None))
    assert all(_components(kept == v) == 1 for v in (1, 2, 3, 4))
    for min_voxels in (8.0, 60.0):
        got = postprocess.remove_small_components(labels.copy(), values, min_voxels)
        assert np.array_equal(got, _whole_volume_reference(labels, values, min_voxels))
        assert not np.array_equal(got, labels)


@pytest.fixture(scope="module")
def cardiac_with_default(tmp_path_factory) -> Path:
    """The bundled cardiac package with a card that prescribes keep-largest (weights untouched)."""
    folder = tmp_path_factory.mktemp("pp") / "cardiac-keep-largest"
    shutil.copytree(MODELS / "cardiac-bssfp-srcsm", folder)
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    data["id"] = "cardiac-keep-largest"
    data["postprocessing"] = {"method": "keep_largest", "chosen_by": "test"}
    (folder / "model.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def _segment(image: Path, out: Path, model: Path, *flags: str) -> tuple[Volume, dict]:
    rc = cli.main(["segment", str(image), str(out), "--model", str(model), "--device", "cpu", "--progress", "none",
                   "--overwrite", *flags])
    assert rc == 0
    return read_volume(out), {}


def test_cli_applies_the_cards_clean_up_unless_told_otherwise(cardiac_with_default, real_case, tmp_path, capsys):
    """The cardiac model on an LGE case leaves stray islands (module docstring of postprocess.py):
    the card's keep-largest removes them by default; --no-keep-largest / --postprocess none keep them."""
    image, _, _ = real_case("Dataset504", "pat_06")
    raw, _ = _segment(image, tmp_path / "none.nii.gz", cardiac_with_default, "--postprocess", "none")
    assert any(_components(raw.array == v) > 1 for v in (1, 2, 3)), "the case should have islands to remove"
    default, _ = _segment(image, tmp_path / "default.nii.gz", cardiac_with_default)
    expected = postprocess.keep_largest_components(raw.array.copy(), [1, 2, 3])
    assert np.array_equal(default.array, expected)
    assert all(_components(default.array == v) <= 1 for v in (1, 2, 3))
    off, _ = _segment(image, tmp_path / "off.nii.gz", cardiac_with_default, "--no-keep-largest")
    assert np.array_equal(off.array, raw.array)
    # a card without a clean-up: --keep-largest still asks for one
    plain = MODELS / "cardiac-bssfp-srcsm"
    if load_package(plain).card.postprocessing.method == "none":
        on, _ = _segment(image, tmp_path / "on.nii.gz", plain, "--keep-largest")
        assert np.array_equal(on.array, expected)
    small, _ = _segment(image, tmp_path / "small.nii.gz", cardiac_with_default, "--postprocess", "min-volume:300")
    spacing = read_volume(image).geometry.spacing
    assert np.array_equal(small.array, postprocess.remove_small_components(
        raw.array.copy(), [1, 2, 3], 300 / float(np.prod(spacing))))


def test_cli_reports_the_clean_up_and_refuses_an_unknown_one(cardiac_with_default, real_case, tmp_path, capsys):
    image, _, _ = real_case("Dataset504", "pat_06")
    out = tmp_path / "x.nii.gz"
    assert cli.main(["segment", str(image), str(out), "--model", str(cardiac_with_default), "--device", "cpu",
                     "--progress", "json"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"done"' in line]
    assert done and done[-1]["postprocessing"] == "keep-largest"
    assert cli.main(["segment", str(image), str(tmp_path / "y.nii.gz"), "--model", str(cardiac_with_default),
                     "--postprocess", "biggest", "--progress", "none"]) == 2
    assert "Unknown post-processing 'biggest'" in capsys.readouterr().err
    assert not (tmp_path / "y.nii.gz").exists()
    with pytest.raises(SystemExit):  # the three spellings are one choice
        cli.main(["segment", str(image), str(out), "--keep-largest", "--no-keep-largest"])


def test_choose_on_validation_cases_and_write_the_card(shared_data, tmp_path):
    """The measurement behind the bundled cards' choice, on one cardiac validation case — both inference
    strategies × every clean-up — and the card edit that records it (a text edit: every other byte of
    model.json stays)."""
    from train.choose_postprocessing import CANDIDATES, DICE_TIE, STRATEGIES, choose, measure, write_card

    summary = measure(MODELS / "cardiac-bssfp-srcsm", shared_data / "Dataset503_CardiacBSSFP", ["val"], limit=1,
                      log=lambda m: None)
    assert summary["cases"] == ["pat_36"] and set(summary["strategies"]) == set(STRATEGIES)
    for per_strategy in summary["strategies"].values():
        assert len(per_strategy["candidates"]) == len(CANDIDATES) and per_strategy["network_s_median"] > 0
    chosen = choose(summary)
    best = max(c["dice"] for s in summary["strategies"].values() for c in s["candidates"].values())
    picked = summary["strategies"][chosen.strategy]["candidates"][chosen.postprocessing.cli_value()]
    assert picked["dice"] >= best - DICE_TIE
    assert "1 Dataset503_CardiacBSSFP val cases" in chosen.postprocessing.chosen_by
    assert all(s in chosen.strategy_chosen_by for s in STRATEGIES)  # both measured, both reported
    folder = tmp_path / "pkg"
    shutil.copytree(MODELS / "cardiac-bssfp-srcsm", folder)
    before = (folder / "model.json").read_text(encoding="utf-8")
    write_card(folder, chosen.postprocessing)
    assert load_package(folder).card.postprocessing == chosen.postprocessing
    after = (folder / "model.json").read_text(encoding="utf-8")
    data_before, data_after = json.loads(before), json.loads(after)
    data_before.pop("postprocessing", None), data_after.pop("postprocessing")
    assert data_before == data_after
    write_card(folder, PostProcessing(method="min_volume", min_volume_mm3=42, chosen_by="again"),
               strategy="sliding_window", strategy_chosen_by="by hand")
    card = load_package(folder).card
    assert card.postprocessing.min_volume_mm3 == 42
    assert card.inference.strategy == "sliding_window" and card.inference.chosen_by == "by hand"
    assert card.inference.overlap == json.loads(before)["inference"]["overlap"]  # the rest of the block kept
    data_again = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    for d in (data_before, data_again):
        d.pop("postprocessing", None), d.pop("inference")
    assert data_before == data_again
    with pytest.raises(ValueError, match="no model.json"):
        write_card(tmp_path, chosen.postprocessing)


def test_choose_prefers_the_better_strategy_and_breaks_ties_by_order():
    from train.choose_postprocessing import CANDIDATES, choose

    def summary(dice_whole: float, dice_sliding: float) -> dict:
        def cands(d):
            return {c.cli_value(): {"dice": d - 0.01 * (c.method != "none"), "hd95": 5.0} for c in CANDIDATES}
        return {"cases": ["a"], "dataset": "D", "splits": ["val"], "device": "cpu",
                "strategies": {"whole_grid": {"network_s_median": 1.0, "candidates": cands(dice_whole)},
                               "sliding_window": {"network_s_median": 5.0, "candidates": cands(dice_sliding)}}}

    assert choose(summary(0.70, 0.80)).strategy == "sliding_window"
    assert choose(summary(0.80, 0.70)).strategy == "whole_grid"
    tie = choose(summary(0.80, 0.80))
    assert tie.strategy == "whole_grid" and tie.postprocessing.method == "none"


def test_export_writes_the_field(tiny_model):
    raw = json.loads((Path(tiny_model) / "model.json").read_text(encoding="utf-8"))
    assert raw["postprocessing"]["method"] == "none"


def test_evaluate_scores_what_a_user_gets(cardiac_with_default, shared_data, tmp_path):
    """`python -m train evaluate` applies the card's clean-up by default (the labels `srcsm segment`
    writes), says so in summary.json and in the card metrics; --postprocess none scores the network's
    own labels, as the ablation does."""
    from model_fixtures import make_subset_dataset
    from train.__main__ import main as train_main
    from train.card_metrics import card_metrics
    from train.evaluate import evaluate_model

    lge = make_subset_dataset(tmp_path / "Dataset504_CardiacLGE", shared_data / "Dataset504_CardiacLGE",
                              [], ["pat_06"])
    card = evaluate_model(cardiac_with_default, lge, tmp_path / "card", split="val", sm="on", device="cpu",
                          log=lambda m: None)
    assert train_main(["evaluate", str(cardiac_with_default), str(lge), "--split", "val", "--sm", "on",
                       "--device", "cpu", "--no-keep-largest", "--out", str(tmp_path / "none")]) == 0
    none = json.loads((tmp_path / "none" / "summary.json").read_text(encoding="utf-8"))
    assert card["postprocessing"] == "keep-largest" and none["postprocessing"] == "none"
    kept = read_volume(tmp_path / "card" / "predictions" / "with_sm" / "pat_06.nii.gz").array
    raw = read_volume(tmp_path / "none" / "predictions" / "with_sm" / "pat_06.nii.gz").array
    assert np.array_equal(kept, postprocess.keep_largest_components(raw.copy(), [1, 2, 3]))
    assert not np.array_equal(kept, raw)  # pat_06 has stray islands (the CLI test above)
    # the islands cost Dice: the clean-up the card prescribes scores higher on this case
    assert card["settings"]["with SM"]["mean"]["dice"] > none["settings"]["with SM"]["mean"]["dice"]
    metrics = card_metrics({"lge": tmp_path / "card", "lge_raw": tmp_path / "none"})
    assert metrics["lge"]["postprocessing"] == "keep-largest" and metrics["lge_raw"]["postprocessing"] == "none"
