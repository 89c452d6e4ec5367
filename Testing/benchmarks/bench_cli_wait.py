"""Benchmark: how long a user waits for ``srcsm segment`` (cold process), next to the warm in-process time.

Why both: the warm time (``Segmenter.segment`` called again in a process that has already imported
torch, built the network and created oneDNN's primitives) is what the pipeline costs; a user who types
``srcsm segment …`` — or presses Segment in Slicer, which starts the same command in a background
process — also waits for the interpreter, the imports, reading the model package and the first call.

Run on demand (not part of the test suite)::

    python Testing/benchmarks/bench_cli_wait.py                          # bundled CT model, CHAOS MR cases
    python Testing/benchmarks/bench_cli_wait.py --model abdomen-ct-srcsm --repeats 3 \
        --image ../shared/data/Dataset502_AbdomenMRT2/imagesTr/chaos_01_0000.nii.gz

Prints one Markdown row per image: cold wall time of the command (min and median of ``--repeats``
fresh processes, ``--progress none``, device ``cpu``), the segment time the command itself reports,
and the warm in-process time (median of calls 2..N in one process), plus the 1-minute load average
before each measurement (other work on the machine inflates every number).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
DEFAULT_IMAGES = [DATA / "Dataset502_AbdomenMRT2" / "imagesTr" / f"{c}_0000.nii.gz" for c in ("chaos_01", "chaos_05")]


def cold_runs(image: Path, model: str, repeats: int) -> tuple[list[float], list[float], list[str]]:
    walls, cpus, loads = [], [], []
    srcsm = Path(sys.executable).with_name("srcsm")
    command = [str(srcsm)] if srcsm.exists() else [sys.executable, "-m", "SRCSMSegmenterLib.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            loads.append(f"{os.getloadavg()[0]:.1f}")
            out = Path(tmp) / f"out{i}.seg.nrrd"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([*command, "segment", str(image), str(out), "--model", model, "--device", "cpu",
                            "--progress", "none"], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus, loads


def warm_runs(image: Path, model: str, repeats: int) -> list[float]:
    sys.path.insert(0, str(REPO / "SRCSMSegmenter"))
    from SRCSMSegmenterLib.catalog import Catalog
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.inference import Segmenter

    segmenter = Segmenter(Catalog().resolve(model), device="cpu")
    volume = read_volume(image)
    times = []
    for _ in range(max(2, repeats)):
        t0 = time.perf_counter()
        segmenter.segment(volume)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="abdomen-ct-srcsm", help="catalogue id or package path")
    ap.add_argument("--image", action="append", type=Path, help="input volume (repeatable; default: 2 CHAOS MR)")
    ap.add_argument("--repeats", type=int, default=3, help="cold processes and warm calls per image")
    args = ap.parse_args()
    images = args.image or DEFAULT_IMAGES
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| image | cold `srcsm segment` wall (min / median) | its CPU time (median) | warm `Segmenter.segment` "
          "(median) | load avg |")
    print("|---|---|---|---|---|")
    for image in images:
        walls, cpus, loads = cold_runs(image, args.model, args.repeats)
        warm = warm_runs(image, args.model, args.repeats)
        print(f"| {image.name} | {min(walls):.1f} s / {statistics.median(walls):.1f} s | "
              f"{statistics.median(cpus):.1f} s | "
              f"{statistics.median(warm):.2f} s | {', '.join(loads)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
