"""`python -m train export`: an export never impersonates a bundled model, and its card carries the
training labels' volume ranges (the plausibility check's data), measured on the real label files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from model_fixtures import SHARED_DATA, make_subset_dataset
from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.modelpackage import load_package

TRAIN_CASES = ("sabs_09", "sabs_10")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A real (very short) training run on two real CT cases: what a user exports after a quick try."""
    from train.config import TrainConfig
    from train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("export")
    data = make_subset_dataset(tmp / "Dataset501_AbdomenCT", SHARED_DATA / "Dataset501_AbdomenCT",
                               list(TRAIN_CASES), ["sabs_06"])
    # the recipe's id is the bundled model's: exactly the case that used to impersonate it
    cfg = TrainConfig(dataset=str(data), model={"id": "abdomen-ct-srcsm", "name": "Quick", "anatomy": "abdomen"},
                      spacing=(9.6, 9.6, 9.6), patch_size=(16, 16, 16),
                      network={"architecture": "srcsm_unet", "parameters": {"channels": [4, 8], "dropout": 0.0}},
                      augmentation="src", iterations=4, batch_size=1, learning_rate=1e-3, val_every=0,
                      checkpoint_every=4, log_every=1, cache_dir=str(tmp / "cache"),
                      output_dir=str(tmp / "my-ct-run"), precision="fp32", seed=3)
    Trainer(cfg, log=lambda m: None).fit()
    return tmp / "my-ct-run"


def test_bundled_ids_are_what_the_check_protects():
    assert {"abdomen-ct-srcsm", "abdomen-mr-srcsm", "cardiac-bssfp-srcsm"} <= {e.id for e in Catalog().bundled_entries()}


def test_default_export_gets_its_own_id_and_version(short_run, tmp_path):
    from train.export import export_run

    card = load_package(export_run(short_run, tmp_path / "pkg", log=lambda m: None)).card
    assert card.id == "my-ct-run-it4" and card.version == "0.0.0-it4"
    assert card.id not in {e.id for e in Catalog().bundled_entries()}


def test_bundled_id_is_refused_unless_replacing(short_run, tmp_path, capsys):
    from train.__main__ import main
    from train.export import export_run

    with pytest.raises(InputError, match="--replace-bundled") as exc:
        export_run(short_run, tmp_path / "a", model_id="abdomen-ct-srcsm", log=lambda m: None)
    assert "--id" in str(exc.value) and not (tmp_path / "a").exists()
    assert main(["export", str(short_run), str(tmp_path / "b"), "--id", "abdomen-ct-srcsm"]) == 2
    assert "bundled" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["export", str(short_run), str(tmp_path / "c"), "--id", "abdomen-ct-srcsm", "--version", "0.2.0",
                 "--replace-bundled"]) == 0
    card = load_package(tmp_path / "c").card
    assert (card.id, card.version) == ("abdomen-ct-srcsm", "0.2.0")


def test_export_into_the_bundled_models_folder_is_refused(short_run):
    from train.export import export_run

    bundled = Catalog().bundled_dirs[0]
    target = bundled / "quick-export-test"
    with pytest.raises(InputError, match="bundled models folder"):
        export_run(short_run, target, model_id="quick-export-test", log=lambda m: None)
    assert not target.exists()


def test_card_records_the_training_label_volumes(short_run, tmp_path):
    from train.export import export_run

    card = load_package(export_run(short_run, tmp_path / "pkg", model_id="stats", log=lambda m: None)).card
    stats = card.training_label_stats
    assert stats is not None and stats.cases == len(TRAIN_CASES)
    assert set(stats.labels) == set(card.labels.names())
    # the same numbers straight from the label files: voxel count × voxel volume (physical, not shape)
    for lab in card.labels.labels:
        volumes = []
        for case in TRAIN_CASES:
            img = sitk.ReadImage(str(SHARED_DATA / "Dataset501_AbdomenCT" / "labelsTr" / f"{case}.nii.gz"))
            n = int((sitk.GetArrayViewFromImage(img) == lab.value).sum())
            volumes.append(n * float(np.prod(img.GetSpacing())) / 1000.0)
        assert stats.labels[lab.name].volume_ml == pytest.approx((min(volumes), max(volumes)), abs=0.01)
        assert stats.labels[lab.name].present_in == 1.0
    assert 800 < stats.labels["liver"].volume_ml[0] < 3000  # a liver, in millilitres


def test_weights_vocabulary_is_ema_or_raw(short_run, tmp_path, capsys):
    from train.__main__ import main

    assert main(["export", str(short_run), str(tmp_path / "r"), "--weights", "model"]) == 0
    assert "deprecated" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "r" / "model.json").read_text(encoding="utf-8"))["provenance"]["config"]
    assert cfg["export_weights"] == "raw"
    with pytest.raises(SystemExit):
        main(["export", str(short_run), str(tmp_path / "x"), "--weights", "best"])
