"""Export a trained run as a model package the Slicer module and ``srcsm`` load.

The package holds the EMA weights (the paper's deployed model), the source profile fitted on the
run's training images (SRCSM §2.2: pooled histograms, the source modality's rule), the label table
with SNOMED-CT codes and colours, normalisation, spacing, patch size, and a model card with the data,
budget and measured metrics.

An export is not the bundled model: its id defaults to the run's folder name plus its iteration
(``abdomen-ct-src-cpu-it140``) and its version to ``0.0.0-it140``, and an id that a bundled model
has is refused unless the export *is* that model's re-release (``replace_bundled``) — a user-installed
package with a bundled id hides the bundled one (:class:`~SRCSMSegmenterLib.catalog.Catalog`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

import torch

from SRCSMSegmenterLib import __version__
from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.labels import label_table_from_dataset_labels
from SRCSMSegmenterLib.matching import SourceProfile
from SRCSMSegmenterLib.modelpackage import save_package
from SRCSMSegmenterLib.normalization import default_normalization
from SRCSMSegmenterLib.plausibility import TrainingLabelStats, measure_label_stats

from .config import TrainConfig
from .datasets import Dataset, load_dataset
from .trainer import load_checkpoint

DATASET_CITATIONS = {
    "Dataset501_AbdomenCT": ("BTCV Multi-Atlas Labeling Beyond the Cranial Vault (Synapse syn3193805)",
                             "Synapse data-use terms (research use only)"),
    "Dataset502_AbdomenMRT2": ("CHAOS challenge, T2-SPIR (Kavur et al., Medical Image Analysis 2021; Zenodo 3431873)",
                               "CC BY-SA 4.0"),
    "Dataset503_CardiacBSSFP": ("MS-CMRSeg 2019, bSSFP (Zhuang et al.)", "research use after registration"),
    "Dataset504_CardiacLGE": ("MS-CMRSeg 2019, LGE (Zhuang et al.)", "research use after registration"),
}


def fit_source_profile(config: TrainConfig, log=print) -> SourceProfile:
    dataset = load_dataset(config.dataset)
    cases = dataset.split(config.train_split)
    log(f"fitting the source profile on {len(cases)} {dataset.modality} training images")
    return SourceProfile.fit((read_volume(c.image).array for c in cases), dataset.modality)  # type: ignore[arg-type]


def measure_training_labels(config: TrainConfig, table) -> TrainingLabelStats:
    """Per-label volume ranges over the run's training labels (the card's plausibility data)."""
    dataset = load_dataset(config.dataset)
    return measure_label_stats((read_volume(c.label) for c in dataset.split(config.train_split)), table)


def default_model_id(run_dir: Path, iteration: int) -> str:
    """``<run folder name>-it<iteration>``, lower-cased to the card's id alphabet."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", run_dir.resolve().name.lower()).strip("-._") or "model"
    return f"{stem}-it{iteration}"


def check_not_bundled(model_id: str, destination: Path, replace_bundled: bool,
                      catalog: Catalog | None = None) -> None:
    """Refuse to impersonate a bundled model (same id, or a folder among the bundled packages)."""
    if replace_bundled:
        return
    catalog = catalog or Catalog()
    bundled = {e.id: e for e in catalog.bundled_entries()}
    if model_id in bundled:
        raise InputError(
            f"'{model_id}' is the id of the bundled model at '{bundled[model_id].path}': once installed, a package "
            f"with this id would hide the bundled one. Give the export its own id (--id my-{model_id}), or pass "
            f"--replace-bundled if this export is a new release of that bundled model."
        )
    dest = destination.resolve()
    for folder in catalog.bundled_dirs:
        if dest.parent == Path(folder).resolve():
            raise InputError(
                f"'{destination}' is inside the bundled models folder '{folder}', which ships with the extension. "
                f"Export elsewhere (e.g. models/{dest.name}) and install it with `srcsm models install`, or pass "
                f"--replace-bundled to release a bundled model."
            )


def default_description(config: TrainConfig, dataset: Dataset | None = None) -> str:
    """The card description an export writes unless told another: the recipe's, else the dataset's."""
    return config.model.description or (dataset or load_dataset(config.dataset)).description


def run_config_of(card_config: dict[str, Any]) -> dict[str, Any]:
    """The training run's settings (``TrainConfig``) in a card's ``provenance.config``: without what the
    export recorded there about the weights it wrote (``export_*``) and where a fine-tune started from
    (``init_weights_from``: the package's id, version, sha256 and iterations — the run's own settings keep
    ``init_weights`` and its pin), so a fine-tuned package's card reads back as a config."""
    return {k: v for k, v in card_config.items() if not k.startswith("export_") and k != "init_weights_from"}


