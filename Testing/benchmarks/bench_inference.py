"""Benchmark: whole-volume inference time and peak memory (``Segmenter.segment``).

Run on demand (not part of the test suite)::

    python Testing/benchmarks/bench_inference.py                       # defaults below
    python Testing/benchmarks/bench_inference.py --precisions fp32 bf16 --repeats 3
    python Testing/benchmarks/bench_inference.py --package path/to/model   # a real model package
    python Testing/benchmarks/bench_inference.py --package Resources/Models/cardiac-bssfp-srcsm \
        --inputs --image ../shared/data/Dataset504_CardiacLGE/imagesTr/CASE_0000.nii.gz --precisions bf16
                                                    # any real volume (target modality guessed)

Inputs (see ``bench_matching.py`` for how the second one is made):

* ``real CT`` — a test-split case of ``Dataset501_AbdomenCT`` as it is (default ``sabs_00``,
  257×257×95 voxels, int16 HU);
* ``real CT → 512×512×300`` — the same CT resampled linearly to 512×512×300 voxels over the same
  physical extent (a real CT brought to clinical size).

Model: unless ``--package`` is given, a package with the CPU production architecture — the SRCSM U-Net
with ``channels=[16, 32, 64, 128, 256]``, 5 classes (background + liver, kidneys, spleen), 4.8 mm
spacing, patch 80×64×80, Gaussian-blended sliding window with 50 % overlap, σ = 1 mm pre-smoothing —
whose weights are **freshly initialised** (``torch.manual_seed(0)``) and whose source profile is fitted
on the 21 training CTs. Time and memory do not depend on the weights' values (the same convolutions
run on the same shapes), so this measures the production model's cost; its labels are meaningless.

Each configuration (input × device × precision) runs in a **fresh subprocess**: imports, then the
baseline RSS is read, then the volume and package are loaded and ``segment`` (source matching on,
target modality CT) is called ``--repeats`` times. Reported: the first call (cold: network built,
oneDNN primitives created) and the median of the later calls, with ``result.timings`` (preprocess =
source matching + pre-smoothing + resampling to the model grid + normalisation; network = sliding
window; resample back = probabilities → input grid + argmax), the preprocessing split (source
matching; smoothing + resampling + normalising; the needed-voxel mask) from the same timings, and
the peak RSS (``VmHWM`` of ``/proc/self/status``) minus the baseline RSS after imports. bf16 and fp32 labels of the same input are compared (voxel agreement, Dice per label).
A CUDA device, if present, is timed too (fp16 and fp32), with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_matching as bm  # noqa: E402  (shared helpers: clinical-size volume, /proc readings)

CHANNELS = [16, 32, 64, 128, 256]
SPACING = [4.8, 4.8, 4.8]
PATCH = [80, 64, 80]
GB = 1024 ** 3


def build_random_package(data: Path, workdir: Path) -> Path:
    """The CPU production architecture with freshly initialised weights, as a real model package."""
    import torch

    from SRCSMSegmenterLib import __version__
    from SRCSMSegmenterLib.labels import label_table_from_dataset_labels
    from SRCSMSegmenterLib.modelpackage import save_package
    from SRCSMSegmenterLib.network import SRCSMUNet
    from SRCSMSegmenterLib.normalization import default_normalization
    from train.datasets import load_dataset

    dest = workdir / "bench-ct-production-arch-random-init"
    if (dest / "model.json").exists():
        return dest
    dataset = load_dataset(data / bm.DEFAULT_DATASET)
    profile, *_ = bm.source_profile(data, workdir)
    params = {"channels": CHANNELS, "dropout": 0.1, "out_channels": len(dataset.labels), "in_channels": 1}
    torch.manual_seed(0)
    net = SRCSMUNet(**params)
    card = {
        "id": "bench-ct-production-arch-random-init",
        "name": "Benchmark model (production CPU architecture, untrained)",
        "version": "0.0.0",
        "description": "Freshly initialised weights: for time and memory benchmarks only. Its labels are meaningless.",
        "license": "Apache-2.0",
        "training_data": [{"name": dataset.name, "cases": 0, "terms": "not trained; source profile only"}],
        "anatomy": "abdomen",
        "source": {"modality": dataset.modality, "sequence": dataset.channel},
        "labels": label_table_from_dataset_labels(dataset.labels).model_dump(mode="json"),
        "network": {"architecture": "srcsm_unet", "parameters": params},
        "spacing": SPACING,
        "patch_size": PATCH,
        "orientation": "LPS",
        "normalization": default_normalization(dataset.modality).model_dump(mode="json"),
        "source_profile": profile.model_dump(mode="json"),
        "inference": {"overlap": 0.5, "blend_mode": "gaussian", "pre_smoothing_mm": 1.0},
        "provenance": {"augmentation": "none", "iterations": 0, "batch_size": None,
                       "date": datetime.date.today().isoformat(), "software": f"SRCSMSegmenter {__version__}",
                       "device": "cpu", "config": {"note": "random initialisation, torch.manual_seed(0)"}},
        "metrics": {},
        "performance": {},
    }
    return save_package(card, net.state_dict(), dest, overwrite=True)


# ------------------------------------------------------------------------------------------ child


def child(cfg: dict) -> dict:
    import torch
    import monai.inferers  # noqa: F401  (imported by segment; part of the baseline, not of the peak)
    import scipy.ndimage  # noqa: F401
    import SimpleITK as sitk  # noqa: F401

    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.inference import Segmenter, count_windows
    from SRCSMSegmenterLib.modelpackage import load_package
    from SRCSMSegmenterLib.preprocessing import model_grid

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    baseline = bm.proc_status()["VmRSS"]
    bm.reset_peak_rss()
    vol_path = Path(cfg["volume"])
    volume = read_volume(vol_path) if vol_path.name.endswith(".nii.gz") else bm.load_volume_npy(vol_path)
    package = load_package(cfg["package"])
    device = cfg["device"]
    seg = Segmenter(package, device=device, precision=cfg["precision"])
    if seg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    hwm_first = None
    for _ in range(int(cfg["repeats"])):
        t0 = time.perf_counter()
        result = seg.segment(volume, source_matching=True, target_modality=cfg.get("modality", "CT"))
        wall = time.perf_counter() - t0
        runs.append({**result.timings, "wall_s": wall})
        if hwm_first is None:
            hwm_first = bm.proc_status()["VmHWM"]
    hwm = bm.proc_status()["VmHWM"]
    cuda_peak = torch.cuda.max_memory_allocated() if seg.device.type == "cuda" else None
    np.save(cfg["labels_out"], result.labelmap.array)
    card = package.card
    grid = model_grid(volume.geometry, volume.shape, card.spacing)
    roi = tuple(int(p) for p in reversed(card.patch_size))

    # the preprocessing split comes from the timed calls themselves (Segmenter.prepare fills it)
    later = runs[1:] or runs
    split = {k: statistics.median(r.get(k, 0.0) for r in later) for k in ("match_s", "resample_in_s", "needed_mask_s")}
    return {
        "device": result.device, "precision": result.precision, "threads": torch.get_num_threads(),
        "input_shape": list(volume.shape), "input_bytes": int(volume.array.nbytes),
        "grid_kji": list(grid.shape_kji), "windows": count_windows(grid.shape_kji, roi, card.inference.overlap),
        "baseline_rss": baseline, "hwm_first": hwm_first, "hwm": hwm, "cuda_peak": cuda_peak,
        "runs": runs, "prepare_split": split, "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------- main


def agreement(a: np.ndarray, b: np.ndarray, classes: int) -> tuple[float, dict[int, float], dict[int, float]]:
    """(voxel agreement, Dice per label present in either, fraction of voxels per class in ``a``)."""
    agree = float(np.count_nonzero(a == b)) / a.size
    dice = {}
    for c in range(1, classes):
        ma, mb = a == c, b == c
        s = int(np.count_nonzero(ma)) + int(np.count_nonzero(mb))
        if s:
            dice[c] = 2 * int(np.count_nonzero(ma & mb)) / s
    frac = {c: float(np.count_nonzero(a == c)) / a.size for c in range(classes)}
    return agree, dice, frac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=bm.DEFAULT_DATA)
    parser.add_argument("--case", default="sabs_00", help="test CT case")
    parser.add_argument("--size", default="512,512,300", help="clinical size x,y,z of the resampled CT")
    parser.add_argument("--inputs", nargs="*", default=["case", "clinical"], choices=["case", "clinical"])
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="also time this real volume (any readable file; target modality guessed)")
    parser.add_argument("--package", type=Path, default=None,
                        help="model package (default: production CPU architecture, random weights)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=bm.DEFAULT_WORKDIR)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.split(","))
    inputs = {}
    if "case" in args.inputs:
        inputs["real CT " + args.case] = bm.case_path(args.data, args.case)
    if "clinical" in args.inputs:
        bm.clinical_ct(args.data, args.case, size, args.workdir)
        inputs[f"real CT {args.case} → {'×'.join(map(str, size))}"] = \
            args.workdir / f"{args.case}_{'x'.join(map(str, size))}.npy"
    for image in args.image:
        inputs[f"real {image.name.split('.')[0]}"] = image
    package = args.package or build_random_package(args.data, args.workdir)
    cuda = torch.cuda.is_available()
    devices = args.devices or (["cpu"] + (["cuda"] if cuda else []))

    rows = []
    for name, path in inputs.items():
        for device in devices:
            precisions = args.precisions if device == "cpu" else ["fp32", "fp16"]
            for precision in precisions:
                out = args.workdir / f"labels_{path.name.split('.')[0]}_{device}_{precision}.npy"
                cfg = {"volume": str(path), "package": str(package), "device": device, "precision": precision,
                       "modality": "auto" if path in args.image else "CT",
                       "repeats": args.repeats, "threads": args.threads, "labels_out": str(out)}
                r = bm.run_child(Path(__file__), ["--child", json.dumps(cfg)])
                r["labels_out"] = str(out)
                rows.append((name, device, precision, r))
                first = r["runs"][0]
                print(name, device, precision, {"first_s": round(first["total_s"], 2),
                      "later_median_s": round(statistics.median(x["total_s"] for x in r["runs"][1:]), 2)
                      if len(r["runs"]) > 1 else None,
                      "peak_extra_gb": round((r["hwm"] - r["baseline_rss"]) / GB, 3),
                      "timings_first": {k: round(v, 3) for k, v in first.items()}}, flush=True)

    print()
    print(bm.machine_line())
    some = rows[0][3]
    print(f"torch {some['torch']}, {some['threads']} threads; GPU: "
          f"{torch.cuda.get_device_name(0) if cuda else 'none (not measured)'}; model: "
          f"{'package ' + str(args.package) if args.package else 'production CPU architecture, random weights'}; "
          f"source matching on; first call in a fresh process, then median of the other {args.repeats - 1}.")
    print()
    print("| input | model grid (windows) | device | precision | total, first call | total, later (median) "
          "| preprocess | network | resample back | peak RSS − baseline | peak RSS (absolute) | < 6 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, device, precision, r in rows:
        later = r["runs"][1:] or r["runs"]
        med = {k: statistics.median(x[k] for x in later) for k in later[0]}
        extra = (r["hwm"] - r["baseline_rss"]) / GB
        shape = "×".join(map(str, reversed(r["input_shape"])))
        grid = "×".join(map(str, reversed(r["grid_kji"])))
        gpu = f" (GPU peak {r['cuda_peak'] / GB:.2f} GiB)" if r.get("cuda_peak") else ""
        label = name if shape in name else f"{name} ({shape})"
        print(f"| {label} | {grid} ({r['windows']}) | {device} | {precision} "
              f"| {r['runs'][0]['total_s']:.2f} s | {med['total_s']:.2f} s | {med['preprocess_s']:.2f} s "
              f"| {med['network_s']:.2f} s | {med['resample_back_s']:.2f} s | {extra:.2f} GiB{gpu} "
              f"| {r['hwm'] / GB:.2f} GiB | {'yes' if r['hwm'] < 6e9 else 'NO'} |")
    if not cuda:
        print("| — | — | cuda | — | GPU: not measured (no GPU was available) | | | | | | | |")

    print()
    print("Preprocessing split (medians of the later calls, from result.timings):")
    print()
    print("| input | device | precision | source matching | σ = 1 mm smoothing + resampling to the model grid "
          "+ normalising | needed-voxel mask |")
    print("|---|---|---|---|---|---|")
    for name, device, precision, r in rows:
        s = r["prepare_split"]
        print(f"| {name} | {device} | {precision} | {s['match_s']:.2f} s | {s['resample_in_s']:.2f} s "
              f"| {s['needed_mask_s']:.3f} s |")

    classes = None
    pairs = []
    for name in inputs:
        by_prec = {(d, p): r for n, d, p, r in rows if n == name}
        if ("cpu", "fp32") in by_prec and ("cpu", "bf16") in by_prec:
            a = np.load(by_prec[("cpu", "fp32")]["labels_out"])
            b = np.load(by_prec[("cpu", "bf16")]["labels_out"])
            classes = classes or max(5, int(max(a.max(), b.max())) + 1)
            pairs.append((name, *agreement(a, b, classes)))
    if pairs:
        print()
        print("bf16 vs fp32 labels (CPU):")
        print()
        print("| input | voxel agreement | Dice per label (bf16 vs fp32) | fp32 class fractions (0..n) |")
        print("|---|---|---|---|")
        for name, agree, dice, frac in pairs:
            d = ", ".join(f"{c}: {v:.4f}" for c, v in dice.items()) or "no foreground"
            f = ", ".join(f"{v:.3f}" for v in frac.values())
            print(f"| {name} | {agree:.5f} | {d} | {f} |")


if __name__ == "__main__":
    main()
