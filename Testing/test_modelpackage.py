"""Model packages and the catalogue: schema, integrity, zip safety, install/remove."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from SRCSMSegmenterLib.catalog import Catalog
from SRCSMSegmenterLib.errors import ModelPackageError
from SRCSMSegmenterLib.modelpackage import (
    MODEL_JSON,
    WEIGHTS_FILE,
    load_package,
    package_to_zip_bytes,
    save_package,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _card(path: Path) -> dict:
    return json.loads((path / MODEL_JSON).read_text(encoding="utf-8"))


def test_load_folder_and_build_network(tiny_model):
    pkg = load_package(tiny_model)
    assert pkg.card.id == "tiny-ct"
    assert pkg.card.labels.names() == ["liver", "right kidney", "left kidney", "spleen"]
    assert pkg.card.source.modality == "CT"
    assert pkg.card.provenance.augmentation == "src"
    assert pkg.card.provenance.iterations == 300
    net = pkg.build_network()
    out = net(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 5, 32, 32, 32)
    # the EMA weights are what was exported
    assert sum(p.numel() for p in net.parameters()) > 0


def test_nothing_is_unpickled(tiny_model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used while loading a model package")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_package(tiny_model).build_network()


def test_zip_round_trip(tiny_model, tmp_path):
    z = tmp_path / "model.zip"
    z.write_bytes(package_to_zip_bytes(tiny_model))
    pkg = load_package(z)
    assert pkg.card == load_package(tiny_model).card
    # a zip whose package sits in one top-level folder also loads
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as zf:
        for f in tiny_model.iterdir():
            zf.write(f, f"tiny-ct/{f.name}")
    assert load_package(nested).card.id == "tiny-ct"


def test_tampered_weights_are_refused(tiny_model, tmp_path):
    pkg = _copy(tiny_model, tmp_path / "pkg")
    data = bytearray((pkg / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (pkg / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="checksum"):
        load_package(pkg)


def _edited_package(tiny_model: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny package whose model.json was changed by ``edit(card_dict)``."""
    pkg = _copy(tiny_model, tmp_path / "pkg")
    card = _card(pkg)
    edit(card)
    (pkg / MODEL_JSON).write_text(json.dumps(card), encoding="utf-8")
    return pkg


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(schema_version=2), "schema_version 2"),  # a model from a newer/older release
    (lambda c: c["labels"].update(labels=c["labels"]["labels"][:2]), "label table"),  # labels ≠ network outputs
    (lambda c: c["labels"]["labels"][1].update(value=7), "1..N"),  # non-consecutive label values
    (lambda c: c.update(surprise=1), "does not match the schema"),  # unknown field
], ids=["schema-version", "labels-vs-network", "non-consecutive-labels", "unknown-field"])
def test_invalid_cards_are_refused(tiny_model, tmp_path, edit, message):
    with pytest.raises(ModelPackageError, match=message):
        load_package(_edited_package(tiny_model, tmp_path, edit))


def test_bad_json(tiny_model, tmp_path):
    pkg = _copy(tiny_model, tmp_path / "pkg")
    (pkg / MODEL_JSON).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_package(pkg)


def test_weights_that_do_not_fit_the_architecture(tiny_model, tmp_path):
    card = _card(tiny_model)
    del card["weights"], card["schema_version"]
    card["network"]["parameters"]["channels"] = [8, 16, 64]
    state = load_package(tiny_model).state_dict()
    out = save_package(card, state, tmp_path / "pkg")
    with pytest.raises(ModelPackageError, match="do not fit its network"):
        load_package(out).build_network()


def test_zip_slip_is_refused(tiny_model, tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in tiny_model.iterdir():
            zf.write(f, f.name)
        zf.writestr("../../escaped.txt", "gotcha")
    with pytest.raises(ModelPackageError, match="escape"):
        load_package(z)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_corrupted_zip(tmp_path):
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelPackageError, match="not a readable zip"):
        load_package(z)


def test_missing_weights(tiny_model, tmp_path):
    pkg = _copy(tiny_model, tmp_path / "pkg")
    (pkg / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelPackageError, match="missing"):
        load_package(pkg)


def test_save_refuses_to_overwrite(tiny_model, tmp_path):
    card = _card(tiny_model)
    del card["weights"], card["schema_version"]
    state = load_package(tiny_model).state_dict()
    out = save_package(card, state, tmp_path / "pkg")
    with pytest.raises(ModelPackageError, match="already exists"):
        save_package(card, state, out)
    zipped = save_package(card, state, tmp_path / "pkg.zip")
    assert load_package(zipped).card.weights.sha256 == load_package(out).card.weights.sha256


