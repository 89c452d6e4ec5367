"""``padding_mode``: how a model grid smaller than the network's window is padded — ``constant`` (what
every front end does and the models were trained with) or ``replicate`` (an experiment for thin scans,
docs/benchmarks.md "Padding a thin scan"). Replicate is MONAI's, on a real thin slab; measurements
made with it are refused by the tools that write cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SHARED_DATA, make_subset_dataset
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.modelpackage import load_package
from SRCSMSegmenterLib.preprocessing import needed_mask
from SRCSMSegmenterLib.sliding_window import pad_image, sliding_window_probabilities
from SRCSMSegmenterLib.whole_grid import padding_to_divisor, whole_grid_probabilities
from train import perturbations as P
from train.metrics import read_label_map

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


@pytest.fixture(scope="module")
def thin_slab(real_case):
    """CHAOS T2 ``chaos_01`` cut to a 40 mm slab around the kidneys (as a partial-coverage MR is)."""
    image, label, _ = real_case("Dataset502", "chaos_01")
    slab, _ = P.PERTURBATIONS["slab_40mm"].apply(read_volume(image), read_label_map(label), 0)
    return slab


def test_replicate_padding_is_monais_on_a_thin_slab(thin_slab):
    from monai.inferers import sliding_window_inference

    seg = Segmenter(load_package(MODELS / "abdomen-mr-srcsm"), device="cpu", precision="fp32")
    x, grid, _ = seg.prepare(thin_slab, target_modality="MR")
    roi = tuple(int(p) for p in reversed(seg.card.patch_size))
    assert x.shape[0] < roi[0], "the slab must be thinner than the window for padding to matter"
    needed = needed_mask(grid, thin_slab.geometry, thin_slab.shape)
    net = seg.network(torch.device("cpu"), "fp32")

    def predictor(patch):
        return torch.softmax(net(patch), dim=1)

    with torch.inference_mode():
        ours = sliding_window_probabilities(torch.from_numpy(x), roi, predictor, overlap=0.5, cval=float(x.min()),
                                            needed=needed, padding_mode="replicate")
        monai = sliding_window_inference(torch.from_numpy(x)[None, None], roi, 1, predictor, overlap=0.5,
                                         mode="gaussian", padding_mode="replicate")[0]
        constant = sliding_window_probabilities(torch.from_numpy(x), roi, predictor, overlap=0.5,
                                                cval=float(x.min()), needed=needed)
    mask = torch.from_numpy(needed)
    assert torch.allclose(ours[:, mask], monai[:, mask], rtol=0, atol=1e-6)
    # the padding reaches the slab's voxels: what the network makes of them depends on it
    assert float((ours[:, mask] - constant[:, mask]).abs().max()) > 0.05


def test_whole_grid_pads_with_the_edge_voxels_when_asked():
    g = torch.Generator().manual_seed(0)
    image = torch.randn((5, 21, 18), generator=g)
    seen: list[torch.Tensor] = []

    def pointwise(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        s = torch.sigmoid(x)
        return torch.cat([1 - s, s], dim=1)

    probs = whole_grid_probabilities(image, pointwise, divisor=16, cval=-7.0, padding_mode="replicate")
    assert torch.allclose(probs[1], torch.sigmoid(image), rtol=0, atol=1e-6)  # the crop is exact
    expected = F.pad(image[None, None], pad=padding_to_divisor(image.shape, 16), mode="replicate")
    assert torch.equal(seen[0], expected) and not bool((seen[0] == -7.0).any())


def test_an_unknown_padding_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="padding mode 'reflect'"):
        Segmenter(load_package(tiny_model), device="cpu", padding_mode="reflect")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="constant, replicate"):
        pad_image(torch.zeros(1, 1, 2, 2, 2), [1, 1, 1, 1, 1, 1], "reflect", 0.0)


def test_measurements_with_replicate_padding_never_reach_a_card(tiny_model, tmp_path):
    """An evaluation or a robustness run padded with ``replicate`` says so, and neither card-metrics nor
    the card's field of view takes it: a card describes what a user gets."""
    from train.card_metrics import card_metrics
    from train.evaluate import evaluate_model
    from train.robustness import field_of_view_limits, load_results, run_robustness

    mr = make_subset_dataset(tmp_path / "Dataset502_AbdomenMRT2", SHARED_DATA / "Dataset502_AbdomenMRT2", [],
                             ["chaos_01"])
    summary = evaluate_model(tiny_model, mr, tmp_path / "eval", split="val", sm="on", device="cpu",
                             padding_mode="replicate", log=lambda m: None)
    assert summary["padding_mode"] == "replicate"
    with pytest.raises(ValueError, match="padded with 'replicate'.*without --padding-mode"):
        card_metrics({"mr": tmp_path / "eval"})
    run_robustness(tiny_model, mr, tmp_path / "rob", split="val", cases=1, perturbations=["slab_60mm"],
                   device="cpu", padding_mode="replicate", log=lambda m: None)
    (result,) = load_results([tmp_path / "rob"])
    assert result["meta"]["padding_mode"] == "replicate"
    with pytest.raises(ValueError, match="padded with 'replicate'.*without --padding-mode"):
        field_of_view_limits([result])
    constant = json.loads(json.dumps(result, default=float))
    constant["meta"]["padding_mode"] = "constant"
    assert field_of_view_limits([constant]) is not None
    assert np.isfinite(result["rows"][0]["dice"])


