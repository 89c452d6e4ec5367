"""Helpers shared by the Slicer-module tests (importable by name; conftest.py files are not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SRCSMSegmenter"
MODULE_FILE = MODULE_DIR / "SRCSMSegmenter.py"
LIB_DIR = MODULE_DIR / "SRCSMSegmenterLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SRCSMSegmenter.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"


def load_real_volume(slicer_app, real_case, dataset: str, case: str, name: str | None = None):
    """A volume node read by Slicer's own reader from a real case (exact IJK→RAS from the file)."""
    image, _, _ = real_case(dataset, case)
    node = slicer_app.volumes.AddArchetypeVolume(str(image), name or case)
    assert node is not None, f"Slicer could not read {image}"
    return node


def linear_transform(scene, degrees: float = 20.0, translation=(15.0, -25.0, 10.0)):
    """A vtkMRMLLinearTransformNode rotating about an oblique axis and translating → (node, 4×4 to-parent)."""
    import vtk

    axis = np.array([0.3, 0.4, 1.0]) / np.linalg.norm([0.3, 0.4, 1.0])
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    m[:3, 3] = translation
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, m[r, c])
    node.SetMatrixTransformToParent(vm)
    return node, m




def fake_result_from_real_labels(logic, request, real_case, transform_matrix=None, case: str = "chaos_02"):
    """A prepared job whose "background result" is the case's REAL reference labels, written as the
    CLI writes them (world geometry when the input is under a transform). No process runs."""
    from SRCSMSegmenterLib.image import Volume, read_volume
    from SRCSMSegmenterLib.process_runner import ProcessResult
    from SRCSMSegmenterLib.segio import write_seg_nrrd

    job = logic.prepare(request)
    _, label_path, table = real_case("Dataset502", case)
    labels = read_volume(label_path)
    if transform_matrix is not None:  # the CLI worked in world coordinates
        labels = Volume.from_ijk_to_ras(labels.array, transform_matrix @ labels.ijk_to_ras())
    write_seg_nrrd(labels, table, job.output_path)
    return job, ProcessResult("succeeded", 0, "Finished.", done={"output": str(job.output_path)})
