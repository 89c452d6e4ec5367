"""Model packages: the contract between ``train`` and the front ends.

A package is a folder or a ``.zip`` holding

* ``model.json`` — a versioned schema (:class:`ModelCard`), validated on load;
* ``weights.safetensors`` — tensors only. Nothing is ever unpickled.

``model.json`` records the sha256 of the weights file, so a package whose weights were swapped or
corrupted is refused. Zip packages are read in memory; entries with absolute paths or ``..`` are
refused before anything is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ModelPackageError
from .field_of_view import FieldOfViewLimits
from .labels import LabelTable
from .matching import SourceProfile
from .normalization import Normalization
from .postprocess import PostProcessing
from .plausibility import TrainingLabelStats

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
#: Refuse absurdly large members (zip bombs) before reading them into memory.
MAX_MEMBER_BYTES = 2 * 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DatasetInfo(_Strict):
    name: str
    cases: int | None = None
    terms: str = Field(description="licence / data-use terms of the training data")
    citation: str | None = None
    url: str | None = None


class SourceModality(_Strict):
    modality: Literal["CT", "MR"]
    sequence: str | None = Field(None, description="e.g. T2-SPIR, bSSFP (MR only)")


class NetworkSpec(_Strict):
    architecture: str
    parameters: dict[str, Any]


#: Model grids up to this many voxels (after padding to the network's divisor) run as one window under
#: ``strategy="whole_grid"``: a 176×160×192 cardiac grid (5.4 M) peaks at ≈ 2 GiB on the CPU in bf16.
WHOLE_GRID_MAX_VOXELS = 8_000_000


class InferenceSpec(_Strict):
    """How the model is applied (SRCSM §5, with our sliding-window departure).

    ``strategy``: ``sliding_window`` runs ``patch_size`` windows with Gaussian blending (MONAI's);
    ``whole_grid`` runs the fully convolutional network once over the whole model grid (padded to its
    divisor) when it holds at most ``max_grid_voxels`` voxels, else falls back to the sliding window.
    One pass sees the whole field of view and has no window seams; which strategy a model uses is
    measured on its validation cases (``python -m train choose-postprocessing``), recorded in
    ``chosen_by``. Cards without the field keep the sliding window.
    """

    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    pre_smoothing_mm: float = Field(1.0, ge=0.0, description="Gaussian σ applied before resampling (§3.4)")
    strategy: Literal["sliding_window", "whole_grid"] = "sliding_window"
    max_grid_voxels: int = Field(WHOLE_GRID_MAX_VOXELS, ge=1,
                                 description="whole_grid only: larger (padded) grids use the sliding window")
    chosen_by: str | None = Field(None, description="how the strategy was chosen (measurements)")
    padding_mode: Literal["constant", "replicate"] = Field(
        "constant", description="how a model grid smaller than the network's window (a thin scan) is padded: "
                                "constant = the grid's minimum (air, background), replicate = its edge voxels "
                                "continued (MONAI's padding_mode)")
    padding_chosen_by: str | None = Field(None, description="how the padding was chosen (measurements on "
                                                              "validation slabs: python -m train choose-padding)")


class Provenance(_Strict):
    augmentation: str
    iterations: int = Field(ge=0)
    batch_size: int | None = None
    date: str
    software: str | None = None
    device: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class WeightsSpec(_Strict):
    file: str = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["safetensors"] = "safetensors"


class ModelCard(_Strict):
    """Everything a front end needs to know about a model (``model.json``)."""

    schema_version: int
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="catalogue id, lower case")
    name: str
    version: str
    description: str
    license: str
    training_data: list[DatasetInfo]
    anatomy: str
    source: SourceModality
    labels: LabelTable
    network: NetworkSpec
    spacing: tuple[float, float, float] = Field(description="model grid spacing x,y,z (mm)")
    patch_size: tuple[int, int, int] = Field(description="sliding-window patch x,y,z (voxels)")
    orientation: Literal["LPS"] = Field("LPS", description="model grid axes are world (LPS) aligned")
    normalization: Normalization
    source_profile: SourceProfile
    inference: InferenceSpec = InferenceSpec()
    postprocessing: PostProcessing = Field(
        PostProcessing(), description="default clean-up of the predictions, chosen on validation cases "
                                      "(cards without it: none)")
    provenance: Provenance
    metrics: dict[str, Any] = Field(default_factory=dict, description="measured accuracy, free form")
    performance: dict[str, Any] = Field(default_factory=dict, description="measured time/memory, free form")
    training_label_stats: TrainingLabelStats | None = Field(
        None, description="per-label volume ranges of the training labels (the plausibility check's data)")
    field_of_view: FieldOfViewLimits | None = Field(
        None, description="the robustness benchmark's slabs per dataset: how thin a field of view the model "
                          "still segments reliably (the thin-view warning's data; absent: no warning)")
    weights: WeightsSpec

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported by this version of SRCSMSegmenter (expects "
                f"{SCHEMA_VERSION}); update the extension or re-export the model"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if any(p < 8 for p in self.patch_size):
            raise ValueError(f"patch_size must be at least 8 voxels per axis, got {self.patch_size}")
        out = self.network.parameters.get("out_channels")
        if out is not None and out != self.labels.num_classes:
            raise ValueError(
                f"the network predicts {out} classes but the label table has {self.labels.num_classes} "
                f"(background + {len(self.labels.labels)} labels)"
            )
        if self.source_profile.modality != self.source.modality:
            raise ValueError("source_profile.modality must equal source.modality")
        return self


@dataclass
class ModelPackage:
    """A validated model package: its card, where it came from, and its (lazily read) weights."""

    card: ModelCard
    location: Path
    _weights_bytes: bytes

    @property
    def id(self) -> str:
        return self.card.id

    def state_dict(self) -> dict[str, Any]:
        """The network weights as torch tensors (safetensors: no code execution on load)."""
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(self._weights_bytes)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelPackageError(
                f"The weights of model '{self.id}' at '{self.location}' cannot be read ({exc}). "
                f"Reinstall the model package."
            ) from exc

    def build_network(self):
        """The network with its weights loaded, in eval mode, on the CPU."""
        from .network import build_network

        net = build_network(self.card.network.architecture, dict(self.card.network.parameters))
        try:
            net.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ModelPackageError(
                f"The weights of model '{self.id}' do not fit its network description "
                f"({str(exc).splitlines()[0]}). The package is inconsistent; re-export it."
            ) from exc
        return net.eval()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _parse_card(raw: bytes, where: str) -> ModelCard:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{where}: model.json is not valid JSON ({exc}). The package is corrupted.") from exc
    if not isinstance(data, dict):
        raise ModelPackageError(f"{where}: model.json must hold a JSON object.")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelPackageError(
            f"{where}: model.json has schema_version {version!r}, but this SRCSMSegmenter reads version "
            f"{SCHEMA_VERSION}. Update the extension (newer models) or re-export the model with this version's "
            f"`srcsm-train export`."
        )
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ModelPackageError(f"{where}: model.json does not match the schema ({problems}).") from exc


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not (p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]))


def _read_zip(path: Path) -> tuple[bytes, dict[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelPackageError(f"'{path}' is not a readable zip file ({exc}). Download it again.") from exc
    with zf:
        infos = zf.infolist()
        bad = [i.filename for i in infos if not _safe_member(i.filename)]
        if bad:
            raise ModelPackageError(
                f"'{path}' has entries that would escape the package folder ({', '.join(bad[:3])}). "
                f"Refusing to read it: the file is malformed or malicious."
            )
        # A package may sit at the zip root or inside one top-level folder.
        cards = [i for i in infos if PurePosixPath(i.filename).name == MODEL_JSON]
        if len(cards) != 1:
            raise ModelPackageError(
                f"'{path}' must contain exactly one model.json (found {len(cards)}). Is it a model package?"
            )
        root = PurePosixPath(cards[0].filename).parent
        files: dict[str, bytes] = {}
        for info in infos:
            p = PurePosixPath(info.filename)
            if info.is_dir() or p.parent != root:
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise ModelPackageError(f"'{path}': member '{info.filename}' is implausibly large; refusing.")
            try:
                files[p.name] = zf.read(info)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                raise ModelPackageError(f"'{path}': member '{info.filename}' is corrupted ({exc}).") from exc
    return files[MODEL_JSON], files


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Read and verify a model package (folder or ``.zip``)."""
    path = Path(path)
    where = f"Model package '{path}'"
    if not path.exists():
        raise ModelPackageError(f"{where} does not exist. Check the path, or list models with `srcsm models list`.")
    if path.is_dir():
        card_path = path / MODEL_JSON
        if not card_path.is_file():
            raise ModelPackageError(f"{where} has no model.json. Is it a model package folder?")
        raw = card_path.read_bytes()
        card = _parse_card(raw, where)
        weights_path = path / card.weights.file
        if not _safe_member(card.weights.file) or not weights_path.is_file():
            raise ModelPackageError(f"{where}: weights file '{card.weights.file}' is missing. Reinstall the package.")
        weights = weights_path.read_bytes()
    else:
        raw, files = _read_zip(path)
        card = _parse_card(raw, where)
        if card.weights.file not in files:
            raise ModelPackageError(f"{where}: weights file '{card.weights.file}' is missing from the zip.")
        weights = files[card.weights.file]
    digest = sha256_bytes(weights)
    if digest != card.weights.sha256:
        raise ModelPackageError(
            f"{where}: the weights do not match the checksum recorded in model.json (sha256 {digest[:12]}… "
            f"≠ {card.weights.sha256[:12]}…). The package is corrupted or was modified; reinstall it from a "
            f"trusted source."
        )
    return ModelPackage(card=card, location=path, _weights_bytes=weights)


def save_package(card_data: dict[str, Any], state_dict: dict[str, Any], destination: str | os.PathLike[str],
                 overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a package folder (or ``.zip`` if ``destination`` ends with .zip) atomically.

    ``card_data`` is everything of :class:`ModelCard` except ``weights``, which is filled in here
    from the serialised tensors.
    """
    from safetensors.torch import save as save_safetensors

    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise ModelPackageError(f"'{destination}' already exists; pass overwrite=True (--overwrite) to replace it.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    data = dict(card_data)
    data["schema_version"] = SCHEMA_VERSION
    data["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_bytes(weights), "format": "safetensors"}
    card = ModelCard.model_validate(data)  # validate before writing anything
    card_bytes = (card.model_dump_json(indent=2) + "\n").encode()
    files = {MODEL_JSON: card_bytes, WEIGHTS_FILE: weights, **(extra_files or {})}
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        if destination.suffix == ".zip":
            target = tmp / destination.name
            with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, blob in files.items():
                    zf.writestr(name, blob)
            if destination.exists():
                destination.unlink()
            os.replace(target, destination)
        else:
            for name, blob in files.items():
                (tmp / name).write_bytes(blob)
            swap_folder_in(tmp, destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return destination


def swap_folder_in(complete: Path, destination: Path) -> None:
    """Move the finished folder ``complete`` to ``destination`` (a sibling), replacing what is there:
    the old folder is renamed aside first and removed only once the new one is in place, so a reader
    never sees a half-written package."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(destination, old)
        os.replace(complete, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, destination)


def read_card_bytes(data: bytes, where: str = "model.json") -> ModelCard:
    """Validate a model.json given as bytes (used by the catalogue for downloadable entries)."""
    return _parse_card(data, where)


def package_to_zip_bytes(path: str | os.PathLike[str]) -> bytes:
    """Zip a package folder in memory (for ``srcsm models export`` and tests)."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.iterdir()):
            if f.is_file():
                zf.write(f, f.name)
    return buf.getvalue()
