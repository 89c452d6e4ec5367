"""One forward pass over the whole model grid (``inference.strategy = "whole_grid"``): exact padding and
crop, the divisor from the card, physical consistency, the size fallback, and real-data accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.inference import Segmenter
from SRCSMSegmenterLib.modelpackage import InferenceSpec, load_package
from SRCSMSegmenterLib.network import build_network, spec_divisor
from SRCSMSegmenterLib.whole_grid import padded_voxels, padding_to_divisor, whole_grid_probabilities
from test_inference import _flip_x, mr_case, package  # noqa: F401 (fixtures shared with the sliding-window tests)

BUNDLED = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def _pointwise(seen: list[torch.Tensor]):
    """A 'network' whose output at a voxel depends on that voxel only, so any misplaced crop shows."""
    def predictor(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        s = torch.sigmoid(x)
        return torch.cat([1 - s, s], dim=1)
    return predictor


@pytest.mark.parametrize("shape, divisor", [((37, 50, 61), 16), ((16, 16, 16), 16), ((5, 70, 33), 8), ((9, 9, 9), 1)])
def test_padding_and_crop_are_exact(shape, divisor):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=g)
    seen: list[torch.Tensor] = []
    probs = whole_grid_probabilities(image, _pointwise(seen), divisor=divisor, cval=-7.0)
    assert probs.shape == (2, *shape) and probs.dtype == torch.float32
    # every voxel back where it came from (1e-6: SIMD and scalar sigmoid differ in the last bit)
    assert torch.allclose(probs[1], torch.sigmoid(image), rtol=0, atol=1e-6)
    (x,) = seen
    assert all(s % divisor == 0 and s - n < divisor for s, n in zip(x.shape[2:], shape))
    pad = padding_to_divisor(shape, divisor)
    k0, j0, i0 = pad[4], pad[2], pad[0]
    inner = x[0, 0, k0:k0 + shape[0], j0:j0 + shape[1], i0:i0 + shape[2]]
    assert torch.equal(inner, image)
    assert float((x[0, 0] == -7.0).sum()) == x[0, 0].numel() - image.numel()  # the rest is cval
    assert padded_voxels(shape, divisor) == x[0, 0].numel()
    # centred: the padding before never exceeds the padding after by more than nothing, nor lags by > 1
    assert all(0 <= pad[2 * a + 1] - pad[2 * a] <= 1 for a in range(3))


def test_a_network_returning_the_wrong_shape_is_reported():
    with pytest.raises(RuntimeError, match="returned shape"):
        whole_grid_probabilities(torch.zeros(16, 16, 16), lambda x: x[:, :, :8], divisor=16, cval=0.0)
    with pytest.raises(ValueError, match="divisor"):
        padding_to_divisor((4, 4, 4), 0)


@pytest.mark.parametrize("channels", [[8, 16], [16, 32, 64, 128, 256], [64] * 5, [4, 8, 16]])
def test_divisor_from_the_card_is_the_networks(channels):
    params = {"channels": channels, "out_channels": 2}
    assert spec_divisor("srcsm_unet", params) == build_network("srcsm_unet", params).divisor
    with pytest.raises(ValueError, match="unknown architecture"):
        spec_divisor("resnet", params)


def test_cards_without_a_strategy_keep_the_sliding_window():
    assert InferenceSpec().strategy == "sliding_window"
    assert InferenceSpec.model_validate({"overlap": 0.5}).strategy == "sliding_window"
    with pytest.raises(ValueError, match="strategy"):
        InferenceSpec.model_validate({"strategy": "one_big_window"})
    with pytest.raises(ValueError, match="unknown inference strategy"):
        Segmenter(load_package(BUNDLED / "cardiac-bssfp-srcsm"), device="cpu", strategy="bogus")  # type: ignore[arg-type]


def test_flipped_header_gives_the_physically_same_segmentation(package, mr_case):
    """The model grid is world-aligned, so a reversed array with its header adjusted is the same input
    to the one pass: the labels, flipped back, are the same."""
    image, _ = mr_case
    seg = Segmenter(package, device="cpu", precision="fp32", strategy="whole_grid")
    a = seg.segment(image, target_modality="MR")
    b = seg.segment(_flip_x(image), target_modality="MR")
    assert a.strategy == b.strategy == "whole_grid"
    assert a.labelmap.geometry == image.geometry and a.labelmap.array.shape == image.array.shape
    assert (a.labelmap.array > 0).mean() > 0.01
    assert np.mean(a.labelmap.array == b.labelmap.array[:, :, ::-1]) > 0.999


def test_grids_over_the_limit_fall_back_to_the_sliding_window(package, mr_case):
    image, _ = mr_case
    seg = Segmenter(package, device="cpu", precision="fp32", strategy="whole_grid")
    seg.card = package.card.model_copy(update={"inference": package.card.inference.model_copy(update={"max_grid_voxels": 1000})})
    result = seg.segment(image, target_modality="MR")
    assert result.strategy == "sliding_window"
    sliding = Segmenter(package, device="cpu", precision="fp32", strategy="sliding_window").segment(image, target_modality="MR")
    assert np.array_equal(result.labelmap.array, sliding.labelmap.array)


def test_a_whole_grid_too_big_for_the_gpu_continues_with_sliding_windows_there(package, mr_case, monkeypatch):
    """GPU out-of-memory in the one pass: the sliding window runs on the same GPU (the smaller footprint),
    not the CPU, and the result says so. No GPU here: the pass raises the CUDA error, and the sliding
    window, asked for the GPU, is computed on the CPU."""
    image, _ = mr_case
    seg = Segmenter(package, device="cpu", precision="fp32", strategy="whole_grid")
    seg.device = torch.device("cuda")  # pretend we run on a GPU
    calls = []
    real_sliding = Segmenter._predict_sliding

    def too_big(self, x, device, precision):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def sliding(self, x, device, precision, needed):
        calls.append((device, needed))
        return real_sliding(self, x, torch.device("cpu"), "fp32", needed)

    monkeypatch.setattr(Segmenter, "_predict_whole", too_big)
    monkeypatch.setattr(Segmenter, "_predict_sliding", sliding)
    result = seg.segment(image, target_modality="MR")
    assert calls == [(torch.device("cuda"), None)]  # on the GPU, every window
    assert result.strategy == "sliding_window" and result.device == "cuda"
    assert any("did not fit in GPU memory" in m and "sliding windows on the GPU" in m for m in result.messages)
    reference = Segmenter(package, device="cpu", precision="fp32", strategy="sliding_window").segment(
        image, target_modality="MR")
    assert np.array_equal(result.labelmap.array, reference.labelmap.array)


def _dice(pred: np.ndarray, ref: np.ndarray, values=(1, 2, 3)) -> float:
    return float(np.mean([2 * ((pred == v) & (ref == v)).sum() / ((pred == v).sum() + (ref == v).sum()) for v in values]))


def test_both_strategies_keep_a_real_cine_stack_in_its_grid_and_the_card_picks_the_better(shared_data):
    """The bundled cardiac model on a real oblique validation stack (not trained on): one pass over its
    2 mm world grid and the 80³ windows both return the labels in the input grid, and the strategy its card
    names is the more accurate here too. The card's choice was measured on all 10 validation stacks
    (0.3.0, instance norm: sliding window 0.886, whole grid 0.816; the 0.2.0 network had no normalisation
    layers and did as well in one pass, docs/benchmarks.md) — this stack must not contradict it, and the
    one pass, a user's option, must still outline the heart."""
    root = shared_data / "Dataset503_CardiacBSSFP"
    image = read_volume(root / "imagesTr" / "pat_36_0000.nii.gz")
    ref = read_volume(root / "labelsTr" / "pat_36.nii.gz").array
    package = load_package(BUNDLED / "cardiac-bssfp-srcsm")
    whole = Segmenter(package, device="cpu", strategy="whole_grid").segment(image, target_modality="MR")
    sliding = Segmenter(package, device="cpu", strategy="sliding_window").segment(image, target_modality="MR")
    assert whole.strategy == "whole_grid" and sliding.strategy == "sliding_window"
    assert whole.labelmap.geometry == image.geometry and sliding.labelmap.geometry == image.geometry
    scores = {"whole_grid": _dice(whole.labelmap.array, ref),
              "sliding_window": _dice(sliding.labelmap.array, ref)}
    chosen = package.card.inference.strategy
    other = next(name for name in scores if name != chosen)
    assert scores[chosen] >= 0.85, scores
    assert scores[chosen] >= scores[other] - 0.005, (chosen, scores)
    assert scores["whole_grid"] >= 0.75, scores
