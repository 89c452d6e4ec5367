"""Dependency check and install plan. Nothing is ever installed: the installers are recording fakes."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from slicer_module_helpers import REPO
from SRCSMSegmenterLib import dependencies as deps
from SRCSMSegmenterLib.dependencies import (
    IN_PROCESS_REQUIREMENTS,
    REQUIREMENTS,
    DependencyError,
    PackageStatus,
    Requirement,
    build_install_plan,
    check,
    check_requirement,
    ensure_dependencies,
)


def _by_name(statuses):
    return {s.requirement.distribution: s for s in statuses}


def test_this_environment_passes_with_real_versions():
    statuses = check(REQUIREMENTS, import_modules=True)
    assert all(s.ok for s in statuses), deps.report(statuses)
    for s in statuses:
        assert s.version == importlib.metadata.version(s.requirement.distribution)
    import torch

    assert torch.__version__.startswith(_by_name(statuses)["torch"].version.split("+")[0])
    assert f"✓ torch {_by_name(statuses)['torch'].version}" in deps.report(statuses)


def test_required_modules_are_what_the_pipeline_imports():
    names = {r.module for r in REQUIREMENTS}
    assert {"torch", "SimpleITK", "safetensors", "pydantic", "monai", "scipy", "tqdm", "numpy"} <= names
    assert {r.module for r in IN_PROCESS_REQUIREMENTS} == {"numpy", "SimpleITK", "pydantic"}


def test_minimum_versions_match_pyproject():
    """One set of version ranges: the module's check and pyproject.toml must agree."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    ranges = {}
    for spec in project:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", spec.strip())
        assert m, f"unexpected dependency spec {spec!r}"
        ranges[m.group(1).lower()] = m.group(2)
    for req in REQUIREMENTS:
        assert ranges.get(req.distribution.lower()) == req.minimum, req
    assert set(ranges) == {r.distribution.lower() for r in REQUIREMENTS}


def test_missing_too_old_and_broken_are_told_apart(tmp_path, monkeypatch):
    broken_dir = tmp_path / "site"
    broken_dir.mkdir()
    (broken_dir / "srcsm_broken_pkg.py").write_text("raise ImportError('libfoo.so: cannot open shared object')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(broken_dir))
    missing = check_requirement(Requirement("srcsm-no-such-package", "srcsm_no_such_package", "1.0"))
    old = check_requirement(Requirement("numpy", "numpy", "999.0"))
    broken = check_requirement(Requirement("srcsm-broken-pkg", "srcsm_broken_pkg", "1.0"), import_module=True)
    assert missing.state == "missing" and "not installed" in missing.describe()
    assert old.state == "too_old" and old.version == importlib.metadata.version("numpy")
    assert "too old (needs ≥ 999.0)" in old.describe()
    assert broken.state == "broken" and "libfoo.so" in broken.detail
    # without import_module nothing is imported: a broken install reads as present
    assert check_requirement(Requirement("srcsm-broken-pkg", "srcsm_broken_pkg", "1.0")).state == "ok"


def test_version_comparison():
    assert deps.version_at_least("2.13.0+cpu", "2.2")
    assert deps.version_at_least("2.2.0", "2.2")
    assert not deps.version_at_least("2.1.2", "2.2")
    assert deps.version_at_least("1.26.4", "1.26")
    assert not deps.version_at_least("0.3.9", "0.4")


def _status(name: str, state: str, version: str | None = None) -> PackageStatus:
    req = next(r for r in REQUIREMENTS if r.distribution == name)
    return PackageStatus(req, state, version)  # type: ignore[arg-type]


def _all_ok():
    return [PackageStatus(r, "ok", "1") for r in REQUIREMENTS]


def test_install_plan_torch_first_then_pip_then_monai_without_deps():
    statuses = _all_ok()
    statuses[0] = _status("torch", "missing")
    statuses[4] = _status("pydantic", "too_old", "1.10.2")
    statuses[5] = _status("monai", "missing")
    statuses[7] = _status("tqdm", "missing")
    plan = build_install_plan(statuses)
    assert [(s.installer, s.requirements, s.options) for s in plan.steps] == [
        ("pytorch", ("torch>=2.2",), ()),
        ("pip", ("pydantic>=2.6", "tqdm>=4.66"), ()),
        ("pip", ("monai>=1.3",), ("--no-deps",)),
    ]
    assert plan.needs_torch and not plan.empty
    text = plan.describe()
    assert "torch: not installed" in text and "pydantic 1.10.2: too old" in text
    assert "PyTorch extension" in text and "pip install monai>=1.3 [--no-deps]" in text
    assert plan.steps[2].pip_arguments() == ["monai>=1.3", "--no-deps"]
    assert build_install_plan(_all_ok()).empty


class Recorder:
    def __init__(self, answer=True, torch_ok=True, pip_error=None):
        self.calls: list[tuple] = []
        self.answer, self.torch_ok, self.pip_error = answer, torch_ok, pip_error

    def confirm(self, text):
        self.calls.append(("confirm", text))
        return self.answer

    def install_torch(self, requirement):
        self.calls.append(("torch", requirement))
        return self.torch_ok

    def pip_install(self, args):
        self.calls.append(("pip", tuple(args)))
        if self.pip_error:
            raise self.pip_error


def _missing_torch_and_monai():
    statuses = _all_ok()
    statuses[0] = _status("torch", "missing")
    statuses[5] = _status("monai", "missing")
    return statuses


def test_nothing_missing_asks_nothing():
    rec = Recorder()
    outcome = ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=_all_ok())
    assert rec.calls == [] and outcome.installed == () and not outcome.restart_recommended