# ------------------------------------------------------------------------- the card's padding
def _card_with_padding(src: Path, dst: Path, padding: str) -> Path:
    """A copy of a package folder whose card pads thin grids with ``padding``."""
    import shutil

    from train.choose_padding import PaddingChoice, write_card

    shutil.copytree(src, dst)
    write_card(dst, PaddingChoice(padding, f"test: {padding}"))
    return dst


def test_the_segmenter_pads_as_the_card_says_unless_told_otherwise(thin_slab, tmp_path):
    """The card is the contract: a card with ``inference.padding_mode: replicate`` gets replicate padding
    by default (the same labels as asking for it), an explicit choice overrides it, and cards without
    the field keep constant padding."""
    bundled = MODELS / "abdomen-mr-srcsm"
    assert load_package(bundled).card.inference.padding_mode == "constant"
    assert Segmenter(load_package(bundled), device="cpu").padding_mode == "constant"
    replicate_card = load_package(_card_with_padding(bundled, tmp_path / "mr-replicate", "replicate"))
    assert replicate_card.card.inference.padding_chosen_by == "test: replicate"
    by_card = Segmenter(replicate_card, device="cpu", precision="fp32")
    assert by_card.padding_mode == "replicate"
    asked = Segmenter(load_package(bundled), device="cpu", precision="fp32", padding_mode="replicate")
    constant = Segmenter(replicate_card, device="cpu", precision="fp32", padding_mode="constant")
    labels = {name: s.segment(thin_slab, target_modality="MR").labelmap.array
              for name, s in (("card", by_card), ("asked", asked), ("constant", constant))}
    np.testing.assert_array_equal(labels["card"], labels["asked"])
    assert np.count_nonzero(labels["card"] != labels["constant"]) > 0  # the padding reached the labels
    with pytest.raises(ValueError, match="padding mode 'mirror': use card, constant or replicate"):
        Segmenter(replicate_card, device="cpu", padding_mode="mirror")  # type: ignore[arg-type]


def test_a_card_that_replicates_takes_its_own_measurements_and_refuses_constant_ones(tiny_model, tmp_path):
    from train.card_metrics import card_metrics
    from train.evaluate import evaluate_model
    from train.robustness import field_of_view_limits, load_results, run_robustness

    package = _card_with_padding(tiny_model, tmp_path / "tiny-replicate", "replicate")
    mr = make_subset_dataset(tmp_path / "Dataset502_AbdomenMRT2", SHARED_DATA / "Dataset502_AbdomenMRT2", [],
                             ["chaos_01"])
    own = evaluate_model(package, mr, tmp_path / "eval", split="val", sm="on", device="cpu", log=lambda m: None)
    assert (own["padding_mode"], own["card_padding_mode"]) == ("replicate", "replicate")
    assert "mr" in json.dumps(card_metrics({"mr": tmp_path / "eval"}))  # the card's own padding: taken
    other = evaluate_model(package, mr, tmp_path / "eval-constant", split="val", sm="on", device="cpu",
                           padding_mode="constant", log=lambda m: None)
    assert (other["padding_mode"], other["card_padding_mode"]) == ("constant", "replicate")
    with pytest.raises(ValueError, match="padded with 'constant', not as its card does \\('replicate'\\)"):
        card_metrics({"mr": tmp_path / "eval-constant"})
    run_robustness(package, mr, tmp_path / "rob", split="val", cases=1, perturbations=["slab_60mm"],
                   device="cpu", padding_mode="constant", log=lambda m: None)
    (result,) = load_results([tmp_path / "rob"])
    with pytest.raises(ValueError, match="padded with 'constant', not as its card does"):
        field_of_view_limits([result])


