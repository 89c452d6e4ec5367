"""``python -m train release``: a finished run becomes a measured, staged model version, resumably, and
``--install`` swaps it into the bundled folder — on a real (tiny) trained run and real CT/MR cases."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil

import pytest

from model_fixtures import SHARED_DATA, make_subset_dataset
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.modelpackage import MODEL_JSON, load_package

from train.card_edit import set_card_fields
from train.robustness import load_results, summarize
from train.release import (Protocol, card_fingerprint, install_release, metric_key, plan_release,
                           run_release)


@pytest.fixture(scope="module")
def release_setup(tiny_model, tmp_path_factory):
    """The tiny model's run (CT, no test split), one real MR case as the other domain, and a bundled
    folder holding the run's earlier export as the previous version."""
    work = tmp_path_factory.mktemp("release")
    run_dir = tiny_model.parent / "run"
    mr = make_subset_dataset(work / "Dataset502_AbdomenMRT2", SHARED_DATA / "Dataset502_AbdomenMRT2", [], ["chaos_02"])
    bundled = work / "bundled"
    bundled.mkdir()
    shutil.copytree(tiny_model, bundled / "tiny-ct")
    plan = plan_release(run_dir, "0.0.2", mr, staging=work / "staging", bundled_dir=bundled,
                        robustness_cases=1, perturbations=["flip_i", "slab_60mm"], device="cpu")
    logs: list[str] = []
    summary = run_release(plan, log=logs.append)
    return plan, summary, logs, bundled


def test_plan_picks_the_protocols_before_anything_runs(release_setup):
    plan, *_ = release_setup
    assert plan.model_id == "tiny-ct" and plan.version == "0.0.2"
    # the tiny dataset has no test split: in-domain falls back to the validation split, source matching off
    assert (plan.in_domain.split, plan.in_domain.sm, plan.in_domain.cases) == ("val", "off", 1)
    assert (plan.cross_domain.dataset.modality, plan.cross_domain.split, plan.cross_domain.sm) == ("MR", "all", "both")
    assert plan.previous == plan.bundled_dir / "tiny-ct"


def test_release_measures_into_the_staged_card(release_setup):
    plan, summary, _, bundled = release_setup
    card = json.loads((plan.package / MODEL_JSON).read_text(encoding="utf-8"))
    assert card["version"] == "0.0.2" and card["id"] == "tiny-ct"
    assert "val" in card["postprocessing"]["chosen_by"] and card["inference"]["strategy"] in ("whole_grid", "sliding_window")
    # the padding of thin grids was chosen on slabs of the same validation cases, and written with its numbers
    padding = json.loads((plan.staging / "padding" / "choose-padding.json").read_text(encoding="utf-8"))
    assert padding["split"] == "val" and set(padding["scores"]) == {"constant", "replicate"}
    assert card["inference"]["padding_mode"] == padding["chosen"]["padding_mode"]
    assert card["inference"]["padding_chosen_by"].startswith("python -m train choose-padding on 1 Dataset501_AbdomenCT val")
    # metrics come from the evaluation summaries, under generated keys (the previous card had none)
    ind = json.loads((plan.staging / "eval" / "in_domain" / "summary.json").read_text(encoding="utf-8"))
    cross = json.loads((plan.staging / "eval" / "cross_domain" / "summary.json").read_text(encoding="utf-8"))
    assert ind["weights_sha256"] == card["weights"]["sha256"] == cross["weights_sha256"]
    m = card["metrics"]
    assert m["in_domain_dataset501_abdomenct_val1"]["without_source_matching"]["mean_dice"] == \
        round(ind["settings"]["without SM"]["mean"]["dice"], 3)
    assert "with_source_matching" not in m["in_domain_dataset501_abdomenct_val1"]
    cm = m["cross_domain_dataset502_abdomenmrt2_all1"]
    assert cm["cases"] == 1 and cm["with_source_matching"]["mean_dice"] == round(cross["settings"]["with SM"]["mean"]["dice"], 3)
    assert "python -m train release" in m["note"]
    # the previous version went through the same protocol, and the report puts it beside the new one
    prev = json.loads((plan.staging / "eval" / "previous_cross_domain" / "summary.json").read_text(encoding="utf-8"))
    assert prev["weights_sha256"] == json.loads((bundled / "tiny-ct" / MODEL_JSON).read_text(encoding="utf-8"))["weights"]["sha256"]
    on = summary["protocols"]["cross_domain"]["settings"]["on"]
    assert on["dice"] == cross["settings"]["with SM"]["mean"]["dice"]
    assert on["previous"] == prev["settings"]["with SM"]["mean"]["dice"]
    report = (plan.staging / "release.md").read_text(encoding="utf-8")
    assert f"{on['dice']:.3f}" in report and f"{on['previous']:.3f}" in report
    # robustness ran on the staged weights, in both domains, and the report states the bar
    for kind in ("in_domain", "cross_domain"):
        rob = json.loads((plan.staging / "robustness" / kind / "robustness.json").read_text(encoding="utf-8"))
        assert rob["meta"]["weights_sha256"] == card["weights"]["sha256"]
        assert {r["perturbation"] for r in rob["rows"]} == {"none", "flip_i", "slab_60mm"}
        assert kind in summary["robustness"]
        # the card's field of view is the slab's measurement, per dataset (the thin-view warning's data)
        s = summarize(load_results([plan.staging / "robustness" / kind])[0])["slab_60mm"]
        domain = next(d for d in card["field_of_view"]["domains"] if d["dataset"] == rob["meta"]["dataset"])
        assert domain["modality"] == rob["meta"]["target_modality"] and domain["cases"] == 1
        assert domain["slabs"] == [{"thickness_mm": 60.0, "delta_dice": round(s["dice"] - s["dice_unperturbed"], 3),
                                    "empty": s["empty"], "in_view": s["in_view"]}]
    assert len(card["field_of_view"]["domains"]) == 2
    assert load_package(plan.package).card.field_of_view.max_dice_loss == 0.05
    assert "the bar" in report
    # nothing was installed: the bundled package is still the previous version
    assert load_package(bundled / "tiny-ct").card.version == "0.0.1"


