"""The ``srcsm`` command: segment, source-match, manage models, run the demo.

Exit codes: 0 success, 1 unexpected failure (a bug: please report it), 2 bad input or model (the
message says what to fix), 130 cancelled. Progress goes to stderr (a bar, or ``--progress json``
lines for the Slicer module); results are never written partially (atomic writes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import CancelledError, InputError, ModelPackageError, SRCSMError

DEFAULT_MODEL = "abdomen-ct-srcsm"
SEG_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


DEVICE_HELP = ("where the network runs: auto (CUDA, then Apple MPS, then the CPU; the default), cpu, gpu (this "
               "platform's GPU: CUDA on Linux/Windows, MPS on macOS), cuda or mps")
PRECISION_HELP = ("numeric precision of the network: auto (fp16 on a GPU, bf16 on CPUs with native bf16, else "
                  "fp32; the default), fp32, bf16 or fp16 (GPU only)")
SERIES_HELP = "SeriesInstanceUID to read when INPUT is a DICOM folder with several series (default: the largest)"
MODEL_HELP = f"catalogue id (see `srcsm models list`) or package folder/.zip (default: {DEFAULT_MODEL})"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress on stderr: a bar (default), JSON lines (for the Slicer module) or nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srcsm",
        description="Segment medical images from domains the model never saw (SRCSM: semantic-aware random "
                    "convolution + source matching).",
    )
    parser.add_argument("--version", action="version", version=f"srcsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a volume into a .seg.nrrd (Slicer) or a labelmap")
    s.add_argument("input", help="NIfTI, NRRD, MHA file or a DICOM series folder")
    s.add_argument("output", help="OUTPUT.seg.nrrd (segments with names/colours/terminology) or a labelmap "
                                   ".nii.gz/.nrrd/.mha")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--series", default=None, metavar="UID", help=SERIES_HELP)
    s.add_argument("--no-source-matching", action="store_true", help="skip source matching (SM)")
    s.add_argument("--target-modality", choices=["auto", "CT", "MR"], default="auto",
                   help="modality of the INPUT (decides the SM preprocessing rule); auto: CT if it holds HU air")
    s.add_argument("--device", choices=["auto", "cpu", "cuda", "mps", "gpu"], default="auto", help=DEVICE_HELP)
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help=PRECISION_HELP)
    from .postprocess import add_arguments as postprocess_arguments

    postprocess_arguments(s)
    s.add_argument("--inference", choices=["card", "whole-grid", "sliding-window"], default="card",
                   help="how the network runs over the scan: as the model card says (card, the default), one "
                        "pass over the whole model grid, or sliding windows of the training patch")
    s.add_argument("--roi-ras", type=float, nargs=6, metavar=("R0", "A0", "S0", "R1", "A1", "S1"),
                   help="limit the work to a box given by two opposite corners in RAS millimetres")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_common(s)

    m = sub.add_parser("match", help="write the source-matched image (what the network sees, before normalisation)")
    m.add_argument("input", help="NIfTI, NRRD, MHA file or a DICOM series folder")
    m.add_argument("output", help="the source-matched image: .nii.gz, .nrrd or .mha")
    m.add_argument("--model", default=None, help=MODEL_HELP + "; its source profile is matched to")
    m.add_argument("--series", default=None, metavar="UID", help=SERIES_HELP)
    m.add_argument("--target-modality", choices=["auto", "CT", "MR"], default="auto",
                   help="modality of the INPUT (decides the SM preprocessing rule); auto: CT if it holds HU air")
    m.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_common(m)

    ms = sub.add_parser("models", help="list, inspect, install or remove model packages")
    msub = ms.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="bundled, installed and downloadable models")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    mi = msub.add_parser("info", help="the model card of a model")
    mi.add_argument("model", help="catalogue id or package path")
    mi.add_argument("--json", action="store_true", help="the whole card as JSON (machine-readable)")
    mn = msub.add_parser("install", help="install a model: a package .zip/folder (offline), a downloadable id "
                                         "of the catalogue, or a URL of a package zip")
    mn.add_argument("source", help="package .zip or folder, a downloadable id (`srcsm models list`), or an "
                                   "https:// URL of a package zip (needs --sha256)")
    mn.add_argument("--sha256", default=None, metavar="HEX",
                    help="expected sha256 of the zip, verified before installing (required for a URL)")
    mn.add_argument("--overwrite", action="store_true", help="replace an installed model with the same id")
    mr = msub.add_parser("remove", help="remove a user-installed model")
    mr.add_argument("model", help="id of a user-installed model (bundled models cannot be removed)")

    d = sub.add_parser("demo", help="segment the bundled MR sample with the bundled CT-trained model")
    d.add_argument("--output-dir", default="srcsm-demo", help="where to write the result (default: ./srcsm-demo)")
    d.add_argument("--device", choices=["auto", "cpu", "cuda", "mps", "gpu"], default="auto", help=DEVICE_HELP)
    _add_common(d)

    w = sub.add_parser("web", help="open the segmentation workflow in a browser (needs the 'web' extra)")
    w.add_argument("--data", default=".", help="the folder the page loads volumes from and saves results into "
                                              "(default: the current folder)")
    w.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this computer)")
    w.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080; 0: any free port)")
    w.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback (the page has "
                                                               "no login: trusted networks only)")
    w.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload (default: 512)")
    return parser


# ----------------------------------------------------------------------------------- helpers
def _catalog():
    from .catalog import Catalog

    return Catalog()


def _output_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(SEG_SUFFIX):
        return "seg"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise InputError(
        f"Cannot tell the output format from '{path.name}'. End the name with .seg.nrrd (Slicer segmentation) "
        f"or .nii.gz / .nrrd / .mha (labelmap)."
    )


def _check_output(path: Path, overwrite: bool, input_path: Path | None = None) -> None:
    if input_path is not None and path.resolve() == input_path.resolve():
        raise InputError("OUTPUT is the same file as INPUT; refusing to overwrite the input. Choose another name.")
    if path.exists() and not overwrite:
        raise InputError(f"'{path}' already exists. Choose another output name or pass --overwrite.")


def _roi_bounds(roi_ras: Sequence[float] | None):
    if roi_ras is None:
        return None
    import numpy as np

    a = np.array(roi_ras[:3]) * [-1, -1, 1]
    b = np.array(roi_ras[3:]) * [-1, -1, 1]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if np.any(hi - lo <= 0):
        raise InputError("--roi-ras describes an empty box; give two opposite corners.")
    return lo, hi


class _CancelOnSignal:
    """SIGTERM/SIGINT set a flag that the segmenter polls, so a cancelled run stops cleanly (and the
    atomic writer leaves no partial file)."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not in the main thread
                pass

    def _handler(self, signum, frame) -> None:  # noqa: ANN001
        if self.flag:  # second signal: stop right away
            raise KeyboardInterrupt
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