def _measured(constant: tuple[float, float, int], replicate: tuple[float, float, int]) -> dict:
    """A choose-padding measurement: (whole, mean slab Dice, empty) per padding."""
    def scores(whole: float, slabs: float, empty: int) -> dict:
        return {"whole": whole, "slabs": slabs, "empty": empty, "in_view": 12,
                "per_slab": {"slab_40mm": slabs - 0.02, "slab_60mm": slabs + 0.02}}
    return {"dataset": "Dataset502_AbdomenMRT2", "split": "val", "cases": ["a", "b"],
            "scores": {"constant": scores(*constant), "replicate": scores(*replicate)}}


def test_replicate_is_chosen_only_when_it_wins_on_slabs_and_costs_nothing_else():
    from train.choose_padding import MAX_WHOLE_LOSS, MIN_GAIN, choose

    wins = choose(_measured((0.85, 0.80, 1), (0.85, 0.80 + MIN_GAIN + 0.001, 1)))
    assert wins.padding_mode == "replicate"
    assert "2 Dataset502_AbdomenMRT2 val cases" in wins.chosen_by and "slabs 40mm 0.791, 60mm 0.831" in wins.chosen_by
    assert choose(_measured((0.85, 0.80, 1), (0.85, 0.80 + MIN_GAIN - 0.001, 1))).padding_mode == "constant"
    assert choose(_measured((0.85, 0.80, 0), (0.85, 0.90, 1))).padding_mode == "constant"  # one more empty
    assert choose(_measured((0.85, 0.80, 0), (0.85 - MAX_WHOLE_LOSS - 0.001, 0.90, 0))).padding_mode == "constant"
    assert choose(_measured((0.85, 0.80, 2), (0.85 - MAX_WHOLE_LOSS + 0.001, 0.90, 0))).padding_mode == "replicate"


def test_choose_padding_command_measures_both_and_writes_only_the_cards_padding(tiny_model, tmp_path):
    import shutil
    import subprocess
    import sys

    package = tmp_path / "tiny"
    shutil.copytree(tiny_model, package)
    before = json.loads((package / "model.json").read_text(encoding="utf-8"))
    ct = make_subset_dataset(tmp_path / "Dataset501_AbdomenCT", SHARED_DATA / "Dataset501_AbdomenCT", [],
                             ["sabs_09"])
    proc = subprocess.run([sys.executable, "-m", "train", "choose-padding", str(package), str(ct), "--out",
                           str(tmp_path / "pad"), "--write-card"], capture_output=True, text=True,
                          encoding="utf-8", cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((tmp_path / "pad" / "choose-padding.json").read_text(encoding="utf-8"))
    assert set(measured["scores"]) == {"constant", "replicate"} and measured["cases"] == ["sabs_09"]
    for padding in ("constant", "replicate"):
        meta = json.loads((tmp_path / "pad" / padding / "robustness.json").read_text(encoding="utf-8"))["meta"]
        assert meta["padding_mode"] == padding and meta["perturbations"] == ["slab_40mm", "slab_60mm", "slab_90mm",
                                                                              "slab_150mm"]
    after = json.loads((package / "model.json").read_text(encoding="utf-8"))
    assert after["inference"]["padding_mode"] == measured["chosen"]["padding_mode"]
    assert after["inference"]["padding_chosen_by"] == measured["chosen"]["chosen_by"]
    assert "constant: slabs 40mm" in after["inference"]["padding_chosen_by"]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"inference"}
    def rest(inference: dict) -> dict:
        return {k: v for k, v in inference.items() if not k.startswith("padding")}
    assert rest(after["inference"]) == rest(before["inference"])


def test_changing_a_measured_cards_padding_says_its_numbers_are_stale(tmp_path, monkeypatch, capsys):
    """The bundled MR card carries metrics and a field of view measured with constant padding: a
    choice of replicate is written, and the command says those numbers must be measured again."""
    import argparse
    import shutil

    from train import choose_padding
    from train.robustness_cli import run

    package = tmp_path / "mr"
    shutil.copytree(MODELS / "abdomen-mr-srcsm", package)
    measured = _measured((0.85, 0.80, 0), (0.85, 0.90, 0))
    monkeypatch.setattr(choose_padding, "measure", lambda *a, **k: json.loads(json.dumps(measured)))
    args = argparse.Namespace(command="choose-padding", model=str(package), dataset="unused", split="val", cases=None,
                              device="cpu", out=str(tmp_path / "pad"), write_card=True)
    (tmp_path / "pad").mkdir()
    assert run(args) == 0
    err = capsys.readouterr().err
    assert "the card's padding changed (constant → replicate)" in err and "measure them again" in err
    assert load_package(package).card.inference.padding_mode == "replicate"
    capsys.readouterr()
    assert run(args) == 0  # the same choice again: nothing stale to report
    assert "padding changed" not in capsys.readouterr().err