# ------------------------------------------------------------------------------------ catalog
@pytest.fixture
def catalog(tmp_path, tiny_model) -> Catalog:
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copytree(tiny_model, bundled / "tiny-ct")
    return Catalog(bundled_dirs=[bundled], user_home=tmp_path / "home")


def _zip_with_id(tiny_model: Path, tmp_path: Path, model_id: str) -> Path:
    card = _card(tiny_model)
    del card["weights"], card["schema_version"]
    card["id"] = model_id
    return save_package(card, load_package(tiny_model).state_dict(), tmp_path / f"{model_id}.zip")


def test_catalog_lists_bundled_installed_downloadable(catalog, tiny_model, tmp_path):
    z = _zip_with_id(tiny_model, tmp_path, "user-model")
    index = {"schema_version": 1, "models": [
        {"id": "remote-model", "name": "Remote", "url": "https://example.invalid/remote-model.zip",
         "sha256": "0" * 64}]}
    (catalog.bundled_dirs[0] / "catalog.json").write_text(json.dumps(index), encoding="utf-8")
    catalog.install(z)
    origins = {e.id: e.origin for e in catalog.entries()}
    assert origins == {"tiny-ct": "bundled", "user-model": "installed", "remote-model": "downloadable"}
    assert catalog.resolve("user-model").card.id == "user-model"
    with pytest.raises(ModelPackageError, match="not installed"):
        catalog.resolve("remote-model")


def test_install_verifies_sha256_and_never_half_installs(catalog, tiny_model, tmp_path):
    z = _zip_with_id(tiny_model, tmp_path, "user-model")
    with pytest.raises(ModelPackageError, match="sha256"):
        catalog.install(z, expected_sha256="1" * 64)
    assert not (catalog.user_models_dir / "user-model").exists()
    good = hashlib.sha256(z.read_bytes()).hexdigest()
    entry = catalog.install(z, expected_sha256=good)
    assert entry.path == catalog.user_models_dir / "user-model"
    with pytest.raises(ModelPackageError, match="already installed"):
        catalog.install(z)
    catalog.install(z, overwrite=True)
    catalog.remove("user-model")
    assert not (catalog.user_models_dir / "user-model").exists()
    with pytest.raises(ModelPackageError, match="bundled"):
        catalog.remove("tiny-ct")


def test_download_is_verified(catalog, tiny_model, tmp_path):
    """A downloadable entry (file:// URL, no network) is fetched, checked against its sha256, installed."""
    z = _zip_with_id(tiny_model, tmp_path, "remote-model")
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    for sha, ok in (("2" * 64, False), (digest, True)):
        index = {"schema_version": 1, "models": [
            {"id": "remote-model", "name": "Remote", "url": z.as_uri(), "sha256": sha}]}
        (catalog.bundled_dirs[0] / "catalog.json").write_text(json.dumps(index), encoding="utf-8")
        if ok:
            entry = catalog.install("remote-model")
            assert entry.origin == "installed" and load_package(entry.path).card.id == "remote-model"
        else:
            with pytest.raises(ModelPackageError, match="sha256"):
                catalog.install("remote-model")
            assert not (catalog.user_models_dir / "remote-model").exists()


def test_broken_package_does_not_hide_others(catalog, tmp_path):
    (catalog.bundled_dirs[0] / "broken.zip").write_bytes(b"garbage")
    ids = {e.id: e for e in catalog.entries()}
    assert "tiny-ct" in ids and ids["broken"].card is None


@pytest.mark.parametrize("dataset", ["Dataset503_CardiacBSSFP"])
def test_structures_that_touch_get_colours_an_annotator_can_tell_apart(shared_data, dataset):
    """Segment Editor users correct one structure against its neighbour: labels whose reference masks
    touch (6-neighbourhood) in a real case must differ clearly in colour. (The abdominal organs keep
    Slicer's GenericAnatomyColors, which users know from other extensions, although liver and kidney
    are close there: 0.19 apart.)"""
    import json

    from scipy import ndimage

    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.labels import label_table_from_dataset_labels

    folder = shared_data / dataset
    table = label_table_from_dataset_labels(json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"])
    colours = {lab.value: np.array(lab.color) for lab in table.labels}
    ref = read_volume(sorted((folder / "labelsTr").glob("*.nii.gz"))[0]).array
    touching = set()
    for v in colours:
        grown = ndimage.binary_dilation(ref == v)
        touching |= {(v, int(w)) for w in np.unique(ref[grown]) if w not in (0, v)}
    assert touching
    for a, b in touching:
        assert np.linalg.norm(colours[a] - colours[b]) > 0.3, (table.labels[a - 1].name, table.labels[b - 1].name)
