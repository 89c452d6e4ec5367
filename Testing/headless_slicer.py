"""A headless Slicer "application" on slicer-core: a scene plus the module logics logic code expects.

Shared by the ``slicer_app`` fixture (Testing/conftest.py) and scripts that render Slicer views
(Testing/slicer_module/render_views_figure.py); see SLICER-TESTING.md, S1.
"""

from __future__ import annotations

import types


def new_slicer_app() -> types.SimpleNamespace:
    """Fresh MRML scene + the module logics logic code expects (SLICER-TESTING.md, S1)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)  # otherwise VolumesLogic logs "invalid Colors module logic"
    logics = {"colors": colors}
    for name, cls in [("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)]:
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, **logics)
