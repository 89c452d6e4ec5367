"""Render the bundled CT model's result on the bundled MR sample as Slicer's views show it.

    python Testing/slicer_module/render_views_figure.py [--out docs/figures/slicer_views_demo.png]

The segmentation is made exactly as the module makes it — ``Segmenter.segment`` with source matching,
then the module's import (:func:`SRCSMSegmenterLib.mrml.segmentation_from_labelmap`: names, colours,
terminology, reference geometry) — and drawn by Slicer's own slice logic and segmentation displayable
managers from the slicer-core wheel, offscreen (``offscreen_views.py``): axial, coronal and sagittal
slice views through the liver with the segments as Slicer draws them by default (fill + outline), and the 3D view from the front. It is not a
screenshot of the module's panel (that needs a Slicer build); it is what Slicer's views render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

from headless_slicer import new_slicer_app  # noqa: E402
from offscreen_views import SliceView, ThreeDView  # noqa: E402


def render(out: Path, model: str = "abdomen-ct-srcsm", size: int = 360) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from SRCSMSegmenterLib.catalog import Catalog
    from SRCSMSegmenterLib.demo import SAMPLE_IMAGE, SAMPLE_LABELS, sample_dir
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.inference import Segmenter
    from SRCSMSegmenterLib.mrml import segmentation_from_labelmap
    from train.metrics import evaluate_case, read_label_map

    package = Catalog().resolve(model)
    image_path, labels_path = sample_dir() / SAMPLE_IMAGE, sample_dir() / SAMPLE_LABELS
    image = read_volume(image_path)
    result = Segmenter(package, device="cpu").segment(image, source_matching=True, target_modality="MR")
    names = {lab.value: lab.name for lab in package.card.labels.labels}
    rows = evaluate_case(result.labelmap, read_label_map(labels_path), names)
    dice = np.nanmean([r["dice"] for r in rows])

    app = new_slicer_app()
    volume = app.volumes.AddArchetypeVolume(str(image_path), image_path.name.split(".")[0])
    seg = segmentation_from_labelmap(app.scene, result.labelmap, package.card.labels, volume)
    seg.CreateClosedSurfaceRepresentation()

    liver = np.argwhere(np.asarray(result.labelmap.array) == 1)[:, ::-1].mean(0)
    lps = result.labelmap.geometry.index_to_physical(liver[None])[0]
    centre = lps * [-1.0, -1.0, 1.0]
    panels = []
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        panels.append((f"{orientation} (slice view)", SliceView(app, name, orientation, (size, size))
                       .show(volume, centre).render()))
    panels.append(("3D view, from the front", ThreeDView(app, (size, size)).look_from((0, 1, 0)).render()))

    fig = plt.figure(figsize=(4 * 3.2, 3.6), dpi=100)
    for i, (title, rgb) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.imshow(rgb[::-1])
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    per_label = ", ".join(f"{r['name']} {r['dice']:.2f}" for r in rows)
    fig.suptitle(f"{package.id} {package.card.version} (trained on CT) on the bundled CHAOS T2 MR sample, "
                 f"source matching on — mean Dice {dice:.2f} ({per_label})", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "figures" / "slicer_views_demo.png"))
    p.add_argument("--model", default="abdomen-ct-srcsm")
    args = p.parse_args(argv)
    print(render(Path(args.out), args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
