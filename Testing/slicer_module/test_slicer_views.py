"""The module's result as Slicer's own views render it (slicer-core displayable managers, offscreen).

A segmentation can be voxel-exact in memory and still show up in the wrong place — a wrong parent
transform, reference geometry or display node would do it — so these tests look at rendered pixels:
every pixel of a slice view is mapped back to the world (the slice node's XY→RAS) and from there into
the case's reference label file, and the overlay must cover exactly those pixels, in the colour the
model card gives each label. The input sits under a rotating parent transform and has a left-handed,
slightly oblique grid (CHAOS case 2), so geometry mistakes cannot cancel out.
"""

from __future__ import annotations

import numpy as np
import pytest
from offscreen_views import SliceView, ThreeDView
from scipy import ndimage
from slicer_module_helpers import fake_result_from_real_labels, linear_transform
from SRCSMSegmenterLib.image import read_volume
from SRCSMSegmenterLib.module_logic import SegmentationRequest

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _reference_at(label_volume, world_ras: np.ndarray, to_parent: np.ndarray) -> np.ndarray:
    """The reference label at world RAS points (nearest voxel; 0 outside the volume)."""
    local = np.c_[world_ras.reshape(-1, 3), np.ones(world_ras[..., 0].size)] @ np.linalg.inv(to_parent).T
    lps = local[:, :3] * [-1.0, -1.0, 1.0]
    ijk = np.rint(label_volume.geometry.physical_to_index(lps)).astype(int)
    shape_ijk = np.array(label_volume.shape[::-1])
    inside = np.all((ijk >= 0) & (ijk < shape_ijk), axis=1)
    out = np.zeros(len(ijk), np.uint8)
    out[inside] = np.asarray(label_volume.array)[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    return out.reshape(world_ras.shape[:-1])


@pytest.fixture
def imported(slicer_app, logic, model_card, mr_node, real_case):
    """The module's import of a finished job (real reference labels as the result) under a transform."""
    transform, to_parent = linear_transform(slicer_app.scene)
    mr_node.SetAndObserveTransformNodeID(transform.GetID())
    job, result = fake_result_from_real_labels(logic, SegmentationRequest(mr_node, model_card.id), real_case,
                                               to_parent)
    seg = logic.import_result(job, result)
    _, label_path, _ = real_case("Dataset502", "chaos_02")
    return seg, read_volume(label_path), to_parent


@pytest.mark.parametrize("orientation", ["Axial", "Coronal", "Sagittal"])
def test_slice_views_show_each_segment_on_its_organ_in_its_colour(
        slicer_app, model_card, mr_node, imported, orientation):
    seg, reference, to_parent = imported
    liver = np.argwhere(np.asarray(reference.array) == 1)[:, ::-1].mean(0)  # i, j, k
    centre = to_parent @ LPS_TO_RAS @ np.r_[reference.geometry.index_to_physical(liver[None])[0], 1.0]
    view = SliceView(slicer_app, "Red", orientation).show(mr_node, centre[:3])
    seg.GetDisplayNode().SetVisibility(False)
    plain = view.render().astype(float)
    seg.GetDisplayNode().SetVisibility(True)
    shown = view.render().astype(float)
    expected = _reference_at(reference, view.pixel_ras(), to_parent)
    assert plain.std() > 10, "the background volume is not rendered"

    changed = np.abs(shown - plain).max(-1) > 6
    inside = expected > 0
    dice = 2 * np.count_nonzero(changed & inside) / (changed.sum() + inside.sum())
    assert dice > 0.93, f"overlay and reference labels disagree on screen (Dice {dice:.3f})"

    opacity = seg.GetDisplayNode().GetOpacity2DFill() * seg.GetDisplayNode().GetOpacity()
    checked = 0
    for label in model_card.labels.labels:
        interior = ndimage.binary_erosion(expected == label.value, iterations=3)
        if interior.sum() < 50:
            continue  # not (or barely) cut by this slice
        # the fill is blended over the image: shown = (1 - a) · plain + a · colour per channel, with a the
        # display node's 2D fill opacity; a line through the interior pixels (the image varies there)
        # recovers both
        fits = np.array([np.polyfit(plain[interior][:, c], shown[interior][:, c], 1) for c in range(3)])
        alpha = 1 - fits[:, 0]
        assert alpha == pytest.approx(opacity, abs=0.05), label.name
        assert fits[:, 1] / alpha / 255 == pytest.approx(label.color, abs=0.05), label.name
        checked += 1
    assert checked >= 1


def test_three_d_view_shows_the_organs_on_the_patients_sides(slicer_app, model_card, imported):
    """Seen from the front in Slicer's 3D view, the liver (patient's right) is drawn left of the spleen
    and above the kidneys' centre only where anatomy says so: the closed surfaces are in world space."""
    seg, reference, to_parent = imported
    seg.CreateClosedSurfaceRepresentation()
    view = ThreeDView(slicer_app).look_from((0, 1, 0))
    segmentation = seg.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    display = seg.GetDisplayNode()
    for segment_id in ids:
        display.SetSegmentVisibility(segment_id, False)
    empty = view.render().astype(float)
    centres = {}
    for segment_id, label in zip(ids, model_card.labels.labels):
        display.SetSegmentVisibility(segment_id, True)
        drawn = np.abs(view.render().astype(float) - empty).max(-1) > 10
        display.SetSegmentVisibility(segment_id, False)
        assert drawn.sum() > 100, f"{label.name} is not drawn in 3D"
        centres[label.name] = np.argwhere(drawn).mean(0)  # (row from the bottom, column)
    assert centres["liver"][1] < centres["spleen"][1]  # from the front, the patient's right is screen left
    assert centres["right kidney"][1] < centres["left kidney"][1]


def test_readme_figure_renders_the_bundled_models_result(tmp_path):
    """The README's figure script runs the bundled CT model on the bundled MR sample through the module's
    import and Slicer's views; the picture has four panels with content."""
    import matplotlib.image as mpimg
    from render_views_figure import render

    png = render(tmp_path / "views.png", size=160)
    rgb = mpimg.imread(png)[..., :3]
    assert rgb.shape[1] > 2 * rgb.shape[0]  # four panels side by side
    quarters = np.array_split(rgb[rgb.shape[0] // 4:], 4, axis=1)
    assert all(q.std() > 0.05 for q in quarters)
