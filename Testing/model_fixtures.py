"""Model packages for tests, made with the real trainer and exporter on real cases.

``tiny_model`` trains a small U-Net for a few hundred iterations on two real CT cases at a coarse
spacing, with SRC, and exports it through ``train.export`` — real training, real files, real loading
code. It is far too small to be a useful model; tests that use it check plumbing, geometry and
contracts, not accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_subset_dataset(root: Path, source: Path, train: list[str], val: list[str]) -> Path:
    """An nnU-Net raw dataset folder that links a few real cases (never copies them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    for case in train + val:
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            link = root / sub / name
            if not link.exists():
                os.symlink(source / sub / name, link)
    (root / "splits.json").write_text(json.dumps({"train": train, "val": val}), encoding="utf-8")
    return root


def train_tiny_model(workdir: Path, iterations: int = 300, augmentation: str = "src",
                     dataset: str = "Dataset501_AbdomenCT", train_cases: tuple[str, ...] = ("sabs_09", "sabs_10"),
                     val_cases: tuple[str, ...] = ("sabs_06",), model_id: str = "tiny-ct") -> Path:
    from train.config import TrainConfig
    from train.export import export_run
    from train.trainer import Trainer

    subset = make_subset_dataset(workdir / dataset, SHARED_DATA / dataset, list(train_cases), list(val_cases))
    cfg = TrainConfig(
        dataset=str(subset),
        model={"id": model_id, "name": "Tiny test model", "anatomy": "abdomen"},
        spacing=(9.6, 9.6, 9.6),
        patch_size=(32, 32, 32),
        network={"architecture": "srcsm_unet", "parameters": {"channels": [8, 16, 32], "dropout": 0.0}},
        augmentation=augmentation,
        landmark_sampling=0.8,
        iterations=iterations,
        batch_size=2,
        learning_rate=3e-4,
        val_every=iterations,
        checkpoint_every=iterations,
        log_every=max(1, iterations // 10),
        cache_dir=str(workdir / "cache"),
        output_dir=str(workdir / "run"),
        seed=1,
    )
    Trainer(cfg, log=lambda m: None).fit()
    return export_run(workdir / "run", workdir / model_id, log=lambda m: None, model_id=model_id, version="0.0.1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path of a small CT model package folder trained for 300 iterations with SRC on real cases."""
    return train_tiny_model(tmp_path_factory.mktemp("tiny_model"))