def test_rerun_keeps_what_was_measured_and_remeasures_what_a_changed_card_voids(release_setup):
    plan, summary, _, _ = release_setup
    # measured on another day: a rerun that keeps the evaluations keeps the day they were measured
    measured = datetime.datetime(2026, 1, 2, 12, tzinfo=datetime.timezone.utc).timestamp()
    for kind in ("in_domain", "cross_domain"):
        os.utime(plan.staging / "eval" / kind / "summary.json", (measured, measured))
    logs: list[str] = []
    again = run_release(plan, log=logs.append)
    assert again == summary
    note = json.loads((plan.package / MODEL_JSON).read_text(encoding="utf-8"))["metrics"]["note"]
    assert "python -m train release on 2026-01-02 on this package" in note, note
    assert all("kept" in line for line in logs if line.startswith("[release]") and "staged" not in line)
    # a different clean-up in the card changes what the evaluations measured: they run again
    before = card_fingerprint(plan.package)
    set_card_fields(plan.package, {"postprocessing": {"method": "keep_largest"}})
    assert card_fingerprint(plan.package) != before
    logs.clear()
    run_release(plan, log=logs.append)
    ran = [line for line in logs if line.startswith("[release]") and line.endswith("…")]
    assert "[release] evaluate in_domain …" in ran and "[release] robustness cross_domain …" in ran
    assert not any(line.startswith("[release] export") or line.startswith("[release] choose") for line in ran)
    ind = json.loads((plan.staging / "eval" / "in_domain" / "summary.json").read_text(encoding="utf-8"))
    assert ind["postprocessing"] == "keep-largest"
    # other robustness settings re-run the robustness steps only
    logs.clear()
    run_release(dataclasses.replace(plan, perturbations=["flip_k"]), log=logs.append)
    ran = [line for line in logs if line.startswith("[release]") and line.endswith("…")]
    assert ran == ["[release] robustness in_domain …", "[release] robustness cross_domain …"]
    rob = json.loads((plan.staging / "robustness" / "cross_domain" / "robustness.json").read_text(encoding="utf-8"))
    assert {r["perturbation"] for r in rob["rows"]} == {"none", "flip_k"}


