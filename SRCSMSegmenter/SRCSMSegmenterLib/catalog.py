"""The model catalogue: bundled models, models the user installed, and downloadable ones.

* **bundled** — package folders/zips under the extension's ``Resources/Models`` (read-only);
* **installed** — package folders in the per-user models folder (``$SRCSM_HOME/models``, default
  ``~/.local/share/srcsm/models`` on Linux, ``~/Library/Application Support/srcsm`` on macOS,
  ``%LOCALAPPDATA%\\srcsm`` on Windows);
* **downloadable** — entries of ``Resources/Models/catalog.json`` (id, URL, sha256). Downloads are
  verified against the sha256 before anything is installed, and a zip that was fetched elsewhere can
  be installed offline (``srcsm models install FILE.zip``), verified the same way when its id is listed.
  Any package zip can also be installed from a URL with its checksum
  (``srcsm models install URL --sha256 HEX``).

A user-installed model with a bundled model's id takes precedence over it; the entry says which bundled
model it shadows, so that this never happens silently.

``catalog.json`` format (``schema_version`` 1; ``models`` may be empty)::

    {"schema_version": 1,
     "models": [{"id": "my-model", "name": "…", "description": "…", "license": "…",
                 "url": "https://…/my-model-1.0.0.zip", "sha256": "<64 hex digits of the zip>",
                 "size_bytes": 12345678}]}

Adding a model is a JSON edit (the catalogue is data, as in SlicerMONAIAuto3DSeg).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ModelPackageError
from .modelpackage import MODEL_JSON, ModelCard, ModelPackage, load_package, sha256_file

CATALOG_FILE = "catalog.json"


class DownloadableModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    name: str
    description: str = ""
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = None
    license: str = ""


class CatalogIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1
    models: list[DownloadableModel] = Field(default_factory=list)


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    name: str
    origin: Literal["bundled", "installed", "downloadable"]
    path: Path | None
    card: ModelCard | None
    download: DownloadableModel | None = None
    #: The bundled model this user-installed one hides (same id): a user's install takes precedence, which
    #: must never happen unnoticed (``srcsm models list`` and ``install`` say so).
    shadows: "CatalogEntry | None" = None

    @property
    def available(self) -> bool:
        return self.path is not None

    @property
    def version(self) -> str:
        return self.card.version if self.card else "?"


def default_user_home() -> Path:
    if os.environ.get("SRCSM_HOME"):
        return Path(os.environ["SRCSM_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "srcsm"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "srcsm"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "srcsm"


def default_bundled_dirs() -> list[Path]:
    """Where bundled packages live: the source tree (``<repo>/Resources/Models``) or, inside an
    installed Slicer extension, ``<module>/Resources/Models``; ``$SRCSM_BUNDLED_MODELS`` overrides."""
    if os.environ.get("SRCSM_BUNDLED_MODELS"):
        return [Path(p) for p in os.environ["SRCSM_BUNDLED_MODELS"].split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    candidates = [here.parent.parent / "Resources" / "Models", here.parent / "Resources" / "Models"]
    return [c for c in candidates if c.is_dir()]


def _is_package(path: Path) -> bool:
    return (path.is_dir() and (path / MODEL_JSON).is_file()) or (path.is_file() and path.suffix == ".zip")


class Catalog:
    def __init__(self, bundled_dirs: list[Path] | None = None, user_home: Path | None = None) -> None:
        self.bundled_dirs = default_bundled_dirs() if bundled_dirs is None else [Path(p) for p in bundled_dirs]
        self.user_home = default_user_home() if user_home is None else Path(user_home)

    @property
    def user_models_dir(self) -> Path:
        return self.user_home / "models"

    # ---------------------------------------------------------------------------------- listing
    def index(self) -> CatalogIndex:
        """Merged downloadable entries from every bundled folder's catalog.json."""
        models: dict[str, DownloadableModel] = {}
        for d in self.bundled_dirs:
            f = d / CATALOG_FILE
            if not f.is_file():
                continue
            try:
                idx = CatalogIndex.model_validate(json.loads(f.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ModelPackageError(f"The model catalogue '{f}' is malformed ({exc}). Reinstall the extension.") from exc
            for m in idx.models:
                models.setdefault(m.id, m)
        return CatalogIndex(models=list(models.values()))

    def _scan(self, folder: Path, origin: Literal["bundled", "installed"]) -> list[CatalogEntry]:
        out = []
        if not folder.is_dir():
            return out
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not _is_package(p):
                continue
            try:
                pkg = load_package(p)
            except ModelPackageError:
                # A broken package must not hide the others; `srcsm models info` reports its problem.
                out.append(CatalogEntry(id=p.stem, name=f"{p.name} (unreadable)", origin=origin, path=p, card=None))
                continue
            out.append(CatalogEntry(id=pkg.card.id, name=pkg.card.name, origin=origin, path=p, card=pkg.card))
        return out

    def bundled_entries(self) -> list[CatalogEntry]:
        """The models shipped with the extension (first folder wins for a repeated id)."""
        seen: dict[str, CatalogEntry] = {}
        for d in self.bundled_dirs:
            for entry in self._scan(d, "bundled"):
                seen.setdefault(entry.id, entry)
        return list(seen.values())

    def entries(self) -> list[CatalogEntry]:
        """Installed models first (a user's install overrides a bundled model of the same id, and its
        entry's ``shadows`` names the bundled one it hides)."""
        seen: dict[str, CatalogEntry] = {}
        for entry in self._scan(self.user_models_dir, "installed"):
            seen.setdefault(entry.id, entry)
        for entry in self.bundled_entries():
            if entry.id in seen:
                if seen[entry.id].origin == "installed" and seen[entry.id].shadows is None:
                    seen[entry.id] = dataclasses.replace(seen[entry.id], shadows=entry)
                continue
            seen[entry.id] = entry
        for m in self.index().models:
            if m.id not in seen:
                seen[m.id] = CatalogEntry(id=m.id, name=m.name, origin="downloadable", path=None, card=None, download=m)
        return list(seen.values())

    def find(self, model_id: str) -> CatalogEntry:
        for e in self.entries():
            if e.id == model_id:
                return e
        known = ", ".join(e.id for e in self.entries()) or "none"
        raise ModelPackageError(f"No model with id '{model_id}'. Known models: {known}. See `srcsm models list`.")

    def resolve(self, id_or_path: str | os.PathLike[str]) -> ModelPackage:
        """A model package from a catalogue id or a path to a package folder/zip."""
        p = Path(id_or_path)
        if p.exists():
            return load_package(p)
        entry = self.find(str(id_or_path))
        if entry.path is None:
            raise ModelPackageError(
                f"Model '{entry.id}' is downloadable but not installed. Install it with "
                f"`srcsm models install {entry.id}` (or from a zip you downloaded: `srcsm models install FILE.zip`)."
            )
        return load_package(entry.path)

    # ------------------------------------------------------------------------- install/remove
    def install(self, source: str | os.PathLike[str], expected_sha256: str | None = None, overwrite: bool = False,
                progress: Callable[[float, str], None] | None = None) -> CatalogEntry:
        """Install from a local package (zip/folder), a downloadable catalogue id, or an ``http(s)://`` /
        ``file://`` URL of a package zip (which needs ``expected_sha256``: a download is never trusted
        unverified). Downloads are verified before anything is installed."""
        if _is_url(str(source)):
            if not expected_sha256:
                raise ModelPackageError(
                    f"Installing from a URL needs the package's sha256, so that a corrupted or tampered download "
                    f"is refused: `srcsm models install {source} --sha256 HEX` (the publisher lists the checksum)."
                )
            if not _SHA256.fullmatch(expected_sha256.lower()):
                raise ModelPackageError(f"--sha256 must be 64 hexadecimal digits, got '{expected_sha256}'.")
            name = Path(urllib.parse.urlparse(str(source)).path).name or "model.zip"
            return self._install_download(str(source), name, expected_sha256, overwrite, progress)
        p = Path(source)
        if p.exists():
            return self._install_local(p, expected_sha256, overwrite)
        entry = {m.id: m for m in self.index().models}.get(str(source))
        if entry is None:
            raise ModelPackageError(
                f"'{source}' is neither a file nor a downloadable model id. Give the path of a model package "
                f"(.zip or folder) or one of: {', '.join(m.id for m in self.index().models) or 'none listed'}."
            )
        return self._install_download(entry.url, f"{entry.id}.zip", entry.sha256, overwrite, progress)

    def _install_download(self, url: str, name: str, sha256: str, overwrite: bool,
                          progress: Callable[[float, str], None] | None) -> CatalogEntry:
        self.user_home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.user_home) as tmp:
            target = Path(tmp) / (name if name.endswith(".zip") else f"{name}.zip")
            try:
                _download(url, target, progress)
            except (OSError, ValueError) as exc:  # URLError is an OSError; a malformed URL a ValueError
                raise ModelPackageError(
                    f"Could not download a model from {url} ({exc}). Check the URL and the network, or "
                    f"download the zip elsewhere and run `srcsm models install FILE.zip --sha256 HEX`."
                ) from exc
            return self._install_local(target, sha256, overwrite)

    def _install_local(self, path: Path, expected_sha256: str | None, overwrite: bool) -> CatalogEntry:
        if path.is_file():
            digest = sha256_file(path)
            pkg = load_package(path)  # validates schema, checksum of the weights and zip entries
            # a zip downloaded by hand from the catalogue URL is verified against the catalogue's sha256
            listed = {m.id: m for m in self.index().models}.get(pkg.card.id)
            if expected_sha256 is None and listed is not None and listed.url.endswith(path.name):
                expected_sha256 = listed.sha256
            if expected_sha256 is not None and digest != expected_sha256.lower():
                raise ModelPackageError(
                    f"'{path.name}' does not match the expected sha256 ({digest[:12]}… ≠ {expected_sha256[:12]}…). "
                    f"The download is corrupted or was tampered with; download it again from the catalogue URL."
                )
        else:
            pkg = load_package(path)
        dest = self.user_models_dir / pkg.card.id
        if dest.exists() and not overwrite:
            raise ModelPackageError(
                f"Model '{pkg.card.id}' is already installed at '{dest}'. Remove it first "
                f"(`srcsm models remove {pkg.card.id}`) or pass --overwrite."
            )
        self.user_models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.card.id}.", dir=self.user_models_dir))
        try:
            (tmp / MODEL_JSON).write_bytes((pkg.card.model_dump_json(indent=2) + "\n").encode())
            (tmp / pkg.card.weights.file).write_bytes(pkg._weights_bytes)
            load_package(tmp)  # re-verify what we wrote
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shadowed = next((e for e in self.bundled_entries() if e.id == pkg.card.id), None)
        return CatalogEntry(id=pkg.card.id, name=pkg.card.name, origin="installed", path=dest, card=pkg.card,
                            shadows=shadowed)

    def remove(self, model_id: str) -> Path:
        dest = self.user_models_dir / model_id
        if not dest.is_dir():
            bundled = [e for e in self.entries() if e.id == model_id and e.origin == "bundled"]
            if bundled:
                raise ModelPackageError(f"Model '{model_id}' is bundled with the extension and cannot be removed.")
            raise ModelPackageError(f"Model '{model_id}' is not installed in '{self.user_models_dir}'.")
        shutil.rmtree(dest)
        return dest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in ("http", "https", "file") and "://" in text


def _download(url: str, target: Path, progress: Callable[[float, str], None] | None) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:  # noqa: S310 (verified by sha256 before use)
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while True:
            block = response.read(1 << 20)
            if not block:
                break
            out.write(block)
            done += len(block)
            if progress and total:
                progress(done / total, f"Downloading {done / 1e6:.1f}/{total / 1e6:.1f} MB")
