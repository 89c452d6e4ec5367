"""Benchmark: ``Segmenter.segment`` against the plain-libraries pipeline, side by side in one run.

Run on demand (not part of the test suite), from the repository root::

    python Testing/benchmarks/bench_side_by_side.py                 # defaults below, 5 repeats
    python Testing/benchmarks/bench_side_by_side.py --repeats 3 --cardiac pat_01 pat_04

Inputs and models (bundled packages, source matching on, CPU, bf16 where the CPU has it):

* ``abdomen-ct-srcsm`` on the real CT ``sabs_00`` brought to clinical size, 512×512×300 voxels (as
  ``bench_inference.py`` builds it: linear resampling over the same physical extent, int16);
* ``cardiac-bssfp-srcsm`` on real oblique bSSFP cine short-axis stacks of ``Dataset503_CardiacBSSFP``.

The plain pipeline (``Testing/plain_pipeline.py``) is what a user would write with SimpleITK and MONAI
for the same package: SimpleITK smoothing + resampling → MONAI ``sliding_window_inference`` over the
whole world-aligned grid → SimpleITK resampling of every channel back → argmax. Both use the same
source matching, normalisation, network and precision. For each input, after one warm-up call of each,
the two alternate ``--repeats`` times; medians are reported with our time split into SM, resampling
(to the model grid, the needed-voxel mask, back to the input grid), network and post-processing, and
the labels of the two are compared (voxel agreement).

Ours follows the card's ``inference.strategy``: a card that chose ``whole_grid`` on its validation cases
runs one pass over the model grid where the plain pipeline slides the card's patch over it, so the
labels then differ where the two predictions differ (``--strategy sliding_window`` forces ours to the
plain pipeline's windows, to compare the pipelines alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import bench_matching as bm  # noqa: E402  (clinical-size CT, machine line)
from plain_pipeline import plain_segment  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"


def load_inputs(args) -> list[tuple[str, str, object, str]]:
    """(name, model id, volume, modality) for each input."""
    from SRCSMSegmenterLib.image import read_volume

    size = (512, 512, 300)
    bm.clinical_ct(args.data, args.case, size, args.workdir)
    ct = bm.load_volume_npy(args.workdir / f"{args.case}_512x512x300.npy")
    out = [(f"real CT {args.case} → 512×512×300", "abdomen-ct-srcsm", ct, "CT")]
    for case in args.cardiac:
        vol = read_volume(args.data / "Dataset503_CardiacBSSFP" / "imagesTr" / f"{case}_0000.nii.gz")
        shape = "×".join(map(str, reversed(vol.shape)))
        sp = "×".join(f"{s:g}" for s in vol.geometry.spacing)
        out.append((f"real oblique bSSFP cine {case} ({shape}, {sp} mm)", "cardiac-bssfp-srcsm", vol, "MR"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=bm.DEFAULT_DATA)
    parser.add_argument("--case", default="sabs_00", help="CT case brought to 512×512×300")
    parser.add_argument("--cardiac", nargs="*", default=["pat_01", "pat_04"], help="bSSFP cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workdir", type=Path, default=bm.DEFAULT_WORKDIR)
    parser.add_argument("--strategy", default="card", choices=["card", "sliding_window", "whole_grid"],
                        help="our inference strategy (default: the card's)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch

    from SRCSMSegmenterLib.inference import Segmenter
    from SRCSMSegmenterLib.modelpackage import load_package
    from SRCSMSegmenterLib.preprocessing import model_grid, needed_mask
    from SRCSMSegmenterLib.sliding_window import needed_windows

    rows = []
    for name, model, volume, modality in load_inputs(args):
        package = load_package(MODELS / model)
        seg = Segmenter(package, device="cpu", precision=args.precision, strategy=args.strategy)
        net = package.build_network()
        ours_runs, plain_runs = [], []
        for i in range(args.repeats + 1):  # the first pair is the warm-up
            t0 = time.perf_counter()
            result = seg.segment(volume, target_modality=modality)
            wall = time.perf_counter() - t0
            plain, pt = plain_segment(volume, package, modality=modality, precision=seg.precision, network=net)
            if i:
                ours_runs.append({**result.timings, "wall_s": wall})
                plain_runs.append(pt)
            print(name, i, f"ours {wall:.2f} s", f"plain {pt['total_s']:.2f} s", flush=True)
        card = package.card
        grid = model_grid(volume.geometry, volume.shape, card.spacing)
        need = needed_mask(grid, volume.geometry, volume.shape)
        roi = tuple(int(p) for p in reversed(card.patch_size))
        skip, total = needed_windows(need, roi, card.inference.overlap)
        ours_windows = "1 pass (whole grid)" if result.strategy == "whole_grid" else str(len(skip))
        med = {k: statistics.median(r[k] for r in ours_runs) for k in ours_runs[0]}
        pmed = {k: statistics.median(r[k] for r in plain_runs) for k in plain_runs[0]}
        agree = float(np.mean(result.labelmap.array == plain))
        rows.append((name, model, grid, total, ours_windows, med, pmed, agree, result.precision))

    print()
    print(bm.machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPU: not measured (no GPU in this "
          f"session); medians of {args.repeats} alternating repeats after one warm-up pair; "
          f"load average at the end: {os.getloadavg()[0]:.2f}")
    print()
    print("| input | model (precision) | model grid | windows: plain / ours | plain pipeline | ours | plain / ours "
          "| ours: SM | resampling in + mask + back | network | post-processing | ours / network | labels agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, model, grid, total, run, med, pmed, agree, prec in rows:
        resampling = med["resample_in_s"] + med["needed_mask_s"] + med["resample_back_s"]
        post = max(0.0, med["total_s"] - med["preprocess_s"] - med["network_s"] - med["resample_back_s"])
        print(f"| {name} | {model} ({prec}) | {'×'.join(map(str, reversed(grid.shape_kji)))} | {total} / {run} "
              f"| {pmed['total_s']:.2f} s | {med['total_s']:.2f} s | {pmed['total_s'] / med['total_s']:.1f}× "
              f"| {med['match_s']:.2f} s | {med['resample_in_s']:.2f} + {med['needed_mask_s']:.2f} + "
              f"{med['resample_back_s']:.2f} s | {med['network_s']:.2f} s | {post:.2f} s "
              f"| {med['total_s'] / med['network_s']:.1f}× | {agree:.5f} |")
    print()
    print("Plain pipeline split (medians): | input | SM | SimpleITK smooth + resample in | MONAI sliding window "
          "| SimpleITK back + argmax |")
    for name, *_, pmed, _agree, _prec in rows:
        print(f"| {name} | {pmed['match_s']:.2f} s | {pmed['resample_in_s']:.2f} s | {pmed['network_s']:.2f} s "
              f"| {pmed['resample_back_s']:.2f} s |")


if __name__ == "__main__":
    main()
