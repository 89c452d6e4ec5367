"""Benchmark: source matching (SM) speed and memory on a clinical-size volume.

Run on demand (not part of the test suite)::

    python Testing/benchmarks/bench_matching.py                  # defaults below
    python Testing/benchmarks/bench_matching.py --case sabs_00 --size 512,512,300 --repeats 5

What it measures (the issue's target: a 512×512×300 volume matched in under 2 s on a 2-core machine,
with peak extra memory under 3× the input array):

* the input is a **real CT** of ``Dataset501_AbdomenCT`` (default ``sabs_00``, a test-split case,
  257×257×95 voxels) **resampled** (SimpleITK, linear) to 512×512×300 voxels over the same physical
  extent, stored as int16 HU — a real CT brought to clinical size, not a new acquisition;
* a float32 "MR-like" version of the same volume: a smooth monotone transform of the CT values onto
  [20, 1520] (non-integer floats, positive, like MR magnitudes). It exercises the float / MR path
  (``rint(x · 2048 / max)``); it is not a real MR image;
* the source profile is fitted with :meth:`SourceProfile.fit` on the 21 CT cases of the training split
  (timed too, with reading the files timed separately);
* ``match()`` time: median (and minimum) of ``--repeats`` runs after one warm-up, in this process, plus
  the median time of its three steps (preprocess, histogram + lookup table, apply in place);
* the time of the first full-size ``match()`` in a fresh process (after a warm-up on a small crop): it
  includes the kernel's first-touch page faults on the newly allocated output, which the repeated
  runs in one process may partly avoid;
* peak extra memory, each volume in a **fresh subprocess**: (1) ``tracemalloc`` peak during
  ``match()`` (numpy reports its array allocations to tracemalloc; the input is allocated before
  tracing starts, so only what ``match`` allocates counts, including its int16 output), and (2) the
  process's peak RSS (``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs``
  just before the call) minus its RSS just before the call. Both are given in MiB and as a multiple
  of the input array's size.

It prints a Markdown table headed by the machine and date. The helpers below (clinical-size volume,
``/proc`` memory readings, subprocess runner) are shared with ``bench_inference.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATASET = "Dataset501_AbdomenCT"
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "srcsm-bench"
MB = 1024 ** 2


# ------------------------------------------------------------------------------------ shared helpers


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1024 ** 3
    except OSError:
        pass
    return float("nan")


def machine_line() -> str:
    return (f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {total_ram_gib():.1f} GiB RAM; "
            f"Python {platform.python_version()}, numpy {np.__version__}; {datetime.date.today().isoformat()}")


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of this process from /proc/self/status (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script`` in a fresh interpreter and parse the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(REPO / "SRCSMSegmenter"), str(REPO), os.environ.get("PYTHONPATH")]))})
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_path(data: Path, case: str, dataset: str = DEFAULT_DATASET) -> Path:
    return data / dataset / "imagesTr" / f"{case}_0000.nii.gz"


def clinical_ct(data: Path, case: str, size_xyz: tuple[int, int, int], workdir: Path):
    """A real CT case resampled (linear) to ``size_xyz`` voxels over the same physical extent, int16.

    Cached in ``workdir`` as ``.npy`` + geometry JSON (so subprocesses load it without resampling).
    """
    import SimpleITK as sitk

    from SRCSMSegmenterLib.image import Geometry, Volume

    stem = workdir / f"{case}_{'x'.join(map(str, size_xyz))}"
    npy, meta = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.exists() and meta.exists():
        g = json.loads(meta.read_text())
        return Volume(np.load(npy), Geometry(tuple(g["origin"]), tuple(g["spacing"]), tuple(g["direction"])))
    workdir.mkdir(parents=True, exist_ok=True)
    src = sitk.ReadImage(str(case_path(data, case)))
    old_size = np.array(src.GetSize(), dtype=float)
    old_sp = np.array(src.GetSpacing())
    new_size = np.array(size_xyz, dtype=float)
    new_sp = old_size * old_sp / new_size  # same physical extent (voxel edges)
    direction = np.array(src.GetDirection()).reshape(3, 3)
    origin = np.array(src.GetOrigin()) + direction @ ((new_sp - old_sp) / 2)
    ref = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    ref.SetSpacing(tuple(new_sp))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(src.GetDirection())
    lo = float(sitk.GetArrayViewFromImage(src).min())
    out = sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, lo,
                        sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    arr = np.rint(arr, out=arr).astype(np.int16)
    geometry = Geometry(tuple(out.GetOrigin()), tuple(out.GetSpacing()), tuple(out.GetDirection()))
    np.save(npy, arr)
    meta.write_text(json.dumps({"origin": geometry.origin, "spacing": geometry.spacing,
                                "direction": geometry.direction, "source": str(case_path(data, case)),
                                "how": "SimpleITK linear resampling over the same physical extent"}))
    return Volume(arr, geometry)


def mr_like(volume):
    """float32 'MR-like' intensities: a smooth monotone transform of the CT onto [20, 1520]."""
    from SRCSMSegmenterLib.image import Volume

    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    out = np.empty(a.shape, dtype=np.float32)
    flat_in, flat_out = a.reshape(-1), out.reshape(-1)
    step = 8_000_000
    for s in range(0, flat_in.size, step):
        x = (flat_in[s:s + step].astype(np.float32) - lo) / (hi - lo)
        flat_out[s:s + step] = 20.0 + 1500.0 * np.sqrt(x, out=x)
    return Volume(out, volume.geometry)


def save_volume_npy(volume, path: Path) -> None:
    np.save(path.with_suffix(".npy"), volume.array)
    g = volume.geometry
    path.with_suffix(".json").write_text(json.dumps({"origin": g.origin, "spacing": g.spacing,
                                                     "direction": g.direction}))


def load_volume_npy(path: Path):
    from SRCSMSegmenterLib.image import Geometry, Volume

    g = json.loads(path.with_suffix(".json").read_text())
    return Volume(np.load(path.with_suffix(".npy")),
                  Geometry(tuple(g["origin"]), tuple(g["spacing"]), tuple(g["direction"])))


def source_profile(data: Path, workdir: Path, dataset: str = DEFAULT_DATASET, split: str = "train"):
    """(profile fitted on the split's images, seconds to read them, median seconds to fit, number of images)."""
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.matching import SourceProfile

    root = data / dataset
    meta = json.loads((root / "dataset.json").read_text())
    modality = meta.get("modality", "CT")
    cases = json.loads((root / "splits.json").read_text())[split]
    t0 = time.perf_counter()
    arrays = [read_volume(case_path(data, c, dataset)).array for c in cases]
    t_read = time.perf_counter() - t0
    t_fit = _median_time(lambda: SourceProfile.fit(arrays, modality), repeats=3, warmup=False)
    profile = SourceProfile.fit(arrays, modality)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"profile_{dataset}_{split}.json").write_text(profile.model_dump_json())
    return profile, t_read, t_fit, len(arrays), sum(a.size for a in arrays)


