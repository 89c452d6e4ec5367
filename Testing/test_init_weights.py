"""Fine-tuning from a released package (``init_weights``): the run starts from the package's weights, says
so in its checkpoint and export, and refuses a package of another network, other labels or other weights
than the recipe pins."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from SRCSMSegmenterLib.labels import label_table_from_dataset_labels
from SRCSMSegmenterLib.modelpackage import load_package

from train.config import TrainConfig, load_config, read_recipe
from train.datasets import load_dataset
from train.export import run_config_of
from train.init_weights import InitWeightsError, load_init_weights

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "train" / "recipes"


def _config_of(package: Path, tmp_path: Path, **changes) -> TrainConfig:
    """The package's own training config (from its card) retargeted at a new run folder."""
    card = json.loads((package / "model.json").read_text(encoding="utf-8"))
    cfg = run_config_of(card["provenance"]["config"])
    cfg.update(output_dir=str(tmp_path / "finetune"), iterations=4, val_every=0, checkpoint_every=2,
               log_every=1, learning_rate=1e-4, warmup_iterations=0, precision="fp32")
    cfg.update(changes)
    return TrainConfig(**cfg)


def _losses(run: Path) -> list[float]:
    with open(run / "log.csv", encoding="utf-8") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def test_a_run_starts_from_the_package_and_its_export_records_it(tiny_model, tmp_path):
    from train.export import export_run
    from train.trainer import Trainer

    package = load_package(tiny_model)
    shipped = package.state_dict()

    scratch = Trainer(_config_of(tiny_model, tmp_path / "s"), log=lambda m: None)
    scratch.prepare_data()
    scratch.build()
    said: list[str] = []
    tuned = Trainer(_config_of(tiny_model, tmp_path, init_weights=str(tiny_model),
                               init_weights_sha256=package.card.weights.sha256), log=said.append)
    tuned.prepare_data()
    tuned.build()
    for name, value in shipped.items():  # network and EMA hold the package's weights, not a fresh draw
        assert torch.equal(tuned.model.state_dict()[name], value.float()), name
        assert torch.equal(tuned.ema[name], value.float()), name
    assert any(not torch.equal(scratch.model.state_dict()[n], v.float()) for n, v in shipped.items())
    assert any("start from tiny-ct 0.0.1 (300 iterations" in m for m in said)

    tuned.fit(until_iteration=2)  # checkpoint at 2, then a resumed run goes on with the same record
    resumed = Trainer(tuned.cfg, resume=True, log=lambda m: None)
    resumed.fit()
    assert len(_losses(tmp_path / "finetune")) == 4  # 2 steps, then 2 more after the resume
    card = load_package(export_run(tmp_path / "finetune", tmp_path / "pkg", log=lambda m: None)).card
    assert card.provenance.iterations == 300 + 4  # the weights saw the package's iterations and the run's
    source = card.provenance.config["init_weights_from"]
    assert (source["id"], source["version"], source["iterations"]) == ("tiny-ct", "0.0.1", 300)
    assert source["weights_sha256"] == package.card.weights.sha256
    assert card.provenance.config["init_weights"] == str(tiny_model)
    # the card reads back as the run's config (what the ablation and a rerun compare), the record left out
    back = TrainConfig.model_validate(run_config_of(card.provenance.config))
    assert (back.init_weights, back.init_weights_sha256) == (str(tiny_model), package.card.weights.sha256)
    with pytest.raises(ValueError, match="init_weights_from"):
        TrainConfig.model_validate(dict(card.provenance.config))


def test_a_package_of_another_network_is_refused(tiny_model, tmp_path):
    from train.trainer import Trainer

    other = {"architecture": "srcsm_unet", "parameters": {"channels": [8, 16, 64], "dropout": 0.0}}
    cfg = _config_of(tiny_model, tmp_path, network=other, init_weights=str(tiny_model))
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.prepare_data()
    with pytest.raises(InitWeightsError, match=r"another network than the recipe's.*train from scratch"):
        trainer.build()


def test_a_package_trained_on_other_labels_is_refused(shared_data):
    cardiac = REPO / "Resources" / "Models" / "cardiac-bssfp-srcsm"
    card = load_package(cardiac).card
    same_network = {"architecture": card.network.architecture, "parameters": dict(card.network.parameters)}
    ct_labels = label_table_from_dataset_labels(load_dataset(shared_data / "Dataset501_AbdomenCT").labels)
    with pytest.raises(InitWeightsError, match=r"other labels than the recipe's dataset.*liver"):
        load_init_weights(cardiac, same_network, ct_labels)


def test_weights_other_than_the_pinned_ones_are_refused(tiny_model, tmp_path):
    card = load_package(tiny_model).card
    spec = {"architecture": card.network.architecture, "parameters": dict(card.network.parameters)}
    tensors, info = load_init_weights(tiny_model, spec, card.labels, sha256=card.weights.sha256)
    assert info["weights_sha256"] == card.weights.sha256 and all(t.dtype == torch.float32 for t in tensors.values())
    with pytest.raises(InitWeightsError, match=r"other weights than the recipe pins.*init_weights_sha256"):
        load_init_weights(tiny_model, spec, card.labels, sha256="0" * 64)


@pytest.mark.parametrize("domain", ["ct", "mr"])
def test_the_fine_tuning_recipe_is_v3_from_the_bundled_model(domain):
    """The v3ft recipe is recipe v3 but for where it starts and how long and fast it trains; it pins the
    weights it starts from (a later release replacing the bundled package makes it refuse, not drift)."""
    v3 = read_recipe(RECIPES / f"abdomen_{domain}_src_v3_cpu.yaml")
    ft = read_recipe(RECIPES / f"abdomen_{domain}_src_v3ft_cpu.yaml")
    changed = {k for k in v3.keys() | ft.keys() if v3.get(k) != ft.get(k)}
    assert changed == {"init_weights", "init_weights_sha256", "iterations", "learning_rate", "warmup_iterations",
                       "val_every", "output_dir"}
    cfg = load_config(RECIPES / f"abdomen_{domain}_src_v3ft_cpu.yaml")
    assert Path(cfg.init_weights).name == f"abdomen-{domain}-srcsm" and (REPO / cfg.init_weights).is_dir()
    assert cfg.iterations < load_config(RECIPES / f"abdomen_{domain}_src_v3_cpu.yaml").iterations
    assert cfg.output_dir != v3["output_dir"]
    assert cfg.learning_rate < v3["learning_rate"] and cfg.warmup_iterations > 0


def test_the_longer_mr_fine_tune_differs_only_in_length():
    """``abdomen_mr_src_v3ft2k_cpu.yaml`` is the MR fine-tune run twice as long: same start, rate and
    warm-up, its own folder (the 1 000-iteration run's results stay where docs/recipe-v2.md says)."""
    short = load_config(RECIPES / "abdomen_mr_src_v3ft_cpu.yaml").model_dump(mode="json")
    long = load_config(RECIPES / "abdomen_mr_src_v3ft2k_cpu.yaml").model_dump(mode="json")
    assert {k for k in short if short[k] != long[k]} == {"iterations", "val_every", "output_dir"}
    assert (short["iterations"], long["iterations"]) == (1000, 2000)
