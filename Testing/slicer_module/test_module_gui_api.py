"""Checks of the module's GUI code against the real Slicer/Qt APIs it calls, without a Slicer GUI.

A property name the .ui sets that the widget class does not declare is silently ignored by
QUiLoader (it only logs a warning), and a deprecated or wrong keyword reaches the user's Slicer
only. The allowed names below are copied from Slicer's and Qt's headers (cited per list).
"""

from __future__ import annotations

import re
import types
import xml.etree.ElementTree as ET

import pytest
from slicer_module_helpers import MODULE_FILE, UI_FILE

#: Q_PROPERTYs of qMRMLNodeComboBox (Slicer Libs/MRML/Widgets/qMRMLNodeComboBox.h).
QMRML_NODE_COMBOBOX_PROPERTIES = {
    "nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes", "baseName", "noneEnabled",
    "addEnabled", "removeEnabled", "editEnabled", "renameEnabled", "interactionNodeSingletonTag",
    "selectNodeUponCreation", "noneDisplay", "sizeAdjustPolicy",
}
#: QWidget properties (Qt's qwidget.h) the .ui may set on any widget, plus the parameter-node binding
#: (Base/Python/slicer/parameterNodeWrapper/wrapper.py: SlicerParameterNamePropertyName).
QWIDGET_PROPERTIES = {
    "enabled", "visible", "toolTip", "whatsThis", "geometry", "sizePolicy", "minimumSize", "maximumSize",
    "font", "styleSheet", "statusTip", "accessibleName", "SlicerParameterName",
}
#: Other Qt/CTK classes used in the .ui and the properties they declare (Qt/CTK headers).
CLASS_PROPERTIES = {
    "qMRMLNodeComboBox": QMRML_NODE_COMBOBOX_PROPERTIES,
    "QPushButton": {"text", "checkable", "checked", "icon", "flat", "default", "autoDefault"},
    "QCheckBox": {"text", "checkable", "checked", "tristate"},
    "QComboBox": {"editable", "currentIndex", "maxVisibleItems", "sizeAdjustPolicy"},
    "QTextBrowser": {"openExternalLinks", "openLinks", "html", "plainText", "readOnly", "source"},
    "QProgressBar": {"minimum", "maximum", "value", "textVisible", "format", "orientation"},
    "QLabel": {"text", "wordWrap", "textInteractionFlags", "alignment", "textFormat", "openExternalLinks"},
    "ctkCollapsibleButton": {"text", "collapsed", "collapsedHeight", "contentsFrameShape"},
    "qMRMLWidget": set(),
}


def _ui_widgets():
    return list(ET.parse(UI_FILE).getroot().iter("widget"))


def test_ui_sets_only_properties_the_widget_classes_declare():
    unknown = []
    for widget in _ui_widgets():
        cls = widget.get("class")
        assert cls in CLASS_PROPERTIES, f"{widget.get('name')}: widget class {cls} not checked here; add it"
        allowed = CLASS_PROPERTIES[cls] | QWIDGET_PROPERTIES
        unknown += [f"{widget.get('name')}.{p.get('name')}" for p in widget.findall("property")
                    if p.get("name") not in allowed]
    assert not unknown, f"the .ui sets properties its widget classes do not have: {unknown}"


def test_segment_editor_uses_the_source_volume_api():
    """qMRMLSegmentEditorWidget::setMasterVolumeNode is deprecated (it logs a warning) since Slicer 5.4;
    setSourceVolumeNode is the name (Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h)."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"[Mm]asterVolume", source)
    assert "editor.setSourceVolumeNode(" in source and "editor.setSegmentationNode(" in source


# ----------------------------------------------------------------------- widget methods with fakes


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def _bare_widget(module):
    """A widget object without setup() (which needs Qt): only the attributes the tested methods use."""
    w = object.__new__(module.SRCSMSegmenterWidget)
    w._parameterNode = None
    w._lastSegmentation = None
    w._runner = object()
    w._timer = types.SimpleNamespace(stop=lambda: None)
    w.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text=""),
                                 progressBar=types.SimpleNamespace(setValue=lambda v: None))
    return w


@pytest.mark.parametrize("details", ["", "Traceback ...\nRuntimeError: boom"])
def test_failed_job_passes_detailed_text_only_when_there_is_some(srcsm_module, slicer_app, monkeypatch,
                                                                   details):
    """slicer.util.messageBox checks ``"detailedText" in kwargs`` and sets the value on a ctkMessageBox
    (Base/Python/slicer/util.py): a None there would show a "Show Details…" button reading "None"."""
    import slicer

    shown = _Recorder()
    monkeypatch.setattr(slicer.util, "errorDisplay", shown)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *a, **k: None)
    w = _bare_widget(srcsm_module)
    cleaned = []
    w._job = types.SimpleNamespace(cleanup=lambda: cleaned.append(True))
    result = types.SimpleNamespace(status="failed", succeeded=False, message="It failed.", details=details)

    w._onFinished(result)

    assert cleaned and w._runner is None and w.ui.statusLabel.text == "It failed."
    (args, kwargs), = shown.calls
    assert args == ("It failed.",)
    if details:
        assert kwargs["detailedText"] == details
    else:
        assert "detailedText" not in kwargs


def test_segment_editor_button_forgets_a_deleted_result(srcsm_module, slicer_app, monkeypatch):
    import slicer

    selected = _Recorder()
    monkeypatch.setattr(slicer.util, "selectModule", selected)
    w = _bare_widget(srcsm_module)
    seg = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    w._lastSegmentation = seg
    assert w._editableSegmentation() is seg
    slicer_app.scene.RemoveNode(seg)
    assert w._editableSegmentation() is None and w._lastSegmentation is None
    w.onEditInSegmentEditor()
    assert not selected.calls  # nothing to edit: the Segment Editor is not opened on a removed node


def test_finished_job_shows_the_plausibility_warning(srcsm_module, slicer_app, monkeypatch):
    """The core's plausibility warning (e.g. the abdominal model on a heart, `test_cli.py`'s
    test_wrong_anatomy_is_reported_with_the_fix) arrives in the done event; the status must show it, not
    bury it under "Done"."""
    import contextlib

    import slicer

    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **k: None, raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext(), raising=False)
    w = _bare_widget(srcsm_module)
    w._updateGui = lambda: None
    node = types.SimpleNamespace(GetName=lambda: "pat_06 segmentation")
    w.logic = types.SimpleNamespace(core=types.SimpleNamespace(import_result=lambda job, result: node))
    w._job = types.SimpleNamespace(request=types.SimpleNamespace(input_node=None), cleanup=lambda: None)
    warning = ("The result looks implausible for the model 'abdomen-ct-srcsm' (abdomen): liver 66 ml, far smaller "
               "than in any training case. … choose a model for it: `--model cardiac-bssfp-srcsm` (heart, MR).")
    result = types.SimpleNamespace(status="succeeded", succeeded=True, message="", details="",
                                   done={"device": "cpu", "seconds": 3.0, "warnings": [warning]})

    w._onFinished(result)

    text = w.ui.statusLabel.text
    assert text.startswith("Done: 'pat_06 segmentation' (cpu, 3.0 s).") and warning in text
