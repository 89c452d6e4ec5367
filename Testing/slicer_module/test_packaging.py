"""Static checks that catch packaging breakage before a Slicer build does.

A file missing from SRCSMSegmenter/CMakeLists.txt is missing from the extension package; a widget
name the code uses but the .ui lacks is an AttributeError in the user's Slicer only. None of this
needs Slicer.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

import pytest
from PIL import Image
from slicer_module_helpers import LIB_DIR, MODULE_CMAKE, MODULE_DIR, MODULE_FILE, REPO, TOP_CMAKE, UI_FILE

EXTENSION_FIELDS = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")


def _cmake_text(path) -> str:
    return re.sub(r"(?m)(^|\s)#[^\n]*", r"\1", path.read_text(encoding="utf-8"))  # drop comments (not the "#" in URLs)


def _cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.DOTALL)
    assert m, f"set({variable} ...) not found"
    return m.group(1).split()


def _expand(entry: str) -> str:
    return entry.replace("${MODULE_NAME}", "SRCSMSegmenter")


@pytest.fixture(scope="module")
def cmake() -> str:
    return _cmake_text(MODULE_CMAKE)


def test_every_listed_file_exists(cmake):
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in _cmake_list(cmake, variable):
            assert (MODULE_DIR / _expand(entry)).is_file(), f"{variable} lists missing file {entry}"
    for entry in _cmake_list(cmake, "MODULE_SAMPLE_DATA"):
        assert (REPO / "Resources" / entry).is_file(), f"MODULE_SAMPLE_DATA lists missing file {entry}"


def test_every_python_file_of_the_module_is_listed(cmake):
    listed = {_expand(e) for e in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    shipped = {p.relative_to(MODULE_DIR).as_posix() for p in LIB_DIR.rglob("*.py")} | {"SRCSMSegmenter.py"}
    assert not shipped - listed, f"not in MODULE_PYTHON_SCRIPTS (would be missing from the package): {shipped - listed}"
    # sub-packages (web/) are copied with their relative paths by the scripted-module macro: each needs
    # its __init__.py listed to import from the installed tree
    for sub in (p for p in LIB_DIR.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        assert f"{(sub / '__init__.py').relative_to(MODULE_DIR).as_posix()}" in listed, sub


def test_resources_and_data_are_shipped(cmake):
    resources = {_expand(e) for e in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    assert {"Resources/UI/SRCSMSegmenter.ui", "Resources/Icons/SRCSMSegmenter.png"} <= resources
    assert not [r for r in resources if r.startswith("..")], "'../' resources would land outside the module folder"
    sample = set(_cmake_list(cmake, "MODULE_SAMPLE_DATA"))
    from SRCSMSegmenterLib.demo import SAMPLE_IMAGE, SAMPLE_LABELS

    assert {f"Sample/{SAMPLE_IMAGE}", f"Sample/{SAMPLE_LABELS}"} <= sample
    # bundled models: the whole Resources/Models folder, copied to <module>/Resources where the Lib looks
    assert re.search(r"file\(GLOB_RECURSE\s+MODULE_BUNDLED_MODELS.*\$\{SRCSM_DATA_DIR\}/Models/\*", cmake, re.DOTALL)
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/${data_file}" in cmake
    assert "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources/${data_dir}" in cmake
    # ... which is where the Lib looks when installed: <folder holding SRCSMSegmenterLib>/Resources/...
    assert 'here.parent / "Resources" / "Models"' in (LIB_DIR / "catalog.py").read_text(encoding="utf-8")
    assert 'here.parent / "Resources" / "Sample"' in (LIB_DIR / "demo.py").read_text(encoding="utf-8")


def test_slicer_build_macro_and_unittest_registration(cmake):
    assert "set(MODULE_NAME SRCSMSegmenter)" in cmake
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", cmake, re.DOTALL).group(1)
    for piece in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}"):
        assert piece in " ".join(macro.split())
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif",
                     cmake, re.DOTALL)


def test_top_level_cmake_has_every_extension_field():
    text = _cmake_text(TOP_CMAKE)
    for field in EXTENSION_FIELDS:
        m = re.search(rf'set\(EXTENSION_{field}\s+"([^"]*)"\)', text)
        assert m and m.group(1).strip(), f"EXTENSION_{field} is missing or empty"
    assert re.search(r"add_subdirectory\(SRCSMSegmenter\)", text)
    assert "find_package(Slicer REQUIRED)" in text and "${Slicer_EXTENSION_CPACK}" in text
    icon_url = re.search(r'set\(EXTENSION_ICONURL\s+"([^"]*)"\)', text).group(1)
    assert icon_url.endswith("Resources/Icons/SRCSMSegmenter.png")


def test_icons_exist_and_match():
    module_icon = MODULE_DIR / "Resources" / "Icons" / "SRCSMSegmenter.png"
    top_icon = REPO / "Resources" / "Icons" / "SRCSMSegmenter.png"
    for icon in (module_icon, top_icon):
        with Image.open(icon) as im:
            assert im.format == "PNG" and im.size == (128, 128)
    assert module_icon.read_bytes() == top_icon.read_bytes()


# ------------------------------------------------------------------------------- module file


@pytest.mark.parametrize("version", [(3, 11), (3, 12)])
def test_module_file_parses_for_the_target_pythons(version):
    source = MODULE_FILE.read_text(encoding="utf-8")
    ast.parse(source, filename=str(MODULE_FILE), feature_version=version)
    compile(source, str(MODULE_FILE), "exec")
    for path in LIB_DIR.glob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=version)


def _ui_tree():
    return ET.parse(UI_FILE).getroot()


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui_tree().iter("widget")}


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no widgets?"
    missing = used - set(_ui_widgets())
    assert not missing, f"the module uses widgets the .ui does not define: {missing}"


def _property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = prop[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


def test_ui_widgets_are_configured_as_the_design_says():
    w = _ui_widgets()
    assert w["SRCSMSegmenter"].get("class") == "qMRMLWidget"
    vol = w["inputVolumeSelector"]
    assert vol.get("class") == "qMRMLNodeComboBox"
    assert _property(vol, "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert _property(vol, "hideChildNodeTypes") == ["vtkMRMLLabelMapVolumeNode"]
    roi = w["roiSelector"]
    assert _property(roi, "nodeTypes") == ["vtkMRMLMarkupsROINode"] and _property(roi, "noneEnabled") == "true"
    out = w["outputSegmentationSelector"]
    assert _property(out, "nodeTypes") == ["vtkMRMLSegmentationNode"] and _property(out, "noneEnabled") == "true"
    assert _property(out, "noneDisplay") == "Create new segmentation"
    assert _property(w["sourceMatchingCheckBox"], "checked") == "true"
    assert w["modelCardBrowser"].get("class") == "QTextBrowser"
    assert w["progressBar"].get("class") == "QProgressBar"
    for name in ("modelComboBox", "installModelButton", "previewButton", "deviceComboBox", "segmentButton",
                 "cancelButton", "statusLabel", "editInSegmentEditorButton"):
        assert name in w
    # every qMRML combo box gets the scene from the top widget
    receivers = {c.findtext("receiver") for c in _ui_tree().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert receivers == {n for n, e in w.items() if e.get("class") == "qMRMLNodeComboBox"}


def test_ui_parameter_bindings_name_parameter_node_fields():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SRCSMSegmenterParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert fields == {"inputVolume", "modelId", "sourceMatching", "cleanUp", "device", "roi", "outputSegmentation"}
    bound = {_property(e, "SlicerParameterName") for e in _ui_widgets().values()} - {None}
    assert bound == {"inputVolume", "sourceMatching", "cleanUp", "roi", "outputSegmentation"}
    assert bound <= fields


def test_device_choices_agree_between_ui_module_and_logic():
    from SRCSMSegmenterLib.module_logic import DEVICE_CHOICES

    combo = _ui_widgets()["deviceComboBox"]
    items = [i.find("property/string").text for i in combo.findall("item")]
    assert items == [text for _, text in DEVICE_CHOICES]
    m = re.search(r"^DEVICES = \((.*?)\)$", MODULE_FILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert ast.literal_eval(f"({m.group(1)})") == tuple(value for value, _ in DEVICE_CHOICES)
    from SRCSMSegmenterLib.cli import build_parser

    device_action = next(a for a in build_parser()._subparsers._group_actions[0].choices["segment"]._actions
                         if a.dest == "device")
    assert {value for value, _ in DEVICE_CHOICES} <= set(device_action.choices)


def test_preview_layout_is_valid_slicer_layout_xml():
    from SRCSMSegmenterLib.matching_plot import PREVIEW_LAYOUT_ID, PREVIEW_LAYOUT_XML

    root = ET.fromstring(PREVIEW_LAYOUT_XML)
    views = [(v.get("class"), v.get("singletontag")) for v in root.iter("view")]
    assert ("vtkMRMLSliceNode", "Red") in views and ("vtkMRMLSliceNode", "Yellow") in views
    assert sum(c == "vtkMRMLPlotViewNode" for c, _ in views) == 2
    assert PREVIEW_LAYOUT_ID > 1000


def test_module_lib_imports_without_qt_slicer_or_vtk():
    """The module's logic files are Qt-free and import without Slicer/VTK (a web front end, the CLI
    and tests use them); slicer/vtk are only imported inside the functions that touch MRML."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('qt', 'ctk', 'slicer', 'vtk', 'vtkmodules'): sys.modules[name] = None\n"
            "import SRCSMSegmenterLib.module_logic, SRCSMSegmenterLib.process_runner, "
            "SRCSMSegmenterLib.dependencies, SRCSMSegmenterLib.signals, SRCSMSegmenterLib.model_info, "
            "SRCSMSegmenterLib.matching_plot\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