def export_run(run_dir: str | Path, destination: str | Path, metrics: dict[str, Any] | None = None,
               performance: dict[str, Any] | None = None, overwrite: bool = False, log=print,
               weights_dtype: str = "float32", version: str | None = None, description: str | None = None,
               weights: str = "ema", model_id: str | None = None, replace_bundled: bool = False) -> Path:
    """Write the run's EMA weights (``weights="raw"``: the optimiser's current weights) as a model package.

    ``model_id`` defaults to :func:`default_model_id` and ``version`` to ``0.0.0-it<iteration>``; a bundled
    model's id or folder is refused unless ``replace_bundled`` (:func:`check_not_bundled`).

    ``raw`` exists for runs whose objective changed late: the EMA (decay 0.999) still carries ≈ 37 % of
    the weights from more than 1 000 iterations back. Which one was exported is recorded in the card.
    ``weights_dtype="float16"`` halves the file (the bundled-model limit is 25 MB); the weights are cast
    back to float32 when loaded."""
    run_dir = Path(run_dir)
    if weights == "model":  # the checkpoint's name for the optimiser's weights (accepted alias)
        weights = "raw"
    if weights not in ("ema", "raw"):
        raise ValueError("weights must be 'ema' or 'raw'")
    groups, state = load_checkpoint(run_dir)
    config = TrainConfig.model_validate(state["config"])
    iteration = int(state["iteration"])
    model_id = model_id or default_model_id(run_dir, iteration)
    version = version or f"0.0.0-it{iteration}"
    check_not_bundled(model_id, Path(destination), replace_bundled)
    dataset = load_dataset(config.dataset)
    profile = fit_source_profile(config, log)
    norm = config.normalization or default_normalization(dataset.modality)
    cite, terms = DATASET_CITATIONS.get(dataset.name, (dataset.name, config.model.training_data_terms))
    n_train = len(dataset.split(config.train_split))
    labels = label_table_from_dataset_labels(dataset.labels)
    card = {
        "id": model_id,
        "name": config.model.name,
        "version": version,
        "description": description or default_description(config, dataset),
        "license": config.model.license,
        "training_data": [{"name": cite, "cases": n_train, "terms": terms,
                           "citation": config.model.training_data_citation}],
        "anatomy": config.model.anatomy,
        "source": {"modality": dataset.modality, "sequence": config.model.sequence or dataset.channel},
        "labels": labels.model_dump(mode="json"),
        "network": state["network"],
        "spacing": list(config.spacing),
        "patch_size": list(config.patch_size),
        "orientation": "LPS",
        "normalization": norm.model_dump(mode="json"),
        "source_profile": profile.model_dump(mode="json"),
        "inference": {"overlap": 0.5, "blend_mode": "gaussian", "pre_smoothing_mm": config.pre_smoothing_mm},
        # no clean-up until one is chosen on validation cases: `python -m train choose-postprocessing
        # PACKAGE DATASET --write-card` (train/choose_postprocessing.py)
        "postprocessing": {"method": "none"},
        "provenance": {
            "augmentation": config.augmentation,
            # a fine-tuned run's weights saw the package's iterations before its own
            "iterations": int(state["iteration"]) + int((state.get("init_weights") or {}).get("iterations") or 0),
            "batch_size": config.batch_size * int(state.get("world_size", 1)),
            "date": _dt.date.today().isoformat(),
            "software": f"SRCSMSegmenter {__version__}",
            "device": state.get("device"),
            "config": json.loads(config.model_dump_json()),
        },
        "metrics": metrics or {},
        "performance": performance or {},
        "training_label_stats": measure_training_labels(config, labels).model_dump(mode="json"),
    }
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if weights_dtype not in dtypes:
        raise ValueError(f"weights_dtype must be one of {', '.join(dtypes)}")
    source = groups["ema"] if weights == "ema" else groups["model"]
    tensors = {k: v.to(dtypes[weights_dtype]) if v.is_floating_point() else v for k, v in source.items()}
    card["provenance"]["config"]["export_weights_dtype"] = weights_dtype
    card["provenance"]["config"]["export_weights"] = weights
    if state.get("init_weights"):
        card["provenance"]["config"]["init_weights_from"] = state["init_weights"]
    out = save_package(card, tensors, destination, overwrite=overwrite)
    log(f"exported {model_id} {version} ({weights} weights, iteration {iteration}) to {out}")
    return out
