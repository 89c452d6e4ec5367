"""``srcsm demo``: the main job on the bundled sample.

Segments the bundled CHAOS T2 MR case with the bundled abdomen model trained on CT only (source
matching on) and prints the Dice per organ against the case's reference labels — the product's
promise in one command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ModelPackageError
from .image import read_volume

DEMO_MODEL = "abdomen-ct-srcsm"
SAMPLE_IMAGE = "chaos_01_t2spir.nii.gz"
SAMPLE_LABELS = "chaos_01_t2spir_labels.nii.gz"


def sample_dir() -> Path:
    if os.environ.get("SRCSM_SAMPLE_DIR"):
        return Path(os.environ["SRCSM_SAMPLE_DIR"])
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "Resources" / "Sample", here.parent / "Resources" / "Sample"):
        if (cand / SAMPLE_IMAGE).is_file():
            return cand
    raise ModelPackageError("The demo sample is missing from this installation (Resources/Sample). Reinstall.")


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, values: list[int]) -> dict[int, float]:
    """Dice per label value (NaN when the label is absent from both)."""
    out = {}
    for v in values:
        p, r = prediction == v, reference == v
        denom = int(p.sum()) + int(r.sum())
        out[v] = float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


def run_demo(output_dir: Path, device: str = "auto", reporter=None) -> int:
    from .catalog import Catalog
    from .inference import Segmenter
    from .segio import write_seg_nrrd

    catalog = Catalog()
    bundled = [e for e in catalog.entries() if e.id == DEMO_MODEL and e.path is not None]
    if not bundled:
        raise ModelPackageError(
            f"The bundled model '{DEMO_MODEL}' is not available in this version: the trained models have not "
            f"landed yet (they are produced by `python -m train` — see README, 'Training'). Until then, "
            f"install a model package with `srcsm models install FILE.zip` and run "
            f"`srcsm segment INPUT OUTPUT --model ID`."
        )
    package = catalog.resolve(DEMO_MODEL)
    folder = sample_dir()
    image = read_volume(folder / SAMPLE_IMAGE)
    reference = read_volume(folder / SAMPLE_LABELS)
    segmenter = Segmenter(package, device=device, progress=reporter)
    result = segmenter.segment(image, source_matching=True, target_modality="MR")
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / "chaos_01_t2spir.seg.nrrd"
    write_seg_nrrd(result.labelmap, package.card.labels, out, overwrite=True)
    values = [lab.value for lab in package.card.labels.labels]
    dice = dice_per_label(result.labelmap.array, reference.array.astype(np.uint8), values)
    if reporter is not None:
        reporter.done(output=str(out.resolve()), model=package.id,
                      dice={package.card.labels.by_value(v).name: round(d, 4) for v, d in dice.items()})
    print(f"SRCSM demo: model '{package.id}' (trained on {package.card.source.modality}) applied to an MR T2 case "
          f"it never saw, with source matching, on {result.device} ({result.timings['total_s']:.1f} s).")
    for v, d in dice.items():
        print(f"  Dice {package.card.labels.by_value(v).name:<12} {d:.3f}")
    print(f"  mean Dice      {np.nanmean(list(dice.values())):.3f}")
    print(f"Result: {out.resolve()}  (open it in 3D Slicer together with {folder / SAMPLE_IMAGE})")
    return 0
