"""Slicer's own slice and 3D views, rendered offscreen from a slicer-core scene (no Slicer application).

Why: the module hands its result to Slicer's views; whether a segmentation shows up *where the organ is*
and *in the model's colours* is decided by Slicer's rendering pipeline (slice logic, layer blending,
segmentations displayable managers), not by our arrays. These helpers build that pipeline from the
slicer-core wheel — the same C++ classes Slicer uses — on an offscreen VTK render window (EGL on these
machines, no display needed), so tests can assert on rendered pixels and the README can show real
renderings. What they do not show is the module's Qt panel: that needs a Slicer build.

Conventions: ``render()`` returns an ``(height, width, 3)`` uint8 array whose row 0 is the **bottom** of
the view (VTK's display coordinates); :meth:`SliceView.pixel_ras` gives the world RAS position of every
pixel centre in the same layout. :func:`save_png` writes such arrays top-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # skip the X attempt (no display)


def _window(size: tuple[int, int]) -> tuple[Any, Any, Any]:
    import vtk

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # displayable managers expect one
    interactor.SetRenderWindow(window)
    return window, renderer, interactor


def _grab(window: Any) -> np.ndarray:
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3].copy()


def _group(factory_class: Any, app_logic: Any, renderer: Any, managers: tuple[str, ...]) -> Any:
    import slicer

    factory = factory_class.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in managers:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


class SliceView:
    """One of Slicer's slice views ("Red", "Yellow", "Green"): slice logic + layer image + the 2D
    segmentations displayable manager, as in Slicer's qMRMLSliceWidget."""

    def __init__(self, app: Any, name: str = "Red", orientation: str = "Axial", size: tuple[int, int] = (400, 400)):
        import slicer
        import vtk

        self.size = size
        self.window, self.renderer, self._interactor = _window(size)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.group = _group(slicer.vtkMRMLSliceViewDisplayableManagerFactory, app.app_logic, self.renderer,
                            ("vtkMRMLSegmentationsDisplayableManager2D",))
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        logics = app.app_logic.GetSliceLogics()
        if logics is None:
            logics = vtk.vtkCollection()
            app.app_logic.SetSliceLogics(logics)
        logics.AddItem(self.logic)
        self.logic.SetMRMLScene(app.scene)
        self.node = self.logic.AddSliceNode(name)
        self.node.SetOrientation(orientation)
        self.group.SetMRMLDisplayableNode(self.node)
        # the blended background/foreground/label layers, drawn as Slicer's light-box manager does
        self._mapper = vtk.vtkImageMapper()
        self._mapper.SetColorWindow(255)
        self._mapper.SetColorLevel(127.5)
        self._image_actor = vtk.vtkActor2D()
        self._image_actor.SetMapper(self._mapper)
        # Its own renderer on layer 0 under the displayable managers' (layer 1), as Slicer layers its
        # light-box image under them: in one renderer the segment fill would not blend over the image.
        self._image_renderer = vtk.vtkRenderer()
        self._image_renderer.SetLayer(0)
        self._image_renderer.AddViewProp(self._image_actor)
        self.window.SetNumberOfLayers(2)
        self.renderer.SetLayer(1)
        self.window.AddRenderer(self._image_renderer)
        self.logic.ResizeSliceNode(*size)

    def show(self, volume_node: Any, through_ras: Any = None) -> "SliceView":
        """Background volume, fitted to the view; optionally move the slice plane through ``through_ras``
        (the field of view stays fitted to the volume)."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.FitSliceToBackground()
        if through_ras is not None:
            self.node.JumpSliceByOffsetting(*[float(v) for v in through_ras])
        return self

    def render(self) -> np.ndarray:
        # the logic replaces its output pipeline when layers change (Slicer's view listens for that)
        self._mapper.SetInputConnection(self.logic.GetImageDataConnection())
        return _grab(self.window)

    def pixel_ras(self) -> np.ndarray:
        """World RAS of every pixel centre, ``(height, width, 3)``, row 0 at the bottom (as ``render``)."""
        m = np.array([[self.node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        w, h = self.size
        x, y = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float))
        xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1)
        return (xy @ m.T)[..., :3]


class ThreeDView:
    """Slicer's 3D view: camera, view (box, axis labels, background) and the 3D segmentations
    displayable manager, as in Slicer's qMRMLThreeDWidget."""

    def __init__(self, app: Any, size: tuple[int, int] = (400, 400)):
        import slicer

        self.size = size
        self.window, self.renderer, self._interactor = _window(size)
        self.group = _group(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, app.app_logic, self.renderer,
                            ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                             "vtkMRMLSegmentationsDisplayableManager3D"))
        self.node = slicer.vtkMRMLViewNode()
        self.node.SetLayoutName("1")
        self.node.SetSingletonTag("1")
        app.scene.AddNode(self.node)
        self.group.SetMRMLDisplayableNode(self.node)

    def look_from(self, direction_ras: Any, up_ras: Any = (0.0, 0.0, 1.0)) -> "ThreeDView":
        """Put the camera on the side ``direction_ras`` of the scene (e.g. (0, 1, 0): from anterior),
        looking at its centre, and fit the scene into the view."""
        self.renderer.ResetCamera()
        camera = self.renderer.GetActiveCamera()
        focal = np.array(camera.GetFocalPoint())
        camera.SetPosition(*(focal + 1000.0 * np.asarray(direction_ras, float)))
        camera.SetViewUp(*[float(v) for v in up_ras])
        self.renderer.ResetCamera()
        return self

    def render(self) -> np.ndarray:
        return _grab(self.window)


def save_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a ``render()`` array (row 0 at the bottom) as a PNG, top row first."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.ascontiguousarray(rgb[::-1]))
    return path
