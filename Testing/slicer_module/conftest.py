"""Fixtures for the Slicer module tests (module logic on slicer-core, background runner, packaging).

Inherits ``slicer_app``, ``shared_data``, ``real_case`` and ``same_labels_physically`` from
Testing/conftest.py. Real data are read from shared/data at test time, never copied.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import typing
import unittest
from pathlib import Path

import pytest
from slicer_module_helpers import MODULE_FILE, load_real_volume

#: The untrained fallback model (see ``module_model``): CT source profile from this real case.
FALLBACK_PROFILE_CASE = ("Dataset501", "sabs_09")


def _untrained_package(destination: Path, real_case) -> Path:
    """A valid model package with an UNTRAINED tiny U-Net and a real CT source profile.

    Only for tests that check plumbing (files, geometry, names, progress), never segmentation
    quality: the network's output is arbitrary.
    """
    import torch
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.matching import SourceProfile
    from SRCSMSegmenterLib.modelpackage import save_package
    from SRCSMSegmenterLib.network import SRCSMUNet

    image, _, table = real_case(*FALLBACK_PROFILE_CASE)
    profile = SourceProfile.fit([read_volume(image).array], "CT")
    torch.manual_seed(0)
    params = {"channels": [4, 8], "out_channels": table.num_classes, "dropout": 0.0}
    net = SRCSMUNet(**params)
    card = {
        "id": "module-test-untrained",
        "name": "Untrained module-test model",
        "version": "0.0.1",
        "description": "Untrained network with a real CT source profile; for plumbing tests only.",
        "license": "Apache-2.0",
        "training_data": [{"name": "BTCV abdomen CT (one case, source profile only)", "cases": 1,
                           "terms": "Synapse data-use terms (research use)"}],
        "anatomy": "abdomen",
        "source": {"modality": "CT"},
        "labels": json.loads(table.model_dump_json()),
        "network": {"architecture": "srcsm_unet", "parameters": params},
        "spacing": (6.0, 6.0, 6.0),
        "patch_size": (32, 32, 32),
        "normalization": {"type": "ct_window", "window": (-125.0, 275.0)},
        "source_profile": json.loads(profile.model_dump_json()),
        "provenance": {"augmentation": "none (untrained)", "iterations": 0, "date": "2026-01-01"},
        "metrics": {"dice_cross_domain": {"liver": 0.123, "spleen": 0.456}},
        "performance": {"cpu_seconds": 42.5, "gpu_seconds": 3.25, "peak_memory_gb": 1.5},
    }
    return save_package(card, net.state_dict(), destination / card["id"])


@pytest.fixture(scope="session")
def module_model(request, tmp_path_factory, real_case) -> Path:
    """A model package folder for the module tests.

    The shared ``tiny_model`` (trained for a few iterations on real cases) when Testing/conftest.py
    provides it; otherwise an untrained package (``_untrained_package``). Tests using this fixture
    check plumbing, geometry and contracts — never accuracy.
    """
    try:
        return Path(request.getfixturevalue("tiny_model"))
    except pytest.FixtureLookupError:
        return _untrained_package(tmp_path_factory.mktemp("module_model"), real_case)


@pytest.fixture
def bundled_dir(tmp_path, module_model) -> Path:
    """A "Resources/Models" folder holding the model (as a link) and a catalog.json with one
    downloadable-only entry."""
    folder = tmp_path / "Models"
    folder.mkdir()
    os.symlink(module_model, folder / module_model.name, target_is_directory=True)
    (folder / "catalog.json").write_text(encoding="utf-8", data=json.dumps({"schema_version": 1, "models": [{
        "id": "heart-mr-download", "name": "Heart MR (download)", "description": "A downloadable model.",
        "url": "https://example.org/heart-mr-download.zip", "sha256": "0" * 64, "size_bytes": 25_000_000,
        "license": "CC BY 4.0"}]}))
    return folder


@pytest.fixture
def catalog(bundled_dir, tmp_path):
    from SRCSMSegmenterLib.catalog import Catalog

    return Catalog(bundled_dirs=[bundled_dir], user_home=tmp_path / "srcsm-home")


@pytest.fixture
def logic(slicer_app, catalog, tmp_path):
    from SRCSMSegmenterLib.module_logic import SRCSMModuleLogic

    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "srcsm-home"))
    return SRCSMModuleLogic(slicer_app.scene, catalog=catalog, environment=env, temp_root=tmp_path / "jobs")


@pytest.fixture
def model_card(module_model):
    from SRCSMSegmenterLib.modelpackage import load_package

    return load_package(module_model).card


@pytest.fixture
def mr_node(slicer_app, real_case):
    """CHAOS T2 case 2 (left-handed, slightly oblique direction) as Slicer loads it."""
    return load_real_volume(slicer_app, real_case, "Dataset502", "chaos_02")


# --------------------------------------------------------------------------- module-file shims


class _ShimModule:
    def __init__(self, parent):
        self.parent = parent


class _ShimLogic:
    """Enough of ScriptedLoadableModuleLogic: one parameter node per logic class in the scene."""

    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        name = type(self).__name__
        node = scene.GetSingletonNode(name, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag(name)
            node.SetName(name)
        return node


class _ShimTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        self.displayed = getattr(self, "displayed", []) + [message]


class _ShimWidget:
    def __init__(self, parent=None):
        self.parent = parent


def _shim_parameter_node_wrapper(cls):
    """Like Slicer's: resolves the annotations with typing.get_type_hints (so a broken annotation
    fails here too) and gives typed attributes with their defaults."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for key, value in defaults.items():
            setattr(self, key, value)

    cls.__init__ = __init__
    cls.allParameters = hints
    return cls


class _Choice:
    def __init__(self, choices):
        self.choices = list(choices)


def _shim_modules() -> dict[str, types.ModuleType]:
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = _ShimModule
    slm.ScriptedLoadableModuleLogic = _ShimLogic
    slm.ScriptedLoadableModuleTest = _ShimTest
    slm.ScriptedLoadableModuleWidget = _ShimWidget
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = _shim_parameter_node_wrapper
    pnw.Choice = _Choice
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": slm,
        "slicer.parameterNodeWrapper": pnw,
        "slicer.i18n": i18n,
    }


@pytest.fixture
def srcsm_module(slicer_app):
    """SRCSMSegmenter.py imported outside Slicer with small shims of qt, ScriptedLoadableModule,
    parameterNodeWrapper and i18n (SLICER-TESTING.md §3). The Widget class exists but cannot run."""
    import slicer  # noqa: F401 - the real namespace the shims are added to

    shims = _shim_modules()
    saved = {name: sys.modules.get(name) for name in shims}
    sys.modules.update(shims)
    try:
        spec = importlib.util.spec_from_file_location("SRCSMSegmenter_under_test", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