def _announce(package, volume, args: argparse.Namespace, reporter, source_matching: bool) -> str:
    """Decide the input's modality once (the segmenter then uses exactly this) and say which model runs on
    what: a wrong model or modality must be visible before the work, not found in the result."""
    from .matching import guess_modality
    from .model_info import run_summary

    detected = args.target_modality == "auto"
    modality = guess_modality(volume.array) if detected else args.target_modality
    reporter.message(run_summary(package.card, modality, detected, source_matching,
                                 default_model=args.model is None), "info")
    return modality


def _plausibility_warnings(labelmap, package, roi: bool) -> list[str]:
    """The core's plausibility check, naming the other catalogue models as the fix."""
    from .model_info import source_text
    from .plausibility import Alternative, check_segmentation

    try:
        alternatives = [Alternative(e.id, e.card.anatomy, source_text(e.card)) for e in _catalog().entries()
                        if e.card is not None]
    except SRCSMError:  # a malformed catalogue must not cost the user the result
        alternatives = []
    card = package.card
    return check_segmentation(labelmap, card.labels, card.training_label_stats, card.id, card.anatomy, roi=roi,
                              alternatives=alternatives)


def _thin_view_fix(package, result) -> list[str]:
    """When the Segmenter found the view thinner than the chosen model handles reliably
    (``result.thin_view_mm``), the catalogue models of the same anatomy whose measured slabs held at that
    thickness on that modality (the fix for the core's thin-view warning)."""
    from .field_of_view import format_mm, models_holding_at

    extent, modality = result.thin_view_mm, result.target_modality
    if extent is None or modality is None:
        return []
    card = package.card
    try:
        cards = [e.card for e in _catalog().entries() if e.card is not None]
    except SRCSMError:  # a malformed catalogue must not cost the user the result
        return []
    better = models_holding_at(extent, modality, card.anatomy, cards, card.id,  # type: ignore[arg-type]
                               result.thin_view_voxel_mm)
    if not better:
        return []
    names = "; ".join(f"`--model {model_id}` held it on {modality} slabs from {held:g} mm" for model_id, held in better)
    return [f"For {format_mm(extent)} mm of {modality} a better-suited model is installed: {names}."]


