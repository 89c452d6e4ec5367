"""Training configuration: a YAML/TOML file validated into :class:`TrainConfig`.

Every run writes its full, resolved configuration next to its checkpoints (``config.json``), and the
exported model card carries it, so a model can always be traced back to how it was made.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from SRCSMSegmenterLib.normalization import Normalization

Augmentation = Literal["none", "src", "src_hard", "rcnet_global", "randconv", "gin", "gin_ipa"]


class ModelInfo(BaseModel):
    """Catalogue metadata that ends up in the exported model card."""

    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    description: str = ""
    anatomy: str
    sequence: str | None = None
    license: str = "Weights: CC BY-NC-SA 4.0 (research use; inherits the training data's terms)"
    training_data_terms: str = "research use"
    training_data_citation: str | None = None


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dataset: str = Field(description="path of an nnU-Net raw dataset folder")
    train_split: str = "train"
    val_split: str | None = "val"
    model: ModelInfo
    spacing: tuple[float, float, float] = (2.4, 2.4, 2.4)
    patch_size: tuple[int, int, int] = (160, 128, 160)  # x, y, z voxels
    network: dict[str, Any] = Field(
        default_factory=lambda: {"architecture": "srcsm_unet",
                                 "parameters": {"channels": [64, 64, 64, 64, 64], "dropout": 0.1}})
    normalization: Normalization | None = None  # default: the modality's
    pre_smoothing_mm: float = 1.0
    augmentation: Augmentation = "src"
    spatial_augmentation: bool = True
    intensity_augmentation: bool = True
    crop_margin: float = Field(1.25, ge=1.0, description="input crop = patch × margin, before spatial warping")
    landmark_sampling: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of patches centred on the foreground bounding box (the paper's training ROI); "
                    "the rest are random patches with foreground oversampling. With the generalised Dice "
                    "loss a patch lacking a label gives almost no gradient, so large ROIs should be centred")
    foreground_oversampling: float = Field(0.33, ge=0.0, le=1.0)
    fov_augmentation: float = Field(
        0.0, ge=0.0, le=1.0,
        description="recipe v2: share of patches cut from a random field of view of the case (a z slab down to "
                    "fov_min_slab_mm and/or an in-plane crop down to fov_min_inplane of each extent), padded "
                    "outside as inference pads a scan, so that a network learns anatomy that ends at a border")
    fov_min_slab_mm: float = Field(40.0, gt=0.0)
    fov_min_inplane: float = Field(0.5, gt=0.0, le=1.0)
    fov_length_sampling: Literal["uniform", "log_uniform"] = Field(
        "uniform",
        description="how a field-of-view box's extent is drawn between its smallest (fov_min_slab_mm, "
                    "fov_min_inplane) and the whole case: uniform (recipe v2) or log_uniform, which shows the "
                    "thinnest views — where the robustness benchmark's losses are — about 2.5× as often on "
                    "abdominal scans (recipe v3 lead, docs/recipe-v2.md)")
    fov_padding: list[Literal["constant", "replicate"]] = Field(
        default_factory=lambda: ["constant"], min_length=1,
        description="how a patch is filled beyond what the case (or its field-of-view box) shows, one drawn per "
                    "patch: constant = the image's fill value and background (how every front end pads by "
                    "default); replicate = the edge voxels and their labels continued (a card's "
                    "inference.padding_mode: replicate). Both: a network in distribution under either, so the "
                    "card's padding can be chosen after training (docs/benchmarks.md, 'Padding a thin scan')")
    loss: Literal["gdl", "gdl_ce"] = Field(
        "gdl", description="gdl: generalised Dice loss (the paper); gdl_ce: plus voxel-wise cross-entropy (as "
                           "nnU-Net). GDL weights a label by 1/volume², so a large organ carries little weight: "
                           "an MR run with GDL alone left the liver as background for 2 000+ iterations while "
                           "kidneys and spleen reached 0.8 validation Dice; the cross-entropy term restores "
                           "a per-voxel gradient")
    init_weights: str | None = Field(
        None, description="a model package (folder or .zip) whose weights start the network and its EMA at "
                          "iteration 0: fine-tuning a released model with a changed recipe (train/init_weights.py). "
                          "Its network and label table must be the recipe's; the optimiser starts fresh, so keep "
                          "a warm-up")
    init_weights_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="the weights init_weights must hold (the card's weights.sha256): a recipe naming a bundled "
                    "package stays reproducible after that package is replaced by a newer release")
    iterations: int = Field(50_000, ge=1)
    batch_size: int = Field(1, ge=1)
    learning_rate: float = 5e-5
    lr_schedule: Literal["constant", "poly", "cosine"] = Field(
        "constant", description="constant (the paper); poly: nnU-Net's (1 - t)^0.9 decay; cosine: half a cosine "
                                "to 0; each after the linear warm-up")
    warmup_iterations: int = Field(0, ge=0, description="linear learning-rate warm-up from 1 % of the rate")
    l2: float = Field(5e-7, description="explicit L2 on conv kernels, added to the loss (paper: 1e-6 on 2·GDL)")
    ema_decay: float = 0.999
    clip_factor: float = 5.0
    consistency_weight: float = Field(10.0, description="GIN-IPA KL consistency weight (gin_ipa only)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    val_every: int = 1000
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0
    num_threads: int | None = None
    cache_dir: str = "cache"
    output_dir: str = "runs/model"

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        params = self.network.get("parameters", {})
        levels = len(params.get("channels", [0] * 5))
        div = 2 ** (levels - 1)
        if any(p % div for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {div} ({levels} U-Net levels)")
        return self

    def resolve_paths(self, base: Path) -> "TrainConfig":
        """Relative paths in a config file are relative to the current directory unless they only
        exist relative to the file (recipes ship with ``../shared/data`` style paths)."""
        updates = {}
        for key in ("dataset", "cache_dir", "output_dir", "init_weights"):
            if getattr(self, key) is None:
                continue
            p = Path(getattr(self, key))
            if not p.is_absolute() and not p.exists() and (base / p).exists():
                updates[key] = str((base / p).resolve())
        return self.model_copy(update=updates)


def _read_recipe(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} does not hold a mapping of settings (got {type(data).__name__})")
    return data


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings (``model``, ``network``, ``normalization``) merge key by key, any
    other value replaces the base's."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's settings with its ``base:`` recipes folded in.

    ``base: other_recipe.yaml`` (a path relative to the recipe's folder) makes a recipe a difference from
    another one, so a new recipe states only what it changes (recipe v3 = v2 + two sampling settings) and
    v2's settings keep one definition. Bases chain; a cycle or a missing base is an error naming the file.
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " → ".join(p.name for p in (*_seen, path))
        raise ValueError(f"recipe bases form a cycle ({chain}); remove one 'base:'")
    data = _read_recipe(path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if not base_path.is_file():
        raise ValueError(f"recipe {path.name}: its base '{base}' does not exist (looked for {base_path}); "
                         f"a base is named relative to the recipe's own folder")
    return _merge(read_recipe(base_path, (*_seen, path)), data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    data = read_recipe(path)
    for key, value in (overrides or {}).items():
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return TrainConfig.model_validate(data)
