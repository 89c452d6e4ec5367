"""train/: dataset validation, recipes, smoke training → export → segment → evaluate, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.modelpackage import load_package

from model_fixtures import SHARED_DATA, make_subset_dataset
from train.config import TrainConfig, load_config
from train.datasets import load_dataset, validate_dataset

REPO = Path(__file__).resolve().parents[1]


def _subset(tmp_path, name="Dataset501_AbdomenCT", train=("sabs_09", "sabs_10"), val=("sabs_06",)) -> Path:
    return make_subset_dataset(tmp_path / name, SHARED_DATA / name, list(train), list(val))


def _tiny_config(tmp_path, dataset: Path, **kw) -> TrainConfig:
    base = dict(
        dataset=str(dataset), model={"id": "t", "name": "t", "anatomy": "abdomen"},
        spacing=(9.6, 9.6, 9.6), patch_size=(16, 16, 16),
        network={"architecture": "srcsm_unet", "parameters": {"channels": [4, 8], "dropout": 0.0}},
        augmentation="src", iterations=12, batch_size=1, learning_rate=1e-3, val_every=0,
        checkpoint_every=6, log_every=1, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
        precision="fp32", seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv", encoding="utf-8") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


# ------------------------------------------------------------------------------- validation
def test_recipes_are_valid():
    recipes = sorted((REPO / "train" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for r in recipes:
        cfg = load_config(r)
        assert Path(REPO / cfg.dataset).exists() or Path(cfg.dataset).exists(), r


def test_dataset_loads_with_splits(shared_data):
    ds = load_dataset(shared_data / "Dataset501_AbdomenCT")
    assert ds.modality == "CT" and len(ds.cases) == 30
    assert len(ds.split("train")) == 21 and len(ds.split("val")) == 3
    assert ds.label_values == {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
    with pytest.raises(InputError, match="no split 'fold9'"):
        ds.split("fold9")


def _broken_dataset(tmp_path, mutate) -> Path:
    root = _subset(tmp_path, train=("sabs_09",), val=())
    lab_link = root / "labelsTr" / "sabs_09.nii.gz"
    label = sitk.ReadImage(str(lab_link))
    lab_link.unlink()
    sitk.WriteImage(mutate(label), str(lab_link))
    return root


@pytest.mark.parametrize("problem,pattern", [
    ("shape", "shape"), ("geometry", "geometry differ"), ("undeclared", "not declared"), ("empty", "empty"),
])
def test_dataset_validation_names_the_case(tmp_path, problem, pattern):
    def mutate(label):
        arr = sitk.GetArrayFromImage(label)
        if problem == "shape":
            out = sitk.GetImageFromArray(arr[:-1])
            out.CopyInformation(label[:, :, :-1])
            return out
        if problem == "geometry":
            label.SetOrigin([o + 5 for o in label.GetOrigin()])
            return label
        arr = arr.copy()
        if problem == "undeclared":
            arr[arr == 1] = 9
        else:
            arr[:] = 0
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(label)
        return out

    root = _broken_dataset(tmp_path, mutate)
    with pytest.raises(InputError, match=pattern) as info:
        validate_dataset(load_dataset(root))
    assert "sabs_09" in str(info.value)


def test_missing_label_file(tmp_path):
    root = _subset(tmp_path, train=("sabs_09",), val=())
    (root / "labelsTr" / "sabs_09.nii.gz").unlink()
    with pytest.raises(InputError, match="sabs_09"):
        load_dataset(root)


def test_patch_size_must_fit_the_network(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        _tiny_config(tmp_path, tmp_path, patch_size=(20, 16, 16), network={
            "architecture": "srcsm_unet", "parameters": {"channels": [4, 8, 16, 32]}})


# ----------------------------------------------------------------------------- smoke + resume
def test_smoke_train_export_segment_evaluate(tiny_model, tmp_path, shared_data):
    """The issue's CI smoke test: trained with SRC on two real CT cases (tiny_model), exported, reloaded
    through the core library, applied to a real MR case and evaluated, with and without SM."""
    from train.evaluate import evaluate_model

    pkg = load_package(tiny_model)
    assert pkg.card.provenance.augmentation == "src"
    assert pkg.card.training_data[0].cases == 2
    run_log = (tiny_model.parent / "run" / "log.csv").read_text(encoding="utf-8")
    assert "val_dice_mean" in run_log  # validation Dice ran
    assert (tiny_model.parent / "run" / "config.json").is_file()  # full configuration recorded
    mr = make_subset_dataset(tmp_path / "Dataset502_AbdomenMRT2", shared_data / "Dataset502_AbdomenMRT2",
                             ["chaos_13"], ["chaos_01"])
    summary = evaluate_model(tiny_model, mr, tmp_path / "eval", split="val", device="cpu", landmark=True,
                             log=lambda m: None)
    assert set(summary["settings"]) == {"with SM", "without SM", "with SM, landmark ROI"}
    for name in ("metrics.csv", "summary.csv", "summary.md", "boxplot_dice.png", "summary.json"):
        assert (tmp_path / "eval" / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv", encoding="utf-8")))
    assert len(rows) == 3 * 4  # three settings × four labels × one case
    pred = read_volume(tmp_path / "eval" / "predictions" / "with_sm" / "chaos_01.nii.gz")
    assert pred.geometry.almost_equal(read_volume(mr / "imagesTr" / "chaos_01_0000.nii.gz").geometry, 1e-5)

    # the measured numbers reach the model card without being typed: card-metrics → export --metrics
    from train.__main__ import main as train_main

    assert train_main(["card-metrics", f"cross_domain_mr={tmp_path / 'eval'}", "--note", "tiny budget",
                       "--out", str(tmp_path / "metrics.json")]) == 0
    assert train_main(["export", str(tiny_model.parent / "run"), str(tmp_path / "pkg"),
                       "--metrics", str(tmp_path / "metrics.json")]) == 0
    card = load_package(tmp_path / "pkg").card.metrics
    with_sm = summary["settings"]["with SM"]
    assert card["note"] == "tiny budget" and card["cross_domain_mr"]["cases"] == 1
    assert card["cross_domain_mr"]["with_source_matching"]["mean_dice"] == round(with_sm["mean"]["dice"], 3)
    assert card["cross_domain_mr"]["with_source_matching_landmark_roi"]["dice_per_label"]["spleen"] == round(
        summary["settings"]["with SM, landmark ROI"]["4"]["dice"], 3)


def test_resume_continues_exactly(tmp_path):
    from train.trainer import Trainer

    ds = _subset(tmp_path)
    full = _tiny_config(tmp_path, ds, output_dir=str(tmp_path / "full"))
    Trainer(full, log=lambda m: None).fit()
    part = _tiny_config(tmp_path, ds, output_dir=str(tmp_path / "part"))
    Trainer(part, log=lambda m: None).fit(until_iteration=6)
    state = json.loads((tmp_path / "part" / "checkpoint.json").read_text(encoding="utf-8"))
    assert state["iteration"] == 6
    Trainer(part, resume=True, log=lambda m: None).fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_drops_log_rows_written_after_the_checkpoint(tmp_path):
    """A session killed between two checkpoints has logged steps its resume redoes: the log must hold
    each iteration once, with the values of the resumed run."""
    from train.trainer import Trainer

    ds = _subset(tmp_path)
    full = _tiny_config(tmp_path, ds, output_dir=str(tmp_path / "full"))
    Trainer(full, log=lambda m: None).fit()
    part = _tiny_config(tmp_path, ds, output_dir=str(tmp_path / "part"))
    Trainer(part, log=lambda m: None).fit(until_iteration=6)
    with open(tmp_path / "part" / "log.csv", "a", encoding="utf-8") as f:  # steps 7, 8 logged, then killed
        f.write("7,0.1,0.99,0.99,1.0,0.0\n8,0.1,0.98,0.98,1.0,0.0\n")
    said: list[str] = []
    Trainer(part, resume=True, log=said.append).fit()
    with open(tmp_path / "part" / "log.csv", encoding="utf-8") as f:
        iterations = [int(r["iteration"]) for r in csv.DictReader(f)]
    assert iterations == list(range(1, 13))
    np.testing.assert_allclose(_losses(tmp_path / "part"), _losses(tmp_path / "full"), rtol=1e-4, atol=1e-5)
    assert any("dropped 2 row(s)" in m for m in said)


def test_a_run_whose_steps_all_fail_stops_and_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    """Weights blown up to ±1e30 give a non-finite loss at every step: the trainer must stop with an
    error that names the cause and the fix instead of burning hours of skipped steps."""
    import train.trainer as trainer_mod
    from train.trainer import Trainer, TrainingStalledError, load_checkpoint

    monkeypatch.setattr(trainer_mod, "MAX_CONSECUTIVE_SKIPS", 4)
    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=40, checkpoint_every=1, learning_rate=1e30)
    said: list[str] = []
    with pytest.raises(TrainingStalledError, match="non-finite loss or gradient.*resume with --resume"):
        Trainer(cfg, log=said.append).fit()
    with open(tmp_path / "run" / "log.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["skipped"]) == 1.0
    assert any("were skipped" in m for m in said)
    saved = load_checkpoint(tmp_path / "run")[1]["iteration"]
    assert saved == int(rows[-1]["iteration"]) and saved < 40  # stopped at once, nothing after the last good save


def test_sigterm_writes_a_checkpoint_at_the_current_iteration_and_resume_continues(tmp_path):
    """A session that ends (SIGTERM) or a user's Ctrl-C must not lose the steps since the last
    checkpoint: the trainer finishes the step, checkpoints there, exits with 130, and resumes from it."""
    import signal
    import time

    from train.trainer import Trainer, load_checkpoint

    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=100_000, checkpoint_every=100_000)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(cfg.model_dump_json(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "train", "fit", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    log = tmp_path / "run" / "log.csv"
    deadline = time.monotonic() + 300
    while (not log.is_file() or len(log.read_text(encoding="utf-8").splitlines()) < 4) and proc.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and "resume with --resume" in err
    with open(log, encoding="utf-8") as f:
        logged = [int(r["iteration"]) for r in csv.DictReader(f)]
    saved = load_checkpoint(tmp_path / "run")[1]["iteration"]
    assert saved == logged[-1] >= 3  # checkpointed at the step it stopped on, not at the last multiple
    result = Trainer(cfg.model_copy(update={"iterations": saved + 2}), resume=True, log=lambda m: None).fit()
    assert result["iteration"] == saved + 2


def test_torn_checkpoint_pair_is_refused_not_resumed(tmp_path):
    """A session that ends between writing the weights and the state must not resume a mixed pair."""
    from train.trainer import CHECKPOINT_STATE, Trainer, load_checkpoint

    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=4, checkpoint_every=2)
    Trainer(cfg, log=lambda m: None).fit(until_iteration=2)
    run = tmp_path / "run"
    kept = (run / CHECKPOINT_STATE).read_text(encoding="utf-8")
    Trainer(cfg, resume=True, log=lambda m: None).fit()  # iteration 4: weights and state agree
    assert load_checkpoint(run)[1]["iteration"] == 4
    assert not list(run.glob(".*.partial"))  # no temporaries left behind
    (run / CHECKPOINT_STATE).write_text(kept, encoding="utf-8")  # state of 2 beside weights of 4
    with pytest.raises(ValueError, match="iteration 4 but checkpoint.json says 2"):
        Trainer(cfg, resume=True, log=lambda m: None).fit()


def test_time_limit_checkpoints_and_stops(tmp_path):
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=10_000, checkpoint_every=10_000)
    result = Trainer(cfg, log=lambda m: None).fit(time_limit_s=3)
    assert 0 < result["iteration"] < 10_000
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text(encoding="utf-8"))["iteration"] == result["iteration"]


@pytest.mark.parametrize("augmentation", ["none", "src_hard", "rcnet_global", "randconv", "gin", "gin_ipa"])
def test_every_augmentation_trains(tmp_path, augmentation):
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, _subset(tmp_path), augmentation=augmentation, iterations=3, checkpoint_every=3)
    result = Trainer(cfg, log=lambda m: None).fit()
    assert result["iteration"] == 3
    assert all(np.isfinite(_losses(tmp_path / "run")))


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with two CPU processes (gloo, batch 1 each) vs. one process with batch 2: both see two
    patches per step; the loss curves must have the same shape (both fall, similar level)."""
    ds = _subset(tmp_path, train=("sabs_09", "sabs_10", "sabs_11"), val=())
    # a patch covering the whole abdomen at 9.6 mm, so every label is present and GDL gives a signal
    common = ["--set", "iterations=60", "--set", "log_every=5", "--set", "checkpoint_every=60",
              "--set", "augmentation=none", "--set", "learning_rate=3e-3"]
    cfg_path = tmp_path / "cfg.json"
    cfg = _tiny_config(tmp_path, ds, val_split=None, patch_size=(32, 32, 32), network={
        "architecture": "srcsm_unet", "parameters": {"channels": [8, 16], "dropout": 0.0}}).model_dump(mode="json")
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "train", "fit", str(cfg_path), *common, "--set", "batch_size=2",
                          "--set", f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "train", "fit", str(cfg_path), *common, "--set", "batch_size=1",
                          "--set", f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint.json").read_text(encoding="utf-8"))
    assert state["world_size"] == 2 and state["iteration"] == 60
    assert len(state["numpy_rng"]) == 2  # both ranks' sampling streams are checkpointed
    a, b = np.array(_losses(tmp_path / "one")), np.array(_losses(tmp_path / "two"))
    assert len(a) == len(b) == 12
    for curve in (a, b):
        assert curve[-4:].mean() < curve[:2].mean() - 0.01  # both learn
    assert abs(a[-4:].mean() - b[-4:].mean()) < 0.05  # and end at a similar level