def test_install_swaps_the_verified_package_in(release_setup):
    plan, _, _, bundled = release_setup
    # the release leaves the timing and the description to a person: the report says so, install refuses
    report = (plan.staging / "release.md").read_text(encoding="utf-8")
    assert "Left by hand before installing: the card's `performance`" in report and "`description`" in report
    with pytest.raises(InputError, match="still lacks `performance`.*and `description`"):
        install_release(plan, log=lambda m: None)
    assert load_package(bundled / "tiny-ct").card.version == "0.0.1"
    set_card_fields(plan.package, {"performance": {"cpu": "0.1 s for a BTCV CT (test)"},
                                   "description": "The tiny CT model, version 0.0.2 as measured by its release."})
    target = install_release(plan, log=lambda m: None)
    installed = load_package(target)
    assert installed.card.version == "0.0.2" and installed.card.metrics
    assert sorted(p.name for p in bundled.iterdir()) == ["tiny-ct"]  # no temporary or old folder left
    # a rerun after the install (to install again, or to mend the card) finds the release itself bundled:
    # the previous version's evaluations stay as measured, the report still compares against it
    previous_files = {kind: plan.staging / "eval" / f"previous_{kind}" / "summary.json"
                      for kind in ("in_domain", "cross_domain")}
    before = {kind: (f.read_bytes(), f.stat().st_mtime_ns) for kind, f in previous_files.items()}
    report_before = json.loads((plan.staging / "release.json").read_text(encoding="utf-8"))
    rerun = plan_release(plan.run_dir, "0.0.2", plan.cross_domain.dataset.root, staging=plan.staging,
                         bundled_dir=bundled, robustness_cases=1, perturbations=plan.perturbations,
                         device="cpu")
    assert rerun.previous is None and rerun.previous_version == "0.0.1"
    logs: list[str] = []
    again = run_release(rerun, log=logs.append)
    assert not any(line.startswith("[release] previous") and line.endswith("…") for line in logs), logs
    assert any("0.0.1's evaluations are kept" in line for line in logs)
    assert {kind: (f.read_bytes(), f.stat().st_mtime_ns) for kind, f in previous_files.items()} == before
    assert again["previous_version"] == "0.0.1"
    settings_before = report_before["protocols"]["cross_domain"]["settings"]
    assert again["protocols"]["cross_domain"]["settings"] == settings_before
    staged_card = json.loads((plan.package / MODEL_JSON).read_text(encoding="utf-8"))
    assert set(staged_card["metrics"]) == set(installed.card.metrics)
    # a staged card whose version does not match the plan is refused, and the bundled copy stays
    card = (plan.package / MODEL_JSON).read_text(encoding="utf-8")
    (plan.package / MODEL_JSON).write_text(card.replace('"0.0.2"', '"0.0.3"'), encoding="utf-8")
    with pytest.raises(InputError, match="rerun the release"):
        install_release(plan, log=lambda m: None)
    assert load_package(target).card.version == "0.0.2"


def test_unfinished_run_and_wrong_other_domain_are_refused(release_setup, tmp_path):
    plan, *_ = release_setup
    run = tmp_path / "run"
    shutil.copytree(plan.run_dir, run)
    state = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))
    state["iteration"] = 100
    (run / "checkpoint.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(InputError, match=r"iteration 100 of 300.*--allow-unfinished"):
        plan_release(run, "0.0.9", plan.cross_domain.dataset.root, bundled_dir=tmp_path)
    assert plan_release(run, "0.0.9", plan.cross_domain.dataset.root, bundled_dir=tmp_path,
                        allow_unfinished=True).previous is None
    with pytest.raises(InputError, match="the dataset the model was trained on"):
        plan_release(plan.run_dir, "0.0.9", plan.own.root, bundled_dir=tmp_path)
    with pytest.raises(InputError, match=r"--perturbations: unknown perturbation\(s\) \['slab_6mm'\]; choose from"):
        plan_release(plan.run_dir, "0.0.9", plan.cross_domain.dataset.root, bundled_dir=tmp_path,
                     perturbations=["flip_i", "slab_6mm"])
    with pytest.raises(InputError, match="has no split 'test'"):
        plan_release(plan.run_dir, "0.0.9", plan.cross_domain.dataset.root, bundled_dir=tmp_path, cross_split="test")


def test_metric_key_keeps_a_protocols_history_under_one_key(release_setup):
    plan, *_ = release_setup
    proto = Protocol("cross_domain", plan.cross_domain.dataset, "all", "both")
    same = {"cross_domain_mr_t2_chaos_all1": {"dataset": "Dataset502_AbdomenMRT2", "split": "all", "cases": 1}}
    assert metric_key(proto, same) == "cross_domain_mr_t2_chaos_all1"
    other_count = {"cross_domain_mr_t2_chaos_all20": {"dataset": "Dataset502_AbdomenMRT2", "split": "all", "cases": 20}}
    assert metric_key(proto, other_count) == "cross_domain_dataset502_abdomenmrt2_all1"
    assert metric_key(Protocol("in_domain", plan.cross_domain.dataset, "all", "off"), same) == \
        "in_domain_dataset502_abdomenmrt2_all1"
