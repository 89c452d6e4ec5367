"""The card's field of view (SRCSMSegmenterLib/field_of_view.py): measured by the robustness benchmark,
written into the card, and a warning when an image — or a region of interest — is thinner than what
the model segments reliably. On real cases cut as a clinical slab is cut, through the real Segmenter and
``srcsm segment`` (whose ``done`` event is what the Slicer module shows)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from SRCSMSegmenterLib.field_of_view import (DomainSlabs, FieldOfViewLimits, SlabMeasurement, covers_slab, format_mm,
                                            models_holding_at, thin_view_warning, thinnest_extent_mm, thinnest_view)
from SRCSMSegmenterLib.image import read_volume, write_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.model_info import model_card_html, model_card_text
from SRCSMSegmenterLib.modelpackage import load_package
from SRCSMSegmenterLib.preprocessing import physical_bounds
from test_cli import srcsm
from train import perturbations as P
from train.metrics import read_label_map
from train.robustness import field_of_view_limits, load_results, run_robustness, summarize, write_field_of_view

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def _slab(mm: float, delta: float | None, empty: int = 0) -> SlabMeasurement:
    return SlabMeasurement(thickness_mm=mm, delta_dice=delta, empty=empty, in_view=12)


def _domain(dataset: str, modality: str, *slabs: SlabMeasurement) -> DomainSlabs:
    return DomainSlabs(dataset=dataset, modality=modality, cases=3, slabs=slabs)


def test_the_thinnest_reliable_slab_is_the_one_from_which_on_every_thicker_slab_held():
    ct = _domain("CT set", "CT", _slab(40, -0.18, empty=1), _slab(60, -0.08), _slab(90, -0.02), _slab(150, 0.0))
    assert ct.held_from_mm(0.05) == 90
    # a thin slab that happened to hold does not count while a thicker one failed
    dip = _domain("CT set", "CT", _slab(40, -0.01), _slab(60, -0.08), _slab(90, -0.02))
    assert dip.held_from_mm(0.05) == 90
    # an empty structure fails a slab whatever its Dice; nothing in view (None) is no failure
    assert _domain("x", "MR", _slab(40, -0.01, empty=1), _slab(60, None)).held_from_mm(0.05) == 60
    assert _domain("x", "MR", _slab(40, -0.01), _slab(60, -0.2)).held_from_mm(0.05) is None
    with pytest.raises(ValidationError, match="sorted"):
        _domain("x", "MR", _slab(60, 0.0), _slab(40, 0.0))


def test_of_two_datasets_of_one_modality_the_stricter_speaks():
    """bSSFP and LGE are both MR: an image cannot say which sequence it is."""
    limits = FieldOfViewLimits(domains=(_domain("bSSFP", "MR", _slab(40, -0.01), _slab(60, 0.0)),
                                        _domain("LGE", "MR", _slab(40, -0.09), _slab(60, -0.02))),
                               measured_by="test")
    assert limits.limiting_domain("MR").dataset == "LGE"
    assert limits.limiting_domain("CT") is None
    assert thin_view_warning(limits, "CT", 10.0, "k (slice)", "m") is None  # nothing measured on CT: no claim
    said = thin_view_warning(limits, "MR", 48.0, "k (slice)", "heart-model")
    assert said.startswith("The image covers only 48 mm along its k (slice) axis")
    assert "'heart-model'" in said and "(LGE, 3 cases" in said and "40 mm lost 0.090 Dice" in said
    assert "from 60 mm on it held the bar" in said
    assert thin_view_warning(limits, "MR", 60.0, "k (slice)", "m") is None
    never = FieldOfViewLimits(domains=(_domain("x", "CT", _slab(40, -0.3, empty=2), _slab(90, -0.1)),),
                              measured_by="test")
    said = thin_view_warning(never, "CT", 120.0, "k (slice)", "m")
    assert said is None  # thicker than anything measured: nothing known either way
    said = thin_view_warning(never, "CT", 70.0, "k (slice)", "m")
    assert "40 mm lost 0.300 Dice and left 2 structures empty; 90 mm lost 0.100 Dice" in said
    assert "missed the bar" in said and "up to 90 mm" in said


def test_a_scan_as_thick_as_the_benchmarks_slab_is_not_told_it_is_thinner(real_case):
    """The benchmark's "40 mm" slab keeps the slices whose centres lie within ±20 mm: four 9.99 mm
    slices, 39.96 mm. Seen live (choose-padding on bSSFP): that very slab was warned about, with an
    empty list of losses. A scan of as many slices of that spacing is what the benchmark measured."""
    limits = FieldOfViewLimits(domains=(_domain("bSSFP", "MR", _slab(40, -0.01), _slab(60, 0.0)),), measured_by="t")
    assert thin_view_warning(limits, "MR", 39.96, "k (slice)", "m", voxel_mm=9.99) is None
    assert covers_slab(53.9, 60, 7.7) and not covers_slab(46.2, 60, 7.7)  # 7 slices of 7.7 mm are a 60 mm slab
    assert not covers_slab(39.96, 40)  # a region of interest's box is not counted in slices
    said = thin_view_warning(limits, "MR", 30.0, "k (slice)", "m", voxel_mm=10.0)
    assert "nothing as thin was measured (the thinnest slab, 40 mm, held)" in said and ": ;" not in said
    # through the real slab perturbation of a real case: the benchmark's slab is as thick as itself
    image, label, _ = real_case("Dataset502", "chaos_01")
    for mm in (40, 60, 90):
        cut, _ = _slab_perturbation(mm).apply(read_volume(image), read_label_map(label), 0)
        extent, _, voxel = thinnest_view(cut.geometry, cut.shape)
        assert covers_slab(extent, mm, voxel), (mm, extent, voxel)
        fewest = int(mm // voxel)  # the fewest slices the benchmark's slab holds at this spacing
        assert covers_slab(fewest * voxel, mm, voxel) and not covers_slab((fewest - 1) * voxel, mm, voxel)
    better = models_holding_at(53.9, "MR", "abdomen", [SimpleNamespace(id="b", anatomy="abdomen", field_of_view=FieldOfViewLimits(
        domains=(_domain("MR set", "MR", _slab(40, -0.2), _slab(60, 0.0)),), measured_by="t"))], "a", voxel_mm=7.7)
    assert better == [("b", 60.0)]


def test_extent_is_physical_along_each_voxel_axis_and_cut_by_the_roi(real_case):
    image = read_volume(real_case("Dataset502", "chaos_01")[0])  # 256 × 256 × 37 at 1.25 × 1.25 × 7.7 mm
    extent, axis = thinnest_extent_mm(image.geometry, image.shape)
    assert extent == pytest.approx(image.shape[0] * image.geometry.spacing[2]) and axis == "k (slice)"
    assert extent == pytest.approx(37 * 7.7, abs=0.01)
    lo, hi = physical_bounds(image.geometry, image.shape)
    centre = (lo + hi) / 2
    roi = (centre - [15.0, 100.0, 100.0], centre + [15.0, 100.0, 100.0])  # 30 mm wide along L
    extent, axis = thinnest_extent_mm(image.geometry, image.shape, roi)
    assert extent == pytest.approx(30.0) and axis == "L (region of interest)"
    # an ROI reaching outside the image counts only where it overlaps the image
    outside = (np.array([lo[0] - 500.0, lo[1], lo[2]]), np.array([lo[0] + 20.0, hi[1], hi[2]]))
    assert thinnest_extent_mm(image.geometry, image.shape, outside)[0] == pytest.approx(20.0)


@pytest.fixture(scope="module")
def mr_case(real_case):
    image, label, _ = real_case("Dataset502", "chaos_01")
    return read_volume(image), read_label_map(label)


def _slab_perturbation(thickness: float) -> P.Perturbation:
    name = f"slab_{thickness:g}mm"
    return P.PERTURBATIONS[name]


def test_the_segmenter_warns_on_a_slab_thinner_than_the_card_held(mr_case):
    """The bundled CT model on a CHAOS T2 MR cut to slabs around the kidneys: thinner than the slab from
    which on its card says it held on MR, the result carries the warning; at or above it, none."""
    image, label = mr_case
    package = load_package(MODELS / "abdomen-ct-srcsm")
    domain = package.card.field_of_view.limiting_domain("MR")
    held = domain.held_from_mm(package.card.field_of_view.max_dice_loss)
    measured = [s.thickness_mm for s in domain.slabs]
    assert held is not None and held > measured[0], "the bundled CT model should have a thin slab it misses on MR"
    thin = max(t for t in measured if t < held)
    segmenter = Segmenter(package, device="cpu")
    thin_image, _ = _slab_perturbation(thin).apply(image, label, 0)
    thin_extent, axis = thinnest_extent_mm(thin_image.geometry, thin_image.shape)
    assert thin_extent < held and axis == "k (slice)"
    result = segmenter.segment(thin_image)
    warnings = [m for m in result.messages if m.startswith("The image covers only")]
    assert len(warnings) == 1, result.messages
    assert f"covers only {format_mm(thin_extent)} mm along its k (slice) axis" in warnings[0]
    assert format_mm(61.6) == "61.6" and format_mm(90.0) == "90" and format_mm(89.96) == "90"
    assert f"from {held:g} mm on it held the bar" in warnings[0] and domain.dataset in warnings[0]
    assert np.count_nonzero(result.labelmap.array) > 0  # a warning, not a refusal: the result is there
    # the decision travels with the result (front ends name a better model from it, never redo it)
    assert result.thin_view_mm == pytest.approx(thin_extent) and result.target_modality == "MR"
    thick_image, _ = _slab_perturbation(held).apply(image, label, 0)
    assert thinnest_extent_mm(thick_image.geometry, thick_image.shape)[0] >= held
    thick = segmenter.segment(thick_image)
    assert not any(m.startswith("The image covers only") for m in thick.messages)
    assert thick.thin_view_mm is None and thick.target_modality == "MR"
    assert not any(m.startswith("The image covers only") for m in segmenter.segment(image).messages)


def test_the_card_shows_its_field_of_view():
    card = load_package(MODELS / "abdomen-ct-srcsm").card
    text = model_card_text(card)
    assert "field of view: reliable (at most 0.05 Dice lost, nothing empty) on CT (Dataset501_AbdomenCT): slabs from" in \
        " ".join(text.split())
    assert "<b>Field of view</b>" in model_card_html(card)


@pytest.fixture(scope="module")
def measured_package(tmp_path_factory, shared_data):
    """A copy of the bundled MR model with its field of view measured anew on one CHAOS case (two slabs)."""
    work = tmp_path_factory.mktemp("fov")
    package = work / "abdomen-mr-srcsm"
    shutil.copytree(MODELS / "abdomen-mr-srcsm", package)
    card = json.loads((package / "model.json").read_text(encoding="utf-8"))
    card.pop("field_of_view", None)
    (package / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    run = work / "rob-mr"
    run_robustness(package, shared_data / "Dataset502_AbdomenMRT2", run, split="all", case_ids=["chaos_01"],
                   perturbations=["slab_40mm", "slab_90mm", "flip_k"], device="cpu", log=lambda m: None)
    return package, run


def test_robustness_write_card_records_the_slabs_it_measured(measured_package):
    package, run = measured_package
    before = (package / "model.json").read_text(encoding="utf-8")
    write_field_of_view(package, [run])
    after = (package / "model.json").read_text(encoding="utf-8")
    assert json.loads(after).keys() - json.loads(before).keys() == {"field_of_view"}
    limits = load_package(package).card.field_of_view
    (domain,) = limits.domains
    s = summarize(load_results([run])[0])
    assert (domain.dataset, domain.modality, domain.cases) == ("Dataset502_AbdomenMRT2", "MR", 1)
    assert [x.thickness_mm for x in domain.slabs] == [40.0, 90.0]  # flip_k is no slab
    for x, name in zip(domain.slabs, ("slab_40mm", "slab_90mm")):
        assert x.delta_dice == round(s[name]["dice"] - s[name]["dice_unperturbed"], 3)
        assert (x.empty, x.in_view) == (s[name]["empty"], s[name]["in_view"])
    assert "chaos_01" in limits.measured_by and "Dataset502_AbdomenMRT2" in limits.measured_by


def test_a_run_of_other_weights_or_without_slabs_is_refused(measured_package, tmp_path):
    package, run = measured_package
    result = load_results([run])[0]
    other = json.loads(json.dumps(result, default=float))
    other["meta"]["weights_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="measured other weights.*rerun"):
        field_of_view_limits([other], load_package(package).card.weights.sha256)
    no_slab = json.loads(json.dumps(result, default=float))
    no_slab["rows"] = [r for r in no_slab["rows"] if not r["perturbation"].startswith("slab_")]
    assert field_of_view_limits([no_slab]) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "robustness.json").write_text(json.dumps(no_slab), encoding="utf-8")
    before = (package / "model.json").read_bytes()
    with pytest.raises(ValueError, match="measured a slab"):
        write_field_of_view(package, [tmp_path / "run"])
    assert (package / "model.json").read_bytes() == before  # the card untouched


def test_srcsm_segment_reports_a_thin_view_to_the_user_and_the_module(tmp_path, mr_case):
    """``srcsm segment`` on a 40 mm slab of an MR with the bundled CT model: the warning is a warning
    event, and the ``done`` event (what the Slicer module shows) carries it."""
    image, label = mr_case
    slab, _ = _slab_perturbation(40).apply(image, label, 0)
    path = write_volume(slab, tmp_path / "slab.nii.gz")
    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "home"))
    env.pop("SRCSM_BUNDLED_MODELS", None)
    proc = srcsm("segment", path, tmp_path / "out.seg.nrrd", "--model", "abdomen-ct-srcsm", "--device", "cpu",
                 "--progress", "json", env=env, check_rc=0)
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    warnings = [e["message"] for e in events if e["event"] == "message" and e["level"] == "warning"]
    assert any(w.startswith("The image covers only") and "k (slice) axis" in w for w in warnings), warnings
    done = [e for e in events if e["event"] == "done"][0]
    assert any(w.startswith("The image covers only") for w in done["warnings"])
    assert (tmp_path / "out.seg.nrrd").is_file()


def test_another_model_that_held_at_this_thickness_is_named():
    from types import SimpleNamespace

    def card(model_id: str, anatomy: str, *slabs: SlabMeasurement) -> SimpleNamespace:
        fov = FieldOfViewLimits(domains=(_domain("MR set", "MR", *slabs),), measured_by="test")
        return SimpleNamespace(id=model_id, anatomy=anatomy, field_of_view=fov)

    cards = [card("weak", "abdomen", _slab(40, -0.2), _slab(60, -0.1), _slab(90, 0.0)),
             card("strong", "abdomen", _slab(40, -0.09), _slab(60, -0.02), _slab(90, 0.0)),
             card("strongest", "abdomen", _slab(40, -0.01), _slab(60, 0.0)),
             card("heart", "heart", _slab(40, 0.0)),
             SimpleNamespace(id="old", anatomy="abdomen", field_of_view=None)]
    assert models_holding_at(62.0, "MR", "abdomen", cards, "weak") == [("strongest", 40.0), ("strong", 60.0)]
    assert models_holding_at(45.0, "MR", "abdomen", cards, "weak") == [("strongest", 40.0)]
    assert models_holding_at(62.0, "CT", "abdomen", cards, "weak") == []  # nothing measured on CT


def test_srcsm_segment_names_the_model_that_holds_on_the_thinner_view(tmp_path, real_case):
    """A real slab between the two bundled abdomen models' thinnest reliable slabs on its modality (their
    cards since the 0.4.0 fine-tunes: on MR the MR model held from 40 mm, the CT model from 60; on CT the CT
    model from 60, the MR model from 90): the weaker model warns and names the stronger as the fix; the
    stronger gives no warning."""
    cards = [load_package(MODELS / m).card for m in ("abdomen-ct-srcsm", "abdomen-mr-srcsm")]
    cases = {"MR": ("Dataset502", "chaos_01"), "CT": ("Dataset501", "sabs_00")}
    for modality in ("MR", "CT"):
        held = {c.id: c.field_of_view.limiting_domain(modality).held_from_mm(c.field_of_view.max_dice_loss)
                for c in cards}
        strong, weak = sorted(cards, key=lambda c: held[c.id] or float("inf"))
        between = [t for t in (40, 60, 90, 150) if held[strong.id] is not None and held[strong.id] <= t
                   < (held[weak.id] or float("inf"))]
        if between:
            break
    assert between, f"the bundled abdomen models' slabs no longer differ on MR or CT: {held}"
    image_path, label_path, _ = real_case(*cases[modality])
    slab, _ = _slab_perturbation(between[0]).apply(read_volume(image_path), read_label_map(label_path), 0)
    path = write_volume(slab, tmp_path / "slab.nii.gz")
    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "home"))
    env.pop("SRCSM_BUNDLED_MODELS", None)
    said = {}
    for model in (weak.id, strong.id):
        proc = srcsm("segment", path, tmp_path / f"{model}.seg.nrrd", "--model", model, "--device", "cpu",
                     "--progress", "json", env=env, check_rc=0)
        events = [json.loads(line) for line in proc.stderr.splitlines()]
        said[model] = [e for e in events if e["event"] == "done"][0]["warnings"]
    assert any(w.startswith("The image covers only") for w in said[weak.id]), said[weak.id]
    fix = [w for w in said[weak.id] if "better-suited model" in w]
    assert len(fix) == 1, fix
    assert f"`--model {strong.id}` held it on {modality} slabs from {held[strong.id]:g} mm" in fix[0], fix
    assert not any(w.startswith("The image covers only") or "better-suited" in w for w in said[strong.id]), \
        said[strong.id]