def _median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    return statistics.median(_times(fn, repeats, warmup))


def _times(fn: Callable[[], object], repeats: int, warmup: bool = True) -> list[float]:
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------ child: memory probe


def child_memory(volume_path: Path, modality: str, profile_path: Path) -> dict:
    from SRCSMSegmenterLib.image import Volume
    from SRCSMSegmenterLib.matching import SourceProfile, match

    volume = load_volume_npy(volume_path)
    profile = SourceProfile.model_validate_json(profile_path.read_text())
    # warm-up on a small crop: imports, lazy initialisation and code pages are not "extra memory"
    k, j, i = (n // 2 for n in volume.shape)
    crop = Volume(np.ascontiguousarray(volume.array[k - 8:k + 8, j - 64:j + 64, i - 64:i + 64]), volume.geometry)
    match(crop, profile, modality)
    del crop
    input_bytes = volume.array.nbytes

    # (1) peak RSS, without tracemalloc running
    can_reset = reset_peak_rss()
    before = proc_status()
    t0 = time.perf_counter()
    result = match(volume, profile, modality)
    seconds = time.perf_counter() - t0
    after = proc_status()
    rss_extra = after["VmHWM"] - before["VmRSS"] if can_reset else float("nan")
    out_bytes = result.array.nbytes
    del result

    # (2) tracemalloc peak of everything match() allocates (numpy arrays included)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    result = match(volume, profile, modality)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"input_bytes": input_bytes, "output_bytes": out_bytes, "traced_peak_extra": peak - base,
            "rss_before": before["VmRSS"], "rss_peak_extra": rss_extra, "seconds_in_child": seconds,
            "peak_rss_reset": can_reset}


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the nnU-Net datasets")
    parser.add_argument("--case", default="sabs_00", help="CT case resampled to clinical size")
    parser.add_argument("--size", default="512,512,300", help="clinical size x,y,z")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache for the resampled volumes")
    parser.add_argument("--prepare-only", action="store_true", help="build the cached volumes and profile, then stop")
    parser.add_argument("--child-memory", nargs=3, metavar=("VOLUME", "MODALITY", "PROFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_memory:
        vol, modality, prof = args.child_memory
        print(json.dumps(child_memory(Path(vol), modality, Path(prof))))
        return

    from SRCSMSegmenterLib.matching import fit_mapping, fit_raw_mapping, match, preprocess_for_matching

    size = tuple(int(v) for v in args.size.split(","))
    t0 = time.perf_counter()
    ct = clinical_ct(args.data, args.case, size, args.workdir)
    mr = mr_like(ct)
    mr_path = args.workdir / f"{args.case}_{'x'.join(map(str, size))}_mrlike_f32"
    if not mr_path.with_suffix(".npy").exists():
        save_volume_npy(mr, mr_path)
    ct_path = args.workdir / f"{args.case}_{'x'.join(map(str, size))}"
    print(f"volumes ready in {time.perf_counter() - t0:.1f} s: CT {ct.array.dtype} {ct.shape} "
          f"spacing {tuple(round(s, 4) for s in ct.geometry.spacing)}", flush=True)
    profile, t_read, t_fit, n_fit, vox_fit = source_profile(args.data, args.workdir)
    profile_path = args.workdir / f"profile_{DEFAULT_DATASET}_train.json"
    print(f"profile: {n_fit} images, {vox_fit / 1e6:.1f} M voxels; read {t_read:.2f} s, fit {t_fit:.3f} s", flush=True)
    if args.prepare_only:
        return

    rows = []
    for name, volume, path, modality in (("CT int16 (HU)", ct, ct_path, "CT"),
                                         ("MR-like float32", mr, mr_path, "MR")):
        times = _times(lambda: match(volume, profile, modality), args.repeats)
        state: dict = {}
        if fit_raw_mapping(volume.array, profile, modality) is not None:
            # integer image: match() counts raw values and looks them up (no preprocessing pass)
            t_pre = float("nan")
            t_map = _median_time(lambda: state.update(raw=fit_raw_mapping(volume.array, profile, modality)),
                                 args.repeats)
            t_apply = _median_time(lambda: state["raw"].apply(volume.array, np.int16), args.repeats)
        else:
            def pre() -> None:
                state["values"], state["scale"] = preprocess_for_matching(volume.array, modality)

            def mapping() -> None:
                state["mapping"] = fit_mapping(volume.array, profile, modality, values=state["values"],
                                               scale=state["scale"])

            t_pre = _median_time(pre, args.repeats)
            t_map = _median_time(mapping, args.repeats)
            apply_times = []
            for _ in range(args.repeats + 1):
                pre()
                t1 = time.perf_counter()
                state["mapping"].apply_inplace(state["values"])
                apply_times.append(time.perf_counter() - t1)
            t_apply = statistics.median(apply_times[1:])
        state.clear()
        mem = run_child(Path(__file__), ["--child-memory", str(path), modality, str(profile_path)])
        rows.append((name, volume, times, t_pre, t_map, t_apply, mem))
        print(name, {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                     "preprocess_s": round(t_pre, 3), "hist_lut_s": round(t_map, 3), "apply_s": round(t_apply, 3),
                     "traced_x": round(mem["traced_peak_extra"] / mem["input_bytes"], 2),
                     "rss_x": round(mem["rss_peak_extra"] / mem["input_bytes"], 2)}, flush=True)

    print()
    print(machine_line())
    print(f"Input: {args.case} (real CT, {DEFAULT_DATASET}) resampled linearly to {'×'.join(map(str, size))} "
          f"over the same extent; profile fitted on {n_fit} training CTs; match() median of {args.repeats} "
          f"after a warm-up; memory in a fresh subprocess per row.")
    print()
    print("| input | voxels | input array | match() median (min) | first call, fresh process | preprocess | histogram + LUT "
          "(integer: raw counts + table) | apply (integer: lookup into a new array) "
          "| peak extra, tracemalloc | peak extra, RSS | < 2 s | < 3× input |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, volume, times, t_pre, t_map, t_apply, mem in rows:
        inb = mem["input_bytes"]
        tr, rss = mem["traced_peak_extra"], mem["rss_peak_extra"]
        worst = max(tr, rss)
        print(f"| {name} | {'×'.join(map(str, reversed(volume.shape)))} | {inb / MB:.0f} MiB "
              f"| {statistics.median(times):.2f} s ({min(times):.2f} s) | {mem['seconds_in_child']:.2f} s | {'—' if t_pre != t_pre else f'{t_pre:.2f} s'} | {t_map:.2f} s "
              f"| {t_apply:.2f} s | {tr / MB:.0f} MiB ({tr / inb:.2f}×) | {rss / MB:.0f} MiB ({rss / inb:.2f}×) "
              f"| {'yes' if statistics.median(times) < 2 else 'NO'} | {'yes' if worst < 3 * inb else 'NO'} |")
    print()
    print("| step | data | time |")
    print("|---|---|---|")
    print(f"| SourceProfile.fit | {n_fit} CT training images, {vox_fit / 1e6:.1f} M voxels, already in memory "
          f"| {t_fit:.2f} s (median of 3) |")
    print(f"| reading those images (read_volume, .nii.gz) | same | {t_read:.2f} s (once) |")

if __name__ == "__main__":
    main()
