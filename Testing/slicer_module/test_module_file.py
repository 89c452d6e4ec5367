"""SRCSMSegmenter.py itself, imported outside Slicer with small shims (SLICER-TESTING.md §3).

The widget needs Qt and cannot run here; the module metadata, the parameter node, the module's
Logic class and its self-test's honesty (skip/fail when the bundled model is missing) are checked.
"""

from __future__ import annotations

import inspect
import os
import stat
import types
import unittest

import pytest


@pytest.fixture
def fake_slicer_app(tmp_path, monkeypatch):
    """``slicer.app`` with what the module's logic reads: temporaryPath, slicerHome (with a
    PythonSlicer launcher in bin/) and the startup environment."""
    import slicer

    home = tmp_path / "Slicer-5.12"
    (home / "bin").mkdir(parents=True)
    launcher = home / "bin" / "PythonSlicer"
    launcher.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "empty-path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))  # PythonSlicer is not on PATH: use slicerHome

    class _Env:
        def __init__(self, values):
            self._values = values

        def keys(self):
            return list(self._values)

        def value(self, key):
            return self._values[key]

    app = types.SimpleNamespace(temporaryPath=str(tmp_path / "slicer-tmp"), slicerHome=str(home),
                                startupEnvironment=lambda: _Env({"HOME": "/home/user", "LANG": "C.UTF-8"}),
                                processEvents=lambda: None)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    return app


def test_module_metadata(srcsm_module):
    parent = types.SimpleNamespace()
    srcsm_module.SRCSMSegmenter(parent)
    assert parent.title == "SRCSM Segmenter"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors and parent.dependencies == []
    help_text = parent.helpText
    assert "semantic-aware random convolutions (SRC)" in help_text and "source matching (SM)" in help_text
    assert "https://github.com/srcsm-segmenter/SlicerSRCSMSegmenter#readme" in help_text
    ack = parent.acknowledgementText
    for piece in ("Thaler", "Urschler", "Koziński", "Gsell", "Plank", "Štern",
                  ("Semantic-aware Random Convolution and Source Matching for Domain Generalization in Medical "
                   "Image Segmentation"), "IEEE Access 14 (2026) 64338–64356", "10.1109/ACCESS.2026.3687116"):
        assert piece in ack, piece


def test_parameter_node_fields_and_defaults(srcsm_module, slicer_app):
    logic = srcsm_module.SRCSMSegmenterLogic()
    p = logic.getParameterNode()
    assert p.parameterNode.IsA("vtkMRMLScriptedModuleNode")
    assert (p.inputVolume, p.modelId, p.sourceMatching, p.device, p.roi, p.outputSegmentation, p.cleanUp) == (
        None, "", True, "auto", None, None, False)
    hints = srcsm_module.SRCSMSegmenterParameterNode.allParameters
    import slicer

    assert hints["inputVolume"] is slicer.vtkMRMLScalarVolumeNode
    assert hints["roi"] is slicer.vtkMRMLMarkupsROINode
    assert hints["outputSegmentation"] is slicer.vtkMRMLSegmentationNode
    assert hints["device"].__metadata__[0].choices == list(srcsm_module.DEVICES)


def test_logic_builds_the_request_and_the_core_logic(srcsm_module, slicer_app, fake_slicer_app, tmp_path):
    from SRCSMSegmenterLib.module_logic import SegmentationRequest, SRCSMModuleLogic

    logic = srcsm_module.SRCSMSegmenterLogic()
    p = logic.getParameterNode()
    volume = slicer_app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    roi = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "r")
    p.inputVolume, p.modelId, p.sourceMatching, p.device, p.roi = volume, "abdomen-ct-srcsm", False, "cpu", roi
    request = logic.request(p)
    assert request == SegmentationRequest(volume, "abdomen-ct-srcsm", source_matching=False, device="cpu",
                                          roi_node=roi, output_node=None, overwrite=False, clean_up=False)
    assert logic.request(p, overwrite=True).overwrite

    core = logic.core
    assert isinstance(core, SRCSMModuleLogic) and logic.core is core  # created once
    assert core.scene is slicer_app.scene
    assert core.python_executable == os.path.join(fake_slicer_app.slicerHome, "bin", "PythonSlicer")
    assert core.temp_root == tmp_path / "slicer-tmp" / "SRCSMSegmenter"
    assert core.environment == {"HOME": "/home/user", "LANG": "C.UTF-8"}


def test_widget_accepts_an_injected_logic(srcsm_module):
    params = inspect.signature(srcsm_module.SRCSMSegmenterWidget.__init__).parameters
    assert "logic" in params and params["logic"].default is None


def _run_self_test(module) -> unittest.TestResult:
    suite = unittest.TestLoader().loadTestsFromTestCase(module.SRCSMSegmenterTest)
    assert suite.countTestCases() == 1
    result = unittest.TestResult()
    suite.run(result)
    return result


def test_self_test_never_pretends_without_the_bundled_model(srcsm_module, slicer_app, fake_slicer_app,
                                                             tmp_path, monkeypatch):
    """With no bundled model, the full-workflow self-test is SKIPPED saying why — not passed."""
    (tmp_path / "no-models").mkdir()
    monkeypatch.setenv("SRCSM_BUNDLED_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setenv("SRCSM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SRCSM_REQUIRE_FULL_TEST", raising=False)
    result = _run_self_test(srcsm_module)
    assert result.testsRun == 1 and not result.failures and not result.errors
    assert len(result.skipped) == 1
    reason = result.skipped[0][1]
    assert "NOT run" in reason and "no inference was tested" in reason
    assert "bundled model 'abdomen-ct-srcsm' is missing" in reason

    monkeypatch.setenv("SRCSM_REQUIRE_FULL_TEST", "1")  # CI with models: a missing model is a failure
    result = _run_self_test(srcsm_module)
    assert len(result.failures) == 1 and "bundled model 'abdomen-ct-srcsm' is missing" in result.failures[0][1]
