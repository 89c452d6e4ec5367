"""Benchmark: the Dice a *perfect* network could reach on a model's grid — the resolution ceiling.

Run on demand (not part of the test suite)::

    python Testing/benchmarks/bench_grid_ceiling.py Resources/Models/abdomen-ct-srcsm \\
        ../shared/data/Dataset501_AbdomenCT --split test

A model predicts on its own world-aligned grid (the card's ``spacing``: 4.8 mm for the abdomen
models, 2 mm for the cardiac one) and the core library carries the class probabilities back onto
the scan's grid (linear, then argmax). How much Dice that round trip alone costs bounds what any
network on that grid can score. Here the "network output" is the reference itself: each label's
one-hot mask, pre-smoothed with σ = spacing / 2.355 mm (≈ the partial volume a model voxel covers)
and resampled onto the model grid with the library's :func:`to_model_grid`, then brought back with
:func:`argmax_in_target_grid` — the path ``srcsm segment`` takes — and scored against the reference
with :func:`train.metrics.evaluate_case`.

It prints a Markdown table (per label and mean, over the chosen cases) headed by the date. The
number is a ceiling of the grid, not of the method: it says what a finer grid would buy.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SRCSMSegmenter"))

from SRCSMSegmenterLib.image import Volume  # noqa: E402
from SRCSMSegmenterLib.modelpackage import load_package  # noqa: E402
from SRCSMSegmenterLib.preprocessing import argmax_in_target_grid, model_grid, to_model_grid  # noqa: E402
from train.datasets import load_dataset  # noqa: E402
from train.metrics import evaluate_case, read_label_map  # noqa: E402


def round_trip(reference: Volume, spacing: tuple[float, float, float], values: list[int]) -> Volume:
    """The reference carried onto a model grid at ``spacing`` as soft one-hot channels and back."""
    grid = model_grid(reference.geometry, reference.shape, spacing)
    sigma = float(min(spacing)) / 2.355
    channels = [to_model_grid(Volume((reference.array == v).astype(np.float32), reference.geometry), grid,
                              pre_smoothing_mm=sigma, default_value=1.0 if v == 0 else 0.0).array
                for v in [0, *values]]
    labels = argmax_in_target_grid(np.stack(channels), grid, reference.geometry, reference.shape)
    lut = np.array([0, *values], np.uint8)
    return Volume(lut[labels], reference.geometry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model package folder (its card gives the grid spacing and the labels)")
    parser.add_argument("dataset", help="nnU-Net raw dataset folder with labels")
    parser.add_argument("--split", default="test")
    parser.add_argument("--spacing", default=None, help="override the card's spacing, e.g. 2.4,2.4,2.4")
    args = parser.parse_args(argv)
    card = load_package(args.model).card
    spacing = tuple(float(s) for s in args.spacing.split(",")) if args.spacing else tuple(card.spacing)
    names = {label.value: label.name for label in card.labels.labels}
    dataset = load_dataset(args.dataset)
    cases = dataset.split(args.split)
    per_label: dict[str, list[float]] = {n: [] for n in names.values()}
    for case in cases:
        reference = read_label_map(case.label)
        for row in evaluate_case(round_trip(reference, spacing, list(names)), reference, names):
            if row["ref_voxels"]:  # the label is in the case
                per_label[row["name"]].append(float(row["dice"]))
    means = {n: float(np.mean(v)) for n, v in per_label.items() if v}
    print(f"grid ceiling of `{card.id}` {card.version} at {' × '.join(f'{s:g}' for s in spacing)} mm on "
          f"{dataset.name} ({args.split}, {len(cases)} cases), {datetime.date.today().isoformat()}\n")
    print("| " + " | ".join(means) + " | mean |")
    print("|" + "---|" * (len(means) + 1))
    print("| " + " | ".join(f"{m:.3f}" for m in means.values()) + f" | {np.mean(list(means.values())):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