def test_ablation_plan_and_table(tmp_path, monkeypatch):
    """The ablation plan covers every protocol × method plus in-domain references at one budget per
    protocol; the table reports finished evaluations, the best setting's per-organ Dice and a figure,
    and marks the rest as not finished or not measurable."""
    from train import ablation

    runs = ablation.plan()
    assert len(runs) == sum(len(p.methods) + 1 for p in ablation.PROTOCOLS)
    assert {p.methods for p in ablation.PROTOCOLS} == {ablation.METHODS, ("none", "src")}
    assert len({r.name for r in runs}) == len(runs)
    for r in runs:
        assert (ablation.DATA / r.protocol.source).is_dir() and r.eval_dataset.is_dir()
        if not r.in_domain:
            assert r.iterations == r.protocol.iterations and r.config().augmentation == r.method
    # the in-domain reference of CT→MR is trained on MR's train split with the MR→CT recipe and budget
    ct2mr_in = next(r for r in runs if r.name == "ct2mr-indomain")
    cfg = ct2mr_in.config()
    assert Path(cfg.dataset).name == "Dataset502_AbdomenMRT2" and cfg.iterations == 3000 and cfg.train_split == "train"
    monkeypatch.setattr(ablation.Run, "eval_dir", property(lambda self: tmp_path / "eval" / self.name))
    monkeypatch.setattr(ablation.Run, "run_dir", property(lambda self: tmp_path / "runs" / self.name))
    monkeypatch.setattr(ablation.Run, "result_file", property(lambda self: tmp_path / "results" / f"{self.name}.json"))
    organs = {"1": {"name": "liver", "dice": 0.75}, "2": {"name": "spleen", "dice": 0.25}}
    for run, (dw, do), prov in ((runs[0], (0.5, 0.25), {"kind": "trained by the plan"}),
                                (runs[4], (0.625, 0.375), {"kind": "adopted package", "package": "zoo-ct",
                                                           "version": "0.1.0", "note": "from the zoo"})):
        ablation.record(run, {"cases": 20, "settings": {
            "with SM": dict(organs, mean={"dice": dw, "assd": 7.25}),
            "without SM": dict(organs, mean={"dice": do, "assd": 9.0})}}, run.iterations, prov)
    # an evaluation that was never recorded does not count (only records outlive the machine)
    runs[1].eval_dir.mkdir(parents=True)
    (runs[1].eval_dir / "summary.json").write_text('{"cases": 1, "settings": {}}', encoding="utf-8")
    # a run stopped mid-way (a session ended) says where it resumes
    runs[2].run_dir.mkdir(parents=True)
    (runs[2].run_dir / "checkpoint.json").write_text('{"iteration": 600}', encoding="utf-8")
    # a run that diverged is abandoned with a reason; the table states it with where training stood
    runs[3].run_dir.mkdir(parents=True)
    (runs[3].run_dir / "checkpoint.json").write_text('{"iteration": 1015}', encoding="utf-8")
    (runs[3].run_dir / "log.csv").write_text(
        "iteration,loss,grad_norm,val_dice_mean\n100,0.98,0.03,\n200,0.95,0.05,\n1000,0.81,2.9e12,0.004\n"
        "1010,0.85,3.1e12,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="give the reason"):
        ablation.abandon(runs[3], " ")
    ablation.abandon(runs[3], "diverged")
    with pytest.raises(ValueError, match="already records the cell"):
        ablation.abandon(runs[3], "diverged")
    assert ablation.advance(runs[3], None, "cpu")  # the plan no longer trains it
    text = ablation.table(tmp_path / "ablation.md").read_text(encoding="utf-8")
    seed, why = ablation.RESEEDED[runs[2].name]  # ct2mr-randconv: its rerun says why it is rerun
    assert (f"| ct2mr | {runs[2].label} | 4000 | 600 | not finished (training, resumes from its checkpoint at "
            f"iteration 600; rerun with seed {seed}: {why}) |") in text
    assert (f"| ct2mr | {runs[3].label} | 4000 | 1015 | not measured: diverged (training stopped: validation "
            f"mean Dice 0.004 at iteration 1000; gradient norm 0.04 (median of iterations ≤ 200), 3.1e+12 at "
            f"iteration 1010; loss 0.850 at iteration 1010) |") in text
    assert text.count("not finished (not started") == len(runs) - 6  # some say "; rerun with seed …"
    assert "| ct2mr | none | 4000 | 4000 | 0.500 | 0.250 | 7.25 | 9.00 | trained by the plan |" in text
    assert "| ct2mr | src | 4000 | 4000 | 0.625 | 0.375 | 7.25 | 9.00 | zoo package `zoo-ct` 0.1.0 (1) |" in text
    assert "1. ct2mr-src: from the zoo" in text
    assert "**ct2mr**: src with SM (20 cases), mean 0.625: liver 0.750, spleen 0.250" in text
    assert "SLAug (AAAI 2023, 2D) 88.6" in text
    assert text.count("not finished") == len(runs) - 5
    # LGE has no training split: no in-domain LGE reference (v1 and v2 protocols)
    assert text.count("not measurable") == 2
    png = tmp_path / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(ablation.png)" in text


def test_a_protocol_fixes_its_loss_whatever_its_recipe_says():
    """The recorded cells were trained with the loss their protocol fixes (CT → MR and bSSFP → LGE: GDL, MR →
    CT: GDL + CE); a recipe improved for users later must not change it. An in-domain reference trains with
    the recipe — and the fixed settings — of the reverse protocol, whose SRC model it is."""
    import dataclasses

    from train import ablation

    measurable = [r for r in ablation.plan() if ablation._unavailable(r) is None]
    assert {r.name: r.config("cpu").loss for r in measurable} == \
        {r.name: dict((r.protocol.reverse if r.in_domain else r.protocol).fixed)["loss"] for r in measurable}
    assert ablation.find("mr2ct-indomain").config("cpu").loss == "gdl" == ablation.find("ct2mr-src").config("cpu").loss
    ct2mr = ablation.find("ct2mr-src").protocol
    other = ablation.Run("ct2mr-src", dataclasses.replace(ct2mr, fixed=(("loss", "gdl_ce"), ("seed", 7))), "src")
    cfg = other.config("cpu")
    assert (cfg.loss, cfg.seed, cfg.augmentation) == ("gdl_ce", 7, "src")


def test_reseeded_cells_train_with_their_own_seed():
    """A cell rerun after a collapsed first attempt trains with its own seed, everything else being the
    protocol's recipe; every other cell keeps the recipe's seed (equal settings within a protocol)."""
    from train import ablation

    assert ablation.RESEEDED, "the reseeded cells are listed"
    for name, (seed, why) in ablation.RESEEDED.items():
        run = ablation.find(name)
        cfg, twin = run.config("cpu"), ablation.find(f"{run.protocol.name}-src").config("cpu")
        assert cfg.seed == seed != twin.seed and ("collapsed" in why or "diverged" in why)
        assert cfg.model_dump(exclude={"seed", "augmentation", "output_dir", "model"}) == \
            twin.model_dump(exclude={"seed", "augmentation", "output_dir", "model"})
    assert ablation._source_text({"kind": "trained by the plan", "seed": 1}) == "trained by the plan, seed 1"
    assert ablation._source_text({"kind": "adopted package", "package": "p", "version": "0.1.0", "seed": 2}) == \
        "zoo package `p` 0.1.0, seed 2"


def test_committed_ablation_records_are_cells_of_the_plan():
    """Every committed record (docs/ablation-results) is a measurable cell of the plan at its budget, with
    both SM settings measured on the protocol's whole test set and a stated provenance."""
    from train import ablation

    files = sorted(ablation.RESULTS.glob("*.json"))
    assert files, "the measured cells must be recorded"
    cases = {"ct2mr": 20, "mr2ct": 30, "bssfp2lge": 40}
    for f in files:
        rec = json.loads(f.read_text(encoding="utf-8"))
        run = ablation.find(rec["cell"])
        assert f.name == f"{run.name}.json" and ablation._unavailable(run) is None
        if rec["summary"] is None:  # not measured: a stated reason and where its training stood
            assert rec["provenance"]["kind"] == "not measured" and rec["provenance"]["reason"], f.name
            assert "at iteration" in rec["provenance"]["training"] and 0 < rec["iterations"] < run.iterations
            continue
        assert rec["budget"] == rec["iterations"] == run.iterations, f.name
        assert rec["provenance"]["kind"] in ("trained by the plan", "adopted run", "adopted package", "recovered")
        summary = rec["summary"]
        assert summary["dataset"] == run.eval_dataset.name
        task = run.protocol.task or run.protocol.name
        expected = 6 if run.name.startswith("mr2ct") and run.name.endswith("-indomain") else \
            4 if run.name.startswith("ct2mr") and run.name.endswith("-indomain") else cases[task]
        assert summary["cases"] == expected, f.name
        for setting in ("with SM", "without SM"):
            assert 0.0 < summary["settings"][setting]["mean"]["dice"] < 1.0, f.name


def test_ablation_advance_trains_evaluates_and_records(tmp_path, monkeypatch, shared_data):
    """``advance`` trains a cell to its budget, exports, evaluates and writes the committed record; a
    recorded cell is done; the cell trained identically (its twin) is evaluated without retraining; a
    package stands in for a cell only when its card says it is that cell."""
    from train import ablation
    from train.config import TrainConfig

    cell = ablation.find("ct2mr-src")
    subset = make_subset_dataset(tmp_path / "Dataset501_AbdomenCT", shared_data / "Dataset501_AbdomenCT",
                                 ["sabs_09"], ["sabs_06"])
    target = make_subset_dataset(tmp_path / "Dataset502_AbdomenMRT2", shared_data / "Dataset502_AbdomenMRT2",
                                 [], ["chaos_01"])
    cfg = TrainConfig(dataset=str(subset), model={"id": "ablation-ct2mr-src", "name": "t", "anatomy": "abdomen"},
                      spacing=(9.6, 9.6, 9.6), patch_size=(32, 32, 32), augmentation="src",
                      network={"architecture": "srcsm_unet", "parameters": {"channels": [8, 16, 32], "dropout": 0.0}},
                      iterations=4, val_every=4, checkpoint_every=4, log_every=1, num_threads=2,
                      cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs" / cell.name))
    monkeypatch.setattr(ablation.Run, "config",
                        lambda self, device="auto": cfg.model_copy(update={
                            "device": device, "augmentation": self.method, "seed": self.overrides().get("seed", 0),
                            "output_dir": str(self.run_dir)}))
    monkeypatch.setattr(ablation.Run, "iterations", property(lambda self: 4))
    monkeypatch.setattr(ablation.Run, "run_dir", property(lambda self: tmp_path / "runs" / self.name))
    monkeypatch.setattr(ablation.Run, "eval_dir", property(lambda self: tmp_path / "eval" / self.name))
    monkeypatch.setattr(ablation.Run, "eval_dataset", property(lambda self: target))
    monkeypatch.setattr(ablation.Run, "eval_split", property(lambda self: "all"))
    monkeypatch.setattr(ablation.Run, "result_file", property(lambda self: tmp_path / "results" / f"{self.name}.json"))

    assert ablation.advance(cell, None, "cpu")
    rec = ablation.result(cell)
    assert rec["iterations"] == rec["budget"] == 4 and rec["provenance"]["kind"] == "trained by the plan"
    assert "seed" not in rec["provenance"]
    assert rec["summary"]["cases"] == 1 and set(rec["summary"]["settings"]) == {"with SM", "without SM"}
    stamp = (cell.run_dir / "checkpoint.safetensors").stat().st_mtime_ns
    assert ablation.advance(cell, None, "cpu")  # recorded: nothing is retrained
    assert (cell.run_dir / "checkpoint.safetensors").stat().st_mtime_ns == stamp

    # an evaluation of other weights (left by an earlier model of the cell) is never recorded for this one
    summary_file = cell.eval_dir / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    sha = load_package(cell.package_dir).card.weights.sha256
    assert summary["weights_sha256"] == rec["summary"]["weights_sha256"] == sha
    summary_file.write_text(json.dumps(dict(summary, weights_sha256="0" * 64, cases=99)), encoding="utf-8")
    cell.result_file.unlink()
    assert ablation.advance(cell, None, "cpu")
    assert ablation.result(cell)["summary"]["cases"] == 1
    assert json.loads(summary_file.read_text(encoding="utf-8"))["weights_sha256"] == sha

    twin = ablation.find("mr2ct-indomain")  # the same model (here: same tiny config), another test set
    assert ablation.twin(cell).name == twin.name and ablation.twin(twin).name == cell.name
    assert ablation.advance(twin, None, "cpu")
    assert not twin.run_dir.exists()  # nothing retrained
    shared = ablation.result(twin)
    assert shared["provenance"]["shared_with"] == "ct2mr-src" and shared["iterations"] == 4

    with pytest.raises(ValueError, match="already records the cell"):
        ablation.adopt_package(cell, cell.package_dir, device="cpu")
    cell.result_file.unlink()
    other = ablation.find("ct2mr-none")  # same package, other method: refused before any evaluation
    with pytest.raises(ValueError, match="augmentation: run has 'src', the plan needs 'none'"):
        ablation.adopt_package(other, cell.package_dir, device="cpu")
    assert not other.result_file.exists()
    path = ablation.adopt_package(cell, cell.package_dir, device="cpu")
    rec = json.loads(path.read_text(encoding="utf-8"))
    assert rec["provenance"]["kind"] == "adopted package" and rec["provenance"]["package"] == f"{cell.name}-it4"  # export names a package after its run
    assert rec["summary"]["cases"] == 1

    # a cell whose first attempt collapsed trains with its own seed, and its record says why
    reseeded = ablation.find("ct2mr-randconv")
    seed, why = ablation.RESEEDED[reseeded.name]
    assert ablation.advance(reseeded, None, "cpu")
    assert json.loads((reseeded.run_dir / "config.json").read_text(encoding="utf-8"))["seed"] == seed
    rec = ablation.result(reseeded)
    assert rec["provenance"]["seed"] == seed and f"Trained with seed {seed}: {why}." in rec["provenance"]["note"]
    assert f"{reseeded.name}: " in ablation.table(tmp_path / "ablation.md", figure=False).read_text(encoding="utf-8")


def test_bundled_packages_stand_in_only_for_their_own_cells(tmp_path):
    """The zoo packages' cards carry their training configuration: the cardiac model (recipe v2, since
    0.3.0) is its v2 SRC cell and not the v1 one; the CT and MR models since 0.4.0 are fine-tunes of their
    0.3.0 (recipe v3 from its weights), no cell at all — each cell keeps 0.3.0's recorded evaluation, of the
    very weights 0.4.0 started from. A package of the optimiser's weights (as MR 0.2.0 was: objective
    changed mid-run) is refused."""
    from train import ablation

    models = REPO / "Resources" / "Models"
    for cell, v1, model in (("ct2mr-v2-src", "ct2mr-src", "abdomen-ct-srcsm"),
                            ("mr2ct-v2-src", "mr2ct-src", "abdomen-mr-srcsm")):
        package = models / model
        with pytest.raises(ValueError, match=rf"not the ablation cell {cell}:[\s\S]*init_weights: the run starts from"):
            ablation.check_package(ablation.find(cell), package)
        with pytest.raises(ValueError, match="iterations"):
            ablation.check_package(ablation.find(v1), package)
        recorded = ablation.result(ablation.find(cell))["provenance"]
        started_from = load_package(package).card.provenance.config["init_weights_from"]
        assert (recorded["kind"], recorded["package"], recorded["version"]) == ("adopted package", model, "0.3.0")
        assert (started_from["id"], started_from["version"]) == (model, "0.3.0")
        assert started_from["weights_sha256"] == recorded["weights_sha256"] != load_package(package).card.weights.sha256
    heart = ablation.check_package(ablation.find("bssfp2lge-v2-src"), models / "cardiac-bssfp-srcsm")
    assert heart.id == "cardiac-bssfp-srcsm"
    with pytest.raises(ValueError, match="iterations"):
        ablation.check_package(ablation.find("bssfp2lge-src"), models / "cardiac-bssfp-srcsm")
    raw = tmp_path / "cardiac-bssfp-srcsm"
    shutil.copytree(models / "cardiac-bssfp-srcsm", raw)
    card = json.loads((raw / "model.json").read_text(encoding="utf-8"))
    card["provenance"]["config"]["export_weights"] = "raw"
    (raw / "model.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    with pytest.raises(ValueError, match="'raw' weights"):
        ablation.check_package(ablation.find("bssfp2lge-v2-src"), raw)
    with pytest.raises(ValueError, match="dataset: run trained on Dataset501_AbdomenCT"):
        ablation.check_package(ablation.find("bssfp2lge-src"), models / "abdomen-ct-srcsm")


def test_ablation_adopts_only_a_run_that_is_the_cell(tmp_path, monkeypatch):
    """A model-zoo run may stand in for an ablation cell only with the cell's data, settings and budget."""
    from train import ablation

    monkeypatch.setattr(ablation.Run, "run_dir", property(lambda self: tmp_path / "cells" / self.name))
    cell = ablation.find("mr2ct-src")

    def trained(name: str, iteration: int, **changes) -> Path:
        config = dict(cell.config().model_dump(mode="json"), output_dir="runs/zoo", num_threads=1, **changes)
        d = tmp_path / name
        d.mkdir()
        (d / "checkpoint.json").write_text(json.dumps({"iteration": iteration, "config": config}), encoding="utf-8")
        (d / "checkpoint.safetensors").write_bytes(b"weights")
        return d

    with pytest.raises(ValueError, match="iteration: checkpoint is at 2800, the budget is 3000"):
        ablation.adopt(cell, trained("short", 2800))
    with pytest.raises(ValueError, match="augmentation: run has 'none'"):
        ablation.adopt(cell, trained("other-method", 3000, augmentation="none"))
    with pytest.raises(ValueError, match="dataset: run trained on Dataset501_AbdomenCT"):
        ablation.adopt(cell, trained("other-data", 3000, dataset=str(ablation.DATA / "Dataset501_AbdomenCT")))
    with pytest.raises(ValueError, match="init_weights: the run starts from 'Resources/Models/abdomen-mr-srcsm'"):
        ablation.adopt(cell, trained("fine-tuned", 3000, init_weights="Resources/Models/abdomen-mr-srcsm",
                                     init_weights_sha256="0" * 64))
    assert not cell.run_dir.exists()
    good = trained("zoo", 3000)
    adopted = ablation.adopt(cell, good)
    assert (adopted / "checkpoint.safetensors").read_bytes() == b"weights"
    assert (good / "checkpoint.safetensors").is_file()  # the source run is copied, never moved
    assert json.loads((adopted / "adopted_from.json").read_text(encoding="utf-8"))["source"] == str(good.resolve())
    with pytest.raises(ValueError, match="already exists"):
        ablation.adopt(cell, good)


def test_export_float16_weights_halves_the_package_and_agrees(tiny_model, tmp_path):
    import torch

    from train.export import export_run

    half = export_run(tiny_model.parent / "run", tmp_path / "half", weights_dtype="float16", log=lambda m: None)
    size = lambda p: (p / "weights.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(tiny_model)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        a = torch.softmax(load_package(tiny_model).build_network()(x), 1)
        b = torch.softmax(load_package(half).build_network()(x), 1)
    assert next(load_package(half).build_network().parameters()).dtype == torch.float32
    assert float((a - b).abs().max()) < 1e-2


def test_export_raw_weights_are_the_optimisers_and_say_so(tiny_model, tmp_path):
    import torch

    from train.export import export_run
    from train.trainer import load_checkpoint

    run = tiny_model.parent / "run"
    raw = load_package(export_run(run, tmp_path / "raw", weights="raw", log=lambda m: None))
    ema = load_package(tiny_model)
    groups, _ = load_checkpoint(run)
    state = raw.build_network().state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in groups["model"].items() if v.is_floating_point())
    assert raw.card.provenance.config["export_weights"] == "raw"
    assert ema.card.provenance.config.get("export_weights", "ema") == "ema"
    differs = [k for k, v in ema.build_network().state_dict().items() if not torch.equal(v, state[k])]
    assert differs  # EMA and raw weights are different tensors after 300 iterations
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        export_run(run, tmp_path / "bad", weights="best", log=lambda m: None)


def test_landmark_roi_is_centred_on_the_reference(shared_data):
    from train.evaluate import landmark_bounds

    ref = read_volume(shared_data / "Dataset502_AbdomenMRT2" / "labelsTr" / "chaos_01.nii.gz")
    lo, hi = landmark_bounds(ref, np.array([384.0, 307.2, 384.0]))
    assert np.allclose(hi - lo, [384.0, 307.2, 384.0])
    k, j, i = np.nonzero(ref.array)
    pts = ref.geometry.index_to_physical(np.stack([i, j, k], 1).astype(float))
    assert np.all(pts >= lo) and np.all(pts <= hi)  # every labelled voxel inside the ROI
    assert np.allclose((lo + hi) / 2, (pts.min(0) + pts.max(0)) / 2, atol=1e-6)


@pytest.mark.parametrize("kind, share", [("gdl", (0.0, 0.01)), ("gdl_ce", (0.1, 1.0))])
def test_cross_entropy_term_gives_a_large_missed_organ_its_gradient(kind, share):
    """Why ``loss: gdl_ce`` exists: GDL weights a label by 1/volume², so when a large organ is predicted as
    background only a sliver of the gradient goes to fixing it (the MR liver stayed background for
    2 000+ iterations); the cross-entropy term gives it a per-voxel share."""
    import torch

    from train.losses import segmentation_loss

    lab = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    lab[0, 2:12, 2:12, 2:12] = 1  # large organ (1000 voxels), missed
    lab[0, 13:15, 13:15, 13:15] = 2  # small organ (8 voxels), found
    logits = torch.zeros(1, 3, 16, 16, 16)
    logits[:, 0] = 3.0
    logits[:, 2][lab == 2] = 3.0
    logits.requires_grad_(True)
    segmentation_loss(logits, lab, kind).backward()
    g = logits.grad[0].abs()
    large = float(g[1][lab[0] == 1].sum() / g.sum())
    assert share[0] <= large < share[1], large
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, lab, "dice")


def test_a_collapsed_training_run_is_named_in_its_record(tmp_path):
    """A run whose validation Dice fell to a fraction of its best (GDL saturated at 1: one class
    everywhere) gets a note naming the collapse, one that never learned (loss stuck near 1, Dice near 0)
    a note naming the failure; a healthy or slowly learning run gets none."""
    from train.ablation import training_collapse

    def log(rows: list[tuple[int, float, float | None]]) -> Path:
        f = tmp_path / f"log{len(list(tmp_path.iterdir()))}.csv"
        lines = ["iteration,s_per_it,loss,val_dice_mean"]
        lines += [f"{it},1.0,{loss},{'' if v is None else v}" for it, loss, v in rows]
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return f

    healthy = [(1000, 0.5, 0.4), (1500, 0.3, None), (2000, 0.2, 0.6), (3000, 0.2, 0.55)]
    assert training_collapse(log(healthy)) is None
    failed = training_collapse(log([(50, 0.8, None), (100, 0.97, None), (1000, 0.98, 0.01), (2000, 0.97, 0.02)]))
    assert failed.startswith("training failed: validation mean Dice 0.020 at iteration 2000 (best 0.020 at 2000)")
    assert "from iteration 100 on" in failed and "did not learn" in failed
    assert training_collapse(log([(1000, 0.6, 0.05), (2000, 0.5, 0.08)])) is None  # learning slowly: no note
    assert training_collapse(tmp_path / "missing.csv") is None
    collapsed = healthy[:3] + [(3080, 0.6, None), (3090, 0.999, None), (3500, 0.97, None), (4000, 0.97, 0.02)]
    note = training_collapse(log(collapsed))
    assert note.startswith("training collapsed: validation mean Dice 0.600 at iteration 2000, 0.020 at 4000")
    assert "from iteration 3090 on" in note


def test_a_run_with_skipped_steps_says_how_many_updates_it_had(tmp_path):
    """Skipped steps advance the iteration count without training: a cell's record must say so
    (the first GIN-IPA runs skipped 29 % and 46 % of their steps before the consistency loss was fixed)."""
    from train.ablation import skipped_steps

    f = tmp_path / "log.csv"
    rows = ["iteration,s_per_it,loss,gdl,grad_norm,skipped,consistency"]
    rows += [f"{it},3.0,0.8,0.7,4.0,{0.0 if it <= 400 else 1.0},0.05" for it in range(10, 601, 10)]
    rows.insert(30, "300,,,,,,,")  # a validation-only row has no 'skipped'
    f.write_text("\n".join(rows[:1] + [r.rstrip(",") for r in rows[1:]]) + "\n", encoding="utf-8")
    assert skipped_steps(f) == ("200 of its 600 steps (33%) were skipped for a non-finite loss or gradient: "
                                "the model had 400 updates, not 600.")
    few = ["iteration,loss,skipped"] + [f"{it},0.5,{0.1 if it == 20 else 0.0}" for it in range(10, 301, 10)]
    f.write_text("\n".join(few) + "\n", encoding="utf-8")
    assert skipped_steps(f) is None  # one skipped step of 300 (fp16 loss scaling does this): no note
    assert skipped_steps(f, threshold=0.0) is not None
    assert skipped_steps(tmp_path / "missing.csv") is None


def test_trainer_says_when_a_learned_run_falls_dead_and_when_it_recovers():
    """Loss at the GDL ceiling with a vanishing gradient (one class everywhere) for most of 50 steps is a
    dead episode, said once when it starts and once when it ends (CT→MR global RCNet recovered from one
    after ≈ 270 iterations, so it is a warning, not a stop); an untrained network sitting at the same
    loss is not dead, and neither are single bad steps of a learned run."""
    from train.trainer import DeadEpisodeMonitor

    said: list[tuple[int, str]] = []
    monitor = DeadEpisodeMonitor()
    steps = [(0.97, 0.02)] * 100  # untrained: at the ceiling with a small gradient, not an episode
    steps += [(0.5, 1.5)] * 100 + [(0.996, 0.003), (0.4, 2.0)] * 25  # learned; every other step bad: not dead
    steps += [(0.4, 2.0)] * 10 + [(0.997, 0.001)] * 45 + [(0.997, 4.6)] + [(0.965, 1e-4)] * 100  # falls dead
    steps += [(0.6, 8.0)] * 50 + [(0.3, 1.2)] * 50  # recovers
    for it, (loss, norm) in enumerate(steps, start=1):
        message = monitor.update(it, loss, norm)
        if message:
            said.append((it, message))
    assert [it for it, _ in said] == [305, 451]
    assert said[0][1].startswith("WARNING: training looks dead since iteration 261:") and "gdl_ce" in said[0][1]
    assert said[1][1] == "training recovered by iteration 451 from the dead episode that began at iteration 261"
    assert DeadEpisodeMonitor().update(1, float("nan"), 0.0) is None


def test_the_training_loop_warns_of_a_dead_episode_and_logs_it(tmp_path, monkeypatch):
    """The loop feeds every step to the monitor: the warning reaches the run's log and ``log.csv`` gets a
    ``dead`` column (share of the window's steps inside an episode). Steps are scripted: learned, then dead."""
    from train.trainer import Trainer

    script = iter([(0.4, 1.0)] * 60 + [(0.997, 0.001)] * 60)

    def scripted_step(self) -> dict[str, float]:
        gdl, norm = next(script)
        return {"loss": gdl, "gdl": gdl, "grad_norm": norm, "skipped": 0.0}

    monkeypatch.setattr(Trainer, "step", scripted_step)
    said: list[str] = []
    Trainer(_tiny_config(tmp_path, _subset(tmp_path), iterations=120, log_every=10, checkpoint_every=60),
            log=said.append).fit()
    assert [m for m in said if "looks dead" in m] == [m for m in said if "since iteration 61:" in m] != []
    with open(tmp_path / "run" / "log.csv", encoding="utf-8") as f:
        dead = {int(r["iteration"]): float(r["dead"]) for r in csv.DictReader(f)}
    assert all(dead[it] == 0.0 for it in range(10, 101, 10)) and dead[110] == pytest.approx(0.6) and dead[120] == 1.0


def test_a_resumed_run_keeps_its_dead_episode_window(tmp_path, monkeypatch):
    """The monitor's window travels in the checkpoint: a run stopped while falling dead and resumed still
    dates the episode to its first dead step (not to the resume, as a fresh window would), and a run
    resumed inside an episode neither warns again nor logs itself alive."""
    from train.trainer import Trainer

    script = iter([(0.4, 1.0)] * 60 + [(0.997, 0.001)] * 140)

    def scripted_step(self) -> dict[str, float]:
        gdl, norm = next(script)
        return {"loss": gdl, "gdl": gdl, "grad_norm": norm, "skipped": 0.0}

    monkeypatch.setattr(Trainer, "step", scripted_step)
    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=200, log_every=10, checkpoint_every=1000)
    said: list[str] = []
    for until in (100, 130, 200):  # three sessions; the episode starts at 61 and is noticed at 105
        Trainer(cfg, resume=True, log=said.append).fit(until_iteration=until)
    assert [m for m in said if "looks dead" in m] == [m for m in said if "since iteration 61:" in m]
    assert len([m for m in said if "looks dead" in m]) == 1
    with open(tmp_path / "run" / "log.csv", encoding="utf-8") as f:
        dead = {int(r["iteration"]): float(r["dead"]) for r in csv.DictReader(f)}
    assert dead[100] == 0.0 and dead[110] == pytest.approx(0.6) and all(dead[it] == 1.0 for it in range(120, 201, 10))


def test_a_run_that_fell_dead_and_recovered_says_so_in_its_record(tmp_path):
    """Dead episodes are read back from a run's log (window means of loss and gradient norm): a recovered
    one is noted in the cell's record, one that lasts to the end is left to the collapse note."""
    from train.ablation import dead_episodes, recovered_episodes

    def log(rows: list[tuple[float, float]]) -> Path:
        f = tmp_path / f"log{len(list(tmp_path.iterdir()))}.csv"
        lines = ["iteration,s_per_it,loss,gdl,grad_norm,skipped"]
        lines += [f"{10 * (i + 1)},1.0,{gdl + 0.002},{gdl},{norm},0.0" for i, (gdl, norm) in enumerate(rows)]
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return f

    start = [(0.97, 0.04)] * 10 + [(0.6, 1.5)] * 10  # an untrained start is not an episode
    dead = [(0.9974, 7e-5)] * 10 + [(0.9975, 0.017)] + [(0.9913, 1.7)] + [(0.9989, 7e-5)] * 3  # a spike inside
    recovered = log(start + dead + [(0.78, 14.7), (0.39, 2.2)] + [(0.25, 1.8)] * 10)
    assert dead_episodes(recovered) == [(210, 350)]
    assert recovered_episodes(recovered) == ("the loss sat at its ceiling with a vanishing gradient (one class "
                                             "everywhere) in iterations 210–350, and training recovered from it.")
    still = log(start + dead + [(0.965, 1e-4)] * 20)
    assert dead_episodes(still) == [(210, None)] and recovered_episodes(still) is None
    blips = log(start + ([(0.998, 0.001)] + [(0.3, 1.0)] * 7) * 5)  # isolated bad windows are no episode
    assert dead_episodes(blips) == [] and dead_episodes(tmp_path / "missing.csv") == []


def test_a_run_dead_at_its_end_whose_ema_still_segments_says_so(tmp_path):
    """RandConv CT→MR (seed 1) fell dead ≈ 130 iterations before its budget ended while its validation (EMA
    weights) held at 0.67: no collapse note applies, yet its record must say that the measured model is an
    average taken just after a collapse. A run that validated collapsed gets the collapse note instead."""
    from train.ablation import ended_dead, training_collapse

    f = tmp_path / "log.csv"
    rows = ["iteration,loss,gdl,grad_norm,val_dice_mean"]
    rows += [f"{it},0.30,0.30,1.5,{v}" for it, v in ((1000, "0.44"), (2000, "0.62"), (3000, "0.66"))]
    rows += [f"{it},0.25,0.25,1.2," for it in range(3010, 3870, 10)]
    rows += [f"{it},0.9990,0.9970,7e-05," for it in range(3870, 4000, 10)] + ["4000,0.9992,0.9971,7.2e-05,0.670"]
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert training_collapse(f) is None
    assert ended_dead(f) == (
        "the optimiser's weights fell dead at iteration ≈ 3870 (loss at its ceiling, vanishing gradient: one class "
        "everywhere) and were still dead at the end of the budget (4000); the exported EMA weights, an average over "
        "the last ≈ 1 000 steps, still segmented (validation mean Dice 0.670 at iteration 4000), so the number "
        "measures them — a longer budget would have measured a collapsed model.")
    f.write_text("\n".join(rows[:-1] + ["4000,0.9992,0.9971,7.2e-05,0.020"]) + "\n", encoding="utf-8")
    assert training_collapse(f) is not None and ended_dead(f) is None  # the collapse note speaks
    f.write_text("\n".join(rows[:-14] + ["4000,0.25,0.25,1.2,0.670"]) + "\n", encoding="utf-8")
    assert ended_dead(f) is None and ended_dead(tmp_path / "missing.csv") is None


def test_a_model_still_learning_at_its_budget_says_so(tmp_path):
    """GIN-IPA on bSSFP validated 0.110, 0.195, 0.421 at 1000/2000/3000 while the other methods had
    levelled off at 0.71–0.78: its cross-domain number is what it reaches at the budget, and says so."""
    from train.ablation import still_learning

    f = tmp_path / "log.csv"
    f.write_text("iteration,loss,val_dice_mean\n1000,0.5,0.110\n1500,0.4,\n2000,0.3,0.195\n3000,0.3,0.421\n",
                 encoding="utf-8")
    assert still_learning(f) == ("still learning at its budget: validation mean Dice (source domain) 0.110 at "
                                 "1000, 0.195 at 2000, 0.421 at 3000; the number is what the method reaches at "
                                 "this budget, not what it can reach.")
    f.write_text("iteration,loss,val_dice_mean\n2000,0.3,0.757\n3000,0.3,0.819\n", encoding="utf-8")
    assert still_learning(f) is None  # levelling off (MR→CT GIN-IPA)
    assert still_learning(tmp_path / "missing.csv") is None


def test_recorded_notes_are_refreshed_from_run_logs_without_retraining(tmp_path, monkeypatch):
    """``notes`` rewrites a plan-trained record's note from its run log (a note learned of after it was
    recorded), keeps its numbers and date, and leaves records without a log, or not trained by the plan,
    alone."""
    from train import ablation

    monkeypatch.setattr(ablation.Run, "run_dir", property(lambda self: tmp_path / "runs" / self.name))
    monkeypatch.setattr(ablation.Run, "result_file", property(lambda self: tmp_path / "results" / f"{self.name}.json"))
    cell, adopted, reseeded = (ablation.find(n) for n in ("bssfp2lge-gin_ipa", "bssfp2lge-src", "ct2mr-randconv"))
    summary = {"cases": 40, "settings": {"with SM": {"mean": {"dice": 0.538, "assd": 32.0}}}}
    for run, kind in ((cell, "trained by the plan"), (adopted, "adopted package"), (reseeded, "trained by the plan")):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.json").write_text(json.dumps({"seed": 1 if run is reseeded else 0}), encoding="utf-8")
        (run.run_dir / "log.csv").write_text("iteration,loss,val_dice_mean\n2000,0.3,0.195\n3000,0.3,0.421\n",
                                             encoding="utf-8")
        ablation.record(run, summary, 3000, {"kind": kind, "device": "cpu"}, recorded="2026-12-01")
    assert ablation.main(["notes"]) == 0
    rec = ablation.result(cell)
    assert rec["provenance"]["note"].startswith("Still learning at its budget") and rec["recorded"] == "2026-12-01"
    assert rec["summary"] == summary and rec["iterations"] == 3000 and rec["provenance"]["device"] == "cpu"
    assert "note" not in ablation.result(adopted)["provenance"]
    assert ablation.result(reseeded)["provenance"]["note"].endswith(
        f"Trained with seed 1: {ablation.RESEEDED[reseeded.name][1]}.")
    assert not ablation.refresh_notes(cell)  # nothing new to say
    text = ablation.table(tmp_path / "ablation.md", figure=False).read_text(encoding="utf-8")
    assert "bssfp2lge-gin_ipa: Still learning at its budget" in text
    assert f"not started; rerun with seed 1: {ablation.RESEEDED['ct2mr-gin_ipa'][1]}" in text


def test_trainer_warns_when_validation_collapses():
    import types

    from train.trainer import Trainer

    said: list[str] = []
    trainer = types.SimpleNamespace(log=said.append)
    for dice in (0.2, 0.5, 0.64, 0.6, 0.4):
        Trainer._warn_if_collapsed(trainer, dice)
    assert said == []  # learning, then a normal dip
    Trainer._warn_if_collapsed(trainer, 0.02)
    assert len(said) == 1 and "fell from 0.640 to 0.020" in said[0] and "gdl_ce" in said[0]


def test_diagnose_tells_a_dead_checkpoint_from_a_live_one(tmp_path, capsys):
    """``python -m train diagnose`` measures what a checkpoint's network outputs on training patches: a
    freshly trained one is not saturated; one whose head puts background 10⁴ above every other class
    (what collapsed runs showed: logit gaps of 10⁴–10⁷) has an exactly one-hot float32 softmax everywhere,
    hence no segmentation gradient, and is called dead for good. The EMA weights are judged separately."""
    import torch
    from safetensors.torch import load_file, save_file

    from train.__main__ import main
    from train.diagnose import UNDERFLOW_GAP, saturation_report
    from train.trainer import Trainer

    cfg = _tiny_config(tmp_path, _subset(tmp_path), iterations=6, log_every=3)
    Trainer(cfg).fit()
    run = tmp_path / "run"
    live = saturation_report(run, patches=2)
    assert live["iteration"] == 6 and live["weights"] == "raw" and live["patches"] == 2
    assert live["one_hot_share"] < 0.5 and live["verdict"].startswith("not saturated")
    assert live["gap_min"] < UNDERFLOW_GAP and sum(live["class_share"].values()) == pytest.approx(1.0)
    assert live["l2_gradient_norm"] == pytest.approx(2 * cfg.l2 * live["kernel_norm"]) and live["kernel_norm"] > 0

    tensors = load_file(str(run / "checkpoint.safetensors"))
    tensors["model.head.weight"] = torch.zeros_like(tensors["model.head.weight"])
    bias = torch.zeros_like(tensors["model.head.bias"])
    bias[0] = 1e4
    tensors["model.head.bias"] = bias
    save_file(tensors, str(run / "checkpoint.safetensors"), metadata={"iteration": "6"})
    dead = saturation_report(run, patches=2)
    assert dead["one_hot_share"] == 1.0 and dead["class_share"]["0"] == 1.0
    assert dead["gap_min"] == pytest.approx(1e4) and dead["logit_max"] == pytest.approx(1e4)
    assert dead["verdict"].startswith("dead for good") and "gdl_ce" in dead["verdict"]
    ema = saturation_report(run, weights="ema", patches=2)  # the EMA was not touched
    assert ema["one_hot_share"] < 0.5 and ema["verdict"].endswith("this is what `export` would package)")

    assert main(["diagnose", str(run), "--patches", "1"]) == 0
    assert "dead for good" in capsys.readouterr().out
    assert main(["diagnose", str(run), "--patches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["one_hot_share"] == 1.0
    # one vocabulary with `export --weights ema|raw`; diagnose's old spelling "model" still works, with a note
    assert main(["diagnose", str(run), "--patches", "1", "--json", "--weights", "model"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["weights"] == "raw" and "deprecated" in captured.err
    with pytest.raises(SystemExit):
        main(["diagnose", str(run), "--weights", "best"])
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "holds no training checkpoint" in capsys.readouterr().err
    assert main(["diagnose", str(run), "--patches", "0"]) == 2
    assert "patches must be at least 1" in capsys.readouterr().err


def test_card_metrics_written_into_a_package_change_only_its_metrics(tiny_model, tmp_path):
    """Release step: the measured metrics go into the exported card in place — only the metrics field
    changes, the card stays loadable, the weights and every other byte stay."""
    from train.__main__ import main as train_main
    from train.card_edit import set_card_fields

    pkg = tmp_path / "pkg"
    assert train_main(["export", str(tiny_model.parent / "run"), str(pkg)]) == 0
    before = (pkg / "model.json").read_text(encoding="utf-8")
    weights = (pkg / "weights.safetensors").read_bytes()
    summary = {"dataset": "Dataset502_AbdomenMRT2", "split": "val", "cases": 1, "postprocessing": "none",
               "settings": {"with SM": {"mean": {"name": None, "dice": 0.5, "assd": 3.0},
                                        "1": {"name": "liver", "dice": 0.5, "assd": 3.0}}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    assert train_main(["card-metrics", f"cross_domain_mr={tmp_path / 'eval'}", "--note", "measured",
                       "--write-card", str(pkg)]) == 0
    card = load_package(pkg).card
    assert card.metrics["note"] == "measured"
    assert card.metrics["cross_domain_mr"]["with_source_matching"]["mean_dice"] == 0.5
    assert card.metrics["cross_domain_mr"]["postprocessing"] == "none"
    after = (pkg / "model.json").read_text(encoding="utf-8")
    old, new = json.loads(before), json.loads(after)
    assert {k: v for k, v in old.items() if k != "metrics"} == {k: v for k, v in new.items() if k != "metrics"}
    assert (pkg / "weights.safetensors").read_bytes() == weights
    # the edit is textual: the lines before the metrics field are the same bytes
    head = before.split('\n  "metrics": ')[0] if '\n  "metrics": ' in before else before.split('\n  "provenance": ')[0]
    assert after.startswith(head)
    # any value type can be replaced (an empty object, a scalar), and no --out / --write-card is an error
    set_card_fields(pkg, {"metrics": {}})
    assert load_package(pkg).card.metrics == {}
    set_card_fields(pkg, {"description": "a \"quoted\", edited description"})
    assert load_package(pkg).card.description == 'a "quoted", edited description'
    with pytest.raises(SystemExit, match="--write-card"):
        train_main(["card-metrics", f"cross_domain_mr={tmp_path / 'eval'}"])


def test_the_v2_protocols_compare_none_and_src_at_the_v2_budget():
    """Recipe v2's ablation: per task none vs SRC at 12 000 iterations; the SRC cell is the bundled
    model's own training run (adopt: only the iteration may still differ while it trains), the in-domain
    reference is the reverse v2 protocol's SRC model, and the published reference is the task's."""
    from train import ablation

    for task in ("ct2mr", "mr2ct", "bssfp2lge"):
        v1, v2 = ablation.find(f"{task}-src").protocol, ablation.find(f"{task}-v2-src").protocol
        assert (v2.source, v2.target, v2.target_split) == (v1.source, v1.target, v1.target_split)
        assert v2.iterations == 12000 and v2.methods == ("none", "src") and v2.published == v1.published
        none, src = ablation.find(f"{task}-v2-none").config("cpu"), ablation.find(f"{task}-v2-src").config("cpu")
        assert (none.augmentation, src.augmentation) == ("none", "src")
        assert none.model_dump(exclude={"augmentation", "output_dir", "model"}) == \
            src.model_dump(exclude={"augmentation", "output_dir", "model"})
        assert src.fov_augmentation > 0 and src.lr_schedule == "poly" and src.loss == "gdl_ce"
    indomain, twin = ablation.find("ct2mr-v2-indomain").config("cpu"), ablation.find("mr2ct-v2-src").config("cpu")
    assert Path(indomain.dataset).resolve() == Path(twin.dataset).resolve()
    assert indomain.model_dump(exclude={"output_dir", "model", "dataset"}) == \
        twin.model_dump(exclude={"output_dir", "model", "dataset"})
    assert ablation.twin(ablation.find("ct2mr-v2-indomain")).name == "mr2ct-v2-src"
    # the bundled CT model's recipe is the CT → MR v2 SRC cell: nothing but the budget's iteration differs
    recipe = ablation.REPO / "train" / "recipes" / "abdomen_ct_src_v2_cpu.yaml"
    from train.config import load_config

    zoo = load_config(recipe).model_dump(mode="json")
    assert ablation._differences(ablation.find("ct2mr-v2-src"), zoo, 5000) == [
        "iteration: checkpoint is at 5000, the budget is 12000 (compare methods only at equal budget)"]
    assert any(p.startswith("fov_augmentation") for p in ablation._differences(
        ablation.find("ct2mr-v2-src"), dict(zoo, fov_augmentation=0.0), 12000))
    longer = ablation._differences(ablation.find("ct2mr-v2-src"), dict(zoo, iterations=20000), 12000)
    assert longer == ["iterations: the run's poly learning-rate schedule spans 20000 iterations, the plan's 12000"]