# ---------------------------------------------------------------------------------- commands
def cmd_segment(args: argparse.Namespace, reporter) -> int:
    from .image import read_volume
    from .inference import Segmenter
    from .segio import write_labelmap, write_seg_nrrd

    out = Path(args.output)
    kind = _output_kind(out)
    _check_output(out, args.overwrite, Path(args.input))
    from .postprocess import resolve as resolve_postprocessing

    package = _catalog().resolve(args.model or DEFAULT_MODEL)
    postprocessing = resolve_postprocessing(package.card.postprocessing, args.postprocess)
    reporter(0.0, "Reading the input")
    volume = read_volume(args.input, series=args.series, report=lambda text: reporter.message(text, "warning"))
    modality = _announce(package, volume, args, reporter, source_matching=not args.no_source_matching)
    segmenter = Segmenter(package, device=args.device, precision=args.precision, progress=reporter,
                          cancel=_CancelOnSignal(), strategy=args.inference.replace("-", "_"))
    result = segmenter.segment(volume, source_matching=not args.no_source_matching,
                               target_modality=modality, postprocessing=postprocessing,
                               roi_bounds=_roi_bounds(args.roi_ras))
    warnings = (list(result.messages) + _thin_view_fix(package, result)
                + _plausibility_warnings(result.labelmap, package, roi=args.roi_ras is not None))
    for msg in warnings:
        reporter.message(msg, "warning")
    if kind == "seg":
        write_seg_nrrd(result.labelmap, package.card.labels, out, overwrite=True)
    else:
        write_labelmap(result.labelmap, out, overwrite=True)
    counts = {lab.name: int((result.labelmap.array == lab.value).sum()) for lab in package.card.labels.labels}
    reporter.done(output=str(out.resolve()), model=package.id, device=result.device, precision=result.precision,
                  source_matching=result.source_matching, postprocessing=result.postprocessing,
                  inference=result.strategy,
                  seconds=round(result.timings["total_s"], 2),
                  voxels=counts, target_modality=modality, warnings=warnings)
    if reporter.mode != "json":
        print(f"Wrote {out} ({package.id}, {result.device}/{result.precision}, "
              f"{result.timings['total_s']:.1f} s)", file=sys.stderr)
    return 0