def test_declined_installs_nothing_and_says_how_to_do_it_later():
    rec = Recorder(answer=False)
    with pytest.raises(DependencyError) as info:
        ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=_missing_torch_and_monai())
    assert [c[0] for c in rec.calls] == ["confirm"]
    message = str(info.value)
    assert "you declined" in message and "Click Segment again" in message
    assert "PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement='>=2.2')" \
        in message
    assert "slicer.util.pip_install(['monai>=1.3', '--no-deps'])" in message


def test_accepted_installs_in_order_and_rechecks():
    rec = Recorder()
    outcome = ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install,
                                  statuses=_missing_torch_and_monai(), recheck=_all_ok)
    assert [c[0] for c in rec.calls] == ["confirm", "torch", "pip"]
    assert rec.calls[1] == ("torch", ">=2.2")
    assert rec.calls[2] == ("pip", ("monai>=1.3", "--no-deps"))
    assert len(outcome.installed) == 2 and "Installed:" in outcome.describe()


def test_torch_declined_in_its_own_dialog_stops_everything():
    rec = Recorder(torch_ok=False)
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=_missing_torch_and_monai())
    assert [c[0] for c in rec.calls] == ["confirm", "torch"]  # MONAI was not installed without torch


def test_pip_failure_and_still_missing_are_reported():
    rec = Recorder(pip_error=RuntimeError("network unreachable"))
    with pytest.raises(DependencyError, match="network unreachable"):
        ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=_missing_torch_and_monai())
    rec = Recorder()
    with pytest.raises(DependencyError, match="still missing"):
        ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=_missing_torch_and_monai(),
                            recheck=_missing_torch_and_monai)


def test_restart_recommended_when_an_upgraded_package_was_already_imported():
    statuses = _all_ok()
    statuses[1] = _status("numpy", "too_old", "1.20.0")  # numpy is imported in this process
    rec = Recorder()
    outcome = ensure_dependencies(rec.confirm, rec.install_torch, rec.pip_install, statuses=statuses,
                                  recheck=_all_ok)
    assert outcome.restart_recommended and "Restart Slicer" in outcome.describe()
    assert rec.calls[1] == ("pip", ("numpy>=1.26",))
