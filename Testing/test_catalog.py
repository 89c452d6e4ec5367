"""The model catalogue: the shipped catalog.json, install from a URL (a real HTTP server on 127.0.0.1
serving a zip of a bundled package), and a user install that hides a bundled model never doing so silently."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from SRCSMSegmenterLib.catalog import CATALOG_FILE, Catalog, CatalogIndex
from SRCSMSegmenterLib.errors import ModelPackageError
from SRCSMSegmenterLib.modelpackage import package_to_zip_bytes

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "Resources" / "Models"
MODEL = "abdomen-mr-srcsm"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A zip of a bundled package served over HTTP on 127.0.0.1: (url, sha256)."""
    root = tmp_path_factory.mktemp("www")
    blob = package_to_zip_bytes(BUNDLED / MODEL)
    (root / f"{MODEL}.zip").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{MODEL}.zip", hashlib.sha256(blob).hexdigest()
    finally:
        server.shutdown()


def test_shipped_catalogue_exists_and_is_valid():
    f = BUNDLED / CATALOG_FILE
    assert f.is_file(), "README promises Resources/Models/catalog.json"
    idx = CatalogIndex.model_validate(json.loads(f.read_text(encoding="utf-8")))
    assert idx.schema_version == 1
    Catalog().index()  # the real catalogue loads


def test_install_from_url_verifies_the_sha256(tmp_path, served):
    url, digest = served
    cat = Catalog(bundled_dirs=[tmp_path / "none"], user_home=tmp_path / "home")
    with pytest.raises(ModelPackageError, match="--sha256"):
        cat.install(url)
    with pytest.raises(ModelPackageError, match="does not match the expected sha256"):
        cat.install(url, expected_sha256="0" * 64)
    assert not (cat.user_models_dir / MODEL).exists()
    entry = cat.install(url, expected_sha256=digest)
    assert entry.origin == "installed" and entry.id == MODEL and entry.shadows is None
    assert (entry.path / "weights.safetensors").read_bytes() == (BUNDLED / MODEL / "weights.safetensors").read_bytes()
    with pytest.raises(ModelPackageError, match="Could not download"):
        cat.install(url.replace(f"{MODEL}.zip", "missing.zip"), expected_sha256=digest, overwrite=True)


def test_downloadable_catalogue_entry_installs_by_id(tmp_path, served):
    url, digest = served
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / CATALOG_FILE).write_text(json.dumps({"schema_version": 1, "models": [
        {"id": MODEL, "name": "MR abdomen", "url": url, "sha256": digest}]}), encoding="utf-8")
    cat = Catalog(bundled_dirs=[bundled], user_home=tmp_path / "home")
    assert [(e.id, e.origin) for e in cat.entries()] == [(MODEL, "downloadable")]
    cat.install(MODEL)
    assert [(e.id, e.origin) for e in cat.entries()] == [(MODEL, "installed")]


def _srcsm(*args, env):
    return subprocess.run([sys.executable, "-m", "SRCSMSegmenterLib.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_cli_installs_by_url_and_says_what_it_shadows(tmp_path, served):
    """Installing a package with a bundled model's id hides the bundled one: install, list and info say so,
    and remove brings the bundled one back."""
    url, digest = served
    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "home"), SRCSM_BUNDLED_MODELS=str(BUNDLED))
    proc = _srcsm("models", "install", url, "--sha256", digest, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "hides it" in proc.stderr and f"srcsm models remove {MODEL}" in proc.stderr
    listed = {m["id"]: m for m in json.loads(_srcsm("models", "list", "--json", env=env).stdout)}
    assert listed[MODEL]["origin"] == "installed"
    bundled_version = json.loads((BUNDLED / MODEL / "model.json").read_text(encoding="utf-8"))["version"]
    assert listed[MODEL]["shadows"]["origin"] == "bundled" and listed[MODEL]["shadows"]["version"] == bundled_version
    assert listed["abdomen-ct-srcsm"]["shadows"] is None
    text = _srcsm("models", "list", env=env).stdout
    assert f"hides the bundled {MODEL} {bundled_version}" in text
    assert "hides the bundled" in _srcsm("models", "info", MODEL, env=env).stdout
    removed = _srcsm("models", "remove", MODEL, env=env)
    assert removed.returncode == 0 and "bundled model again" in removed.stdout
    listed = {m["id"]: m for m in json.loads(_srcsm("models", "list", "--json", env=env).stdout)}
    assert listed[MODEL]["origin"] == "bundled"


def test_cli_url_without_sha256_is_refused(tmp_path, served):
    url, _ = served
    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "home"), SRCSM_BUNDLED_MODELS=str(tmp_path))
    proc = _srcsm("models", "install", url, env=env)
    assert proc.returncode == 2 and "--sha256" in proc.stderr
    assert not (tmp_path / "home" / "models" / MODEL).exists()