def cmd_match(args: argparse.Namespace, reporter) -> int:
    from .image import read_volume, write_volume
    from .matching import match

    out = Path(args.output)
    _check_output(out, args.overwrite, Path(args.input))
    package = _catalog().resolve(args.model or DEFAULT_MODEL)
    reporter(0.1, "Reading the input")
    volume = read_volume(args.input, series=args.series, report=lambda text: reporter.message(text, "warning"))
    modality = _announce(package, volume, args, reporter, source_matching=True)
    reporter(0.5, "Source matching")
    matched = match(volume, package.card.source_profile, modality)
    write_volume(matched, out, overwrite=True)
    reporter.done(output=str(out.resolve()), model=package.id, target_modality=modality)
    if reporter.mode != "json":
        print(f"Wrote {out}: the input ({modality}) mapped onto the {package.card.source.modality} intensities of "
              f"{package.id} {package.card.version} — what its network sees before normalisation.", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    cat = _catalog()
    if args.models_command == "list":
        entries = cat.entries()
        if args.json:
            print(json.dumps([{"id": e.id, "name": e.name, "origin": e.origin,
                               "path": str(e.path) if e.path else None,
                               "modality": e.card.source.modality if e.card else None,
                               "labels": e.card.labels.names() if e.card else None,
                               "version": e.card.version if e.card else None,
                               "shadows": ({"origin": e.shadows.origin, "version": e.shadows.version,
                                            "path": str(e.shadows.path)} if e.shadows else None),
                               "url": e.download.url if e.download else None} for e in entries], indent=2))
            return 0
        if not entries:
            print("No models found. Install one with `srcsm models install FILE.zip`.")
            return 0
        width = max(len(e.id) for e in entries)
        for e in entries:
            what = (f"{e.card.source.modality:<3} {', '.join(e.card.labels.names())}" if e.card
                    else (e.download.description if e.download else "unreadable package"))
            print(f"{e.id:<{width}}  {e.origin:<12} {e.version:<8} {what}")
            if e.shadows is not None:
                print(f"{'':<{width}}  ↳ hides the bundled {e.id} {e.shadows.version} ({e.shadows.path}); "
                      f"`srcsm models remove {e.id}` brings it back")
        return 0
    if args.models_command == "info":
        card = cat.resolve(args.model).card
        if args.json:
            data = json.loads(card.model_dump_json())
            data["source_profile"] = {k: v for k, v in data["source_profile"].items() if k not in ("values", "cdf")}
            print(json.dumps(data, indent=2))
            return 0
        from .model_info import model_card_text

        entry = next((e for e in cat.entries() if e.id == args.model), None) if not Path(args.model).exists() else None
        print(model_card_text(card, entry.origin if entry else "", entry.path if entry else Path(args.model)))
        if entry is not None and entry.shadows is not None:
            print(f"\n  This installed model hides the bundled '{entry.id}' {entry.shadows.version} "
                  f"({entry.shadows.path}); `srcsm models remove {entry.id}` brings the bundled one back.")
        return 0
    if args.models_command == "install":
        entry = cat.install(args.source, expected_sha256=args.sha256, overwrite=args.overwrite)
        print(f"Installed '{entry.id}' {entry.version} to {entry.path}")
        if entry.shadows is not None:
            print(f"warning: it has the id of the bundled model '{entry.id}' {entry.shadows.version} and hides it: "
                  f"`--model {entry.id}` now means the installed one. `srcsm models remove {entry.id}` brings the "
                  f"bundled one back; re-export with its own id (`python -m train export … --id NEW-ID`) to keep "
                  f"both.", file=sys.stderr)
        return 0
    if args.models_command == "remove":
        path = cat.remove(args.model)
        print(f"Removed '{args.model}' ({path})")
        bundled = next((e for e in cat.bundled_entries() if e.id == args.model), None)
        if bundled is not None:
            print(f"'{args.model}' is now the bundled model again ({bundled.version}, {bundled.path}).")
        return 0
    return 1


def cmd_demo(args: argparse.Namespace, reporter) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output_dir), device=args.device, reporter=reporter)


def cmd_web(args: argparse.Namespace) -> int:
    from .web.server import serve  # trame is imported there, only for this command

    return serve(args.data, host=args.host, port=args.port, allow_remote=args.allow_remote,
                 max_upload_mb=args.max_upload_mb)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:  # a non-UTF-8 console (C locale, Windows code page) must not turn "≠" into a crash
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    args = build_parser().parse_args(argv)
    from .progress import ProgressReporter, json_stderr

    mode = getattr(args, "progress", "none")
    if mode == "bar" and not sys.stderr.isatty():
        mode = "none"  # no carriage-return garbage in logs
    reporter = ProgressReporter(mode)
    try:
        with json_stderr(reporter):  # --progress json: every stderr line a JSON object, library output too
            code = _dispatch(args, reporter)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The Python docs' recipe (library/signal, "Note on SIGPIPE"): the reader of our output is gone, which
        # is not an error to report; point stdout at devnull so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1  # what Python itself exits with on EPIPE


def _dispatch(args: argparse.Namespace, reporter) -> int:
    try:
        if args.command == "segment":
            return cmd_segment(args, reporter)
        if args.command == "match":
            return cmd_match(args, reporter)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "demo":
            return cmd_demo(args, reporter)
        if args.command == "web":
            return cmd_web(args)
    except CancelledError as exc:
        reporter.error(str(exc), "CancelledError")
        return 130
    except KeyboardInterrupt:
        reporter.error("Interrupted.", "CancelledError")
        return 130
    except (InputError, ModelPackageError, SRCSMError) as exc:
        reporter.error(str(exc), type(exc).__name__)
        return 2
    except BrokenPipeError:
        raise  # stdout's reader left: main() exits quietly
    except MemoryError:
        reporter.error("Out of memory. Use a region of interest (--roi-ras) or a machine with more RAM.",
                       "MemoryError")
        return 2
    except Exception as exc:  # noqa: BLE001 — last resort: report instead of a raw traceback in the GUI
        import traceback

        reporter.error(f"Unexpected error: {exc!r}. Please report it with this trace:\n{traceback.format_exc()}",
                       type(exc).__name__)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
