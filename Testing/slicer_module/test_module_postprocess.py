"""The module's clean-up default comes from the model card, the user's checkbox overrides it, and the
preview windows a raw CT exactly as the segmentation does (real MRML nodes, real cases)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from SRCSMSegmenterLib import matching, mrml
from SRCSMSegmenterLib import module_logic as ml
from SRCSMSegmenterLib.image import read_volume, write_volume
from SRCSMSegmenterLib.model_info import ModelChoice
from SRCSMSegmenterLib.module_logic import SegmentationRequest
from SRCSMSegmenterLib.postprocess import PostProcessing


def _card(model_card, **pp):
    return model_card.model_copy(update={"postprocessing": PostProcessing(**pp)})


def _option(command: list[str]) -> str:
    assert command.count("--postprocess") == 1
    return command[command.index("--postprocess") + 1]


def test_the_checkbox_means_the_cards_clean_up(model_card):
    none = _card(model_card)
    largest = _card(model_card, method="keep_largest")
    small = _card(model_card, method="min_volume", min_volume_mm3=500)
    assert (ml.clean_up_default(none), ml.clean_up_default(largest), ml.clean_up_default(small)) == (False, True, True)
    assert ml.clean_up_default(None) is False  # an unreadable package: nothing to go by
    request = SegmentationRequest(None, model_card.id)
    cases = [
        (None, none, "card"), (None, largest, "card"),
        (True, none, "keep-largest"), (True, largest, "keep-largest"), (True, small, "min-volume:500"),
        (False, none, "none"), (False, largest, "none"), (False, small, "none"),
    ]
    for clean_up, card, expected in cases:
        r = SegmentationRequest(None, model_card.id, clean_up=clean_up)
        assert ml.postprocess_option(r, card) == expected, (clean_up, card.postprocessing)
    assert request.clean_up is None  # a script that says nothing gets the card's default


def test_prepare_passes_the_clean_up_to_the_background_command(slicer_app, logic, model_card, mr_node):
    assert model_card.postprocessing.method == "none"  # the test model's card prescribes no clean-up
    for clean_up, expected in ((None, "card"), (False, "none"), (True, "keep-largest")):
        job = logic.prepare(SegmentationRequest(mr_node, model_card.id, clean_up=clean_up))
        job.cleanup()
        assert _option(job.command) == expected
    # the command line is what the CLI parses (no argparse error for any of them)
    from SRCSMSegmenterLib.cli import build_parser

    for value in ("card", "none", "keep-largest", "min-volume:500"):
        assert build_parser().parse_args(["segment", "in.nii", "out.seg.nrrd", "--postprocess", value]).postprocess == value


def test_select_model_initialises_the_checkbox_from_the_card(srcsm_module, slicer_app, model_card, module_model):
    logic = srcsm_module.SRCSMSegmenterLogic()
    p = logic.getParameterNode()
    assert p.cleanUp is False
    largest = ModelChoice("with-clean-up", "x", "installed", module_model, _card(model_card, method="keep_largest"))
    plain = ModelChoice("plain", "y", "installed", module_model, _card(model_card))
    logic.selectModel(p, largest)
    assert (p.modelId, p.cleanUp) == ("with-clean-up", True)
    assert logic.request(p).clean_up is True
    p.cleanUp = False  # the user unticks it: the request says so
    assert logic.request(p).clean_up is False
    logic.selectModel(p, plain)
    assert (p.modelId, p.cleanUp) == ("plain", False)


def test_module_segmentation_applies_the_card_default(slicer_app, logic, catalog, model_card, module_model, mr_node,
                                                      tmp_path):
    """Real background `srcsm segment` runs: the card's keep-largest unless the checkbox is unticked."""
    folder = tmp_path / "with-clean-up"
    shutil.copytree(module_model, folder)
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    data["id"] = "tiny-with-clean-up"
    data["postprocessing"] = {"method": "keep_largest", "chosen_by": "test"}
    (folder / "model.json").write_text(json.dumps(data), encoding="utf-8")
    logic.install_model(folder)
    results = {}
    for clean_up in (None, False):
        job = logic.prepare(SegmentationRequest(mr_node, "tiny-with-clean-up", device="cpu", clean_up=clean_up))
        result = logic.start(job).wait(timeout=600)
        assert result.status == "succeeded", f"{result.message}\n{result.details}"
        results[clean_up] = result.done["postprocessing"]
        job.cleanup()
    assert results == {None: "keep-largest", False: "none"}


def test_preview_windows_a_raw_ct_like_the_segmentation(slicer_app, logic, model_card, real_case, tmp_path):
    """The preview's matched voxels and mapping curve are the same for a raw-HU CT and its clipped twin
    (the test model was trained on the clipped CT, so its profile is windowed)."""
    from train.perturbations import raw_hu

    assert model_card.source.modality == "CT" and matching.match_window(model_card.source_profile, "CT")
    image, _, _ = real_case("Dataset501", "sabs_02")
    clipped = read_volume(image)
    raw_path = write_volume(raw_hu(clipped, seed=2), tmp_path / "raw.nrrd")
    node = slicer_app.volumes.AddArchetypeVolume(str(raw_path), "raw CT")
    preview = logic.preview(node, model_card.id)
    assert preview.target_modality == "CT"
    import slicer

    expected = matching.match(clipped, model_card.source_profile, "CT")
    assert np.array_equal(slicer.util.arrayFromVolume(preview.node), expected.array)
    assert np.array_equal(preview.mapping.lut, matching.fit_mapping(clipped.array, model_card.source_profile, "CT").lut)
    assert mrml.volume_from_node(node).array.min() < -880  # the node really holds raw HU


@pytest.mark.parametrize("field", ["cleanUpCheckBox"])
def test_ui_has_the_clean_up_checkbox_bound_to_the_parameter_node(field):
    import xml.etree.ElementTree as ET

    from slicer_module_helpers import LIB_DIR

    ui = LIB_DIR.parent / "Resources" / "UI" / "SRCSMSegmenter.ui"
    widget = next(w for w in ET.parse(ui).getroot().iter("widget") if w.get("name") == field)
    assert widget.get("class") == "QCheckBox"
    bound = {p.get("name"): p.find("string").text for p in widget.findall("property") if p.find("string") is not None}
    assert bound["SlicerParameterName"] == "cleanUp"
