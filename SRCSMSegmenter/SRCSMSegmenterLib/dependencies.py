"""Python packages the segmentation needs: check them, plan their installation, install with consent.

Qt-free. The three Slicer-specific actions (ask the user, install PyTorch, pip-install the rest) are
passed in as callables; :func:`slicer_install_torch` and :func:`slicer_pip_install` are the small
functions that implement the last two inside Slicer, so everything else runs and is tested anywhere.

Rules (Slicer's guidance for extensions):

* nothing is installed at import time or without the user's consent;
* PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that matches
  the user's GPU driver — a plain ``pip install torch`` would often give a CPU-only or mismatched build;
* the other packages go through Slicer's package installer (``slicer.util.pip_install``, which in
  Slicer ≥ 5.12 delegates to ``slicer.packaging`` with its progress dialog);
* MONAI is installed with ``--no-deps``: its only heavy dependency is torch, and pip must never replace
  the torch build the PyTorch extension chose;
* if PyTorch is missing and the user declines it, nothing else is installed (MONAI alone is useless).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import SRCSMError

Installer = Literal["pytorch", "pip"]
State = Literal["ok", "missing", "too_old", "broken"]


class DependencyError(SRCSMError):
    """A required package is missing and could not (or may not) be installed."""


@dataclass(frozen=True)
class Requirement:
    """One package the background segmentation needs."""

    distribution: str  # pip / metadata name
    module: str  # import name
    minimum: str  # lowest supported version (same ranges as pyproject.toml)
    installer: Installer = "pip"
    pip_options: tuple[str, ...] = ()

    @property
    def specifier(self) -> str:
        return f"{self.distribution}>={self.minimum}"


#: What ``srcsm segment`` imports. Keep the minimums equal to pyproject.toml's ``dependencies``
#: (a test checks it).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "2.2", installer="pytorch"),
    Requirement("numpy", "numpy", "1.26"),
    Requirement("SimpleITK", "SimpleITK", "2.3"),
    Requirement("safetensors", "safetensors", "0.4"),
    Requirement("pydantic", "pydantic", "2.6"),
    Requirement("monai", "monai", "1.3", pip_options=("--no-deps",)),
    Requirement("scipy", "scipy", "1.11"),
    Requirement("tqdm", "tqdm", "4.66"),
)

#: What the module itself imports in Slicer's own process (model list, preview, reading results).
#: Torch and MONAI are only needed by the background process, so the preview works without them.
IN_PROCESS_REQUIREMENTS: tuple[Requirement, ...] = tuple(
    r for r in REQUIREMENTS if r.module in ("numpy", "SimpleITK", "pydantic"))


@dataclass(frozen=True)
class PackageStatus:
    requirement: Requirement
    state: State
    version: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def describe(self) -> str:
        name, need = self.requirement.distribution, self.requirement.minimum
        if self.state == "ok":
            return f"{name} {self.version or '(version unknown)'}"
        if self.state == "missing":
            return f"{name}: not installed (needs ≥ {need})"
        if self.state == "too_old":
            return f"{name} {self.version}: too old (needs ≥ {need})"
        return f"{name} {self.version or ''}: cannot be imported ({self.detail})".replace("  ", " ")


def _leading_numbers(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum``; PEP 440 via ``packaging`` when present (it is in Slicer), else the
    leading integers ("2.13.0+cpu" → (2, 13, 0))."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(version) >= Version(minimum)
        except InvalidVersion:
            pass
    except ImportError:  # pragma: no cover - packaging ships with pip and Slicer
        pass
    return _leading_numbers(version) >= _leading_numbers(minimum)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_requirement(req: Requirement, import_module: bool = False) -> PackageStatus:
    """Is ``req`` importable and recent enough? Without ``import_module`` nothing is imported (fast,
    and a broken install cannot crash the caller); with it, the import itself is tried."""
    if importlib.util.find_spec(req.module) is None:
        return PackageStatus(req, "missing")
    version = _installed_version(req.distribution)
    if import_module:
        try:
            module = importlib.import_module(req.module)
        except Exception as exc:  # noqa: BLE001 — any failure means "broken install"
            return PackageStatus(req, "broken", version, f"{type(exc).__name__}: {exc}")
        version = version or getattr(module, "__version__", None)
    if version is not None and not version_at_least(version, req.minimum):
        return PackageStatus(req, "too_old", version)
    return PackageStatus(req, "ok", version)


def check(requirements: Iterable[Requirement] = REQUIREMENTS, import_modules: bool = False) -> list[PackageStatus]:
    """Status of every requirement, in order."""
    return [check_requirement(r, import_modules) for r in requirements]


def report(statuses: Sequence[PackageStatus]) -> str:
    """One line per package, for a log or the module's status text."""
    return "\n".join(("✓ " if s.ok else "✗ ") + s.describe() for s in statuses)


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class InstallStep:
    installer: Installer
    requirements: tuple[str, ...]
    options: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.installer == "pytorch":
            return (f"PyTorch ({', '.join(self.requirements)}) through the PyTorch extension, which picks the "
                    f"build that fits this computer's GPU (a download of up to a few GB)")
        extra = f" [{' '.join(self.options)}]" if self.options else ""
        return f"pip install {' '.join(self.requirements)}{extra}"

    def pip_arguments(self) -> list[str]:
        return [*self.requirements, *self.options]


@dataclass(frozen=True)
class InstallPlan:
    steps: tuple[InstallStep, ...]
    problems: tuple[PackageStatus, ...]

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def needs_torch(self) -> bool:
        return any(s.installer == "pytorch" for s in self.steps)

    def describe(self) -> str:
        """The text of the confirmation question."""
        if self.empty:
            return "All required Python packages are installed."
        lines = ["SRCSM Segmenter needs Python packages that are missing or too old:"]
        lines += [f"  • {p.describe()}" for p in self.problems]
        lines.append("")
        lines.append("Install them now? This will run:")
        lines += [f"  {i}. {s.describe()}" for i, s in enumerate(self.steps, 1)]
        lines.append("")
        lines.append("It may take several minutes. Slicer may need a restart afterwards.")
        return "\n".join(lines)


def build_install_plan(statuses: Sequence[PackageStatus]) -> InstallPlan:
    """PyTorch first (through its extension), then one pip step for the plain packages, then one
    step per package that needs its own pip options (MONAI with ``--no-deps``)."""
    problems = tuple(s for s in statuses if not s.ok)
    steps: list[InstallStep] = []
    torch = [s.requirement for s in problems if s.requirement.installer == "pytorch"]
    if torch:
        steps.append(InstallStep("pytorch", tuple(r.specifier for r in torch)))
    plain = [s.requirement for s in problems if s.requirement.installer == "pip" and not s.requirement.pip_options]
    if plain:
        steps.append(InstallStep("pip", tuple(r.specifier for r in plain)))
    for s in problems:
        r = s.requirement
        if r.installer == "pip" and r.pip_options:
            steps.append(InstallStep("pip", (r.specifier,), r.pip_options))
    return InstallPlan(tuple(steps), problems)


@dataclass(frozen=True)
class InstallOutcome:
    installed: tuple[InstallStep, ...]
    statuses: tuple[PackageStatus, ...]
    restart_recommended: bool

    def describe(self) -> str:
        if not self.installed:
            return "All required Python packages are installed."
        text = "Installed: " + "; ".join(s.describe() for s in self.installed) + "."
        if self.restart_recommended:
            text += " Restart Slicer so that the updated packages are used."
        return text


DECLINED_MESSAGE = (
    "Segmentation needs the Python packages listed above and they were not installed (you declined). "
    "Click Segment again to be asked again, or install them yourself in Slicer's Python console:\n{commands}"
)


def manual_commands(plan: InstallPlan) -> str:
    """What the user can type in Slicer's Python console instead."""
    out = []
    for step in plan.steps:
        if step.installer == "pytorch":
            out.append("import PyTorchUtils; PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, "
                       f"torchVersionRequirement='{step.requirements[0].removeprefix('torch')}')")
        else:
            out.append(f"slicer.util.pip_install({step.pip_arguments()!r})")
    return "\n".join(out)


def ensure_dependencies(
    confirm: Callable[[str], bool],
    install_torch: Callable[[str], bool],
    pip_install: Callable[[list[str]], None],
    statuses: Sequence[PackageStatus] | None = None,
    recheck: Callable[[], Sequence[PackageStatus]] | None = None,
) -> InstallOutcome:
    """Make sure the requirements are met, installing only with the user's consent.

    ``confirm(text) -> bool`` asks the user; ``install_torch(version_requirement) -> bool`` installs
    PyTorch (False: declined or failed); ``pip_install(arguments)`` runs pip. Raises
    :class:`DependencyError` with a readable message when the user declines or an install fails.
    """
    statuses = list(check() if statuses is None else statuses)
    plan = build_install_plan(statuses)
    if plan.empty:
        return InstallOutcome((), tuple(statuses), False)
    if not confirm(plan.describe()):
        raise DependencyError(DECLINED_MESSAGE.format(commands=manual_commands(plan)))
    already_imported = {p.requirement.module for p in plan.problems if p.requirement.module in sys.modules}
    done: list[InstallStep] = []
    for step in plan.steps:
        if step.installer == "pytorch":
            requirement = step.requirements[0].removeprefix("torch")
            if not install_torch(requirement):
                raise DependencyError(
                    "PyTorch was not installed (declined or failed), so nothing else was installed: the "
                    "segmentation cannot run without it. Install it from the 'PyTorch Utils' module, or "
                    "click Segment again."
                )
        else:
            try:
                pip_install(step.pip_arguments())
            except Exception as exc:
                raise DependencyError(
                    f"Installing {' '.join(step.requirements)} failed ({exc}). Check the internet "
                    f"connection, then try again; details are in Slicer's Python console."
                ) from exc
        done.append(step)
    after = list(recheck() if recheck is not None else check(s.requirement for s in statuses))
    still = [s for s in after if not s.ok]
    if still:
        raise DependencyError(
            "Some packages are still missing after the installation: "
            + "; ".join(s.describe() for s in still)
            + ". Restart Slicer and try again; if it persists, see the Python console for pip's messages."
        )
    return InstallOutcome(tuple(done), tuple(after), bool(already_imported))


# ------------------------------------------------------------------- Slicer-specific, isolated


def slicer_install_torch(version_requirement: str) -> bool:  # pragma: no cover - needs Slicer
    """Install PyTorch through the PyTorch extension (it picks the CUDA build). True if installed.

    Called only after the user said yes to the module's own question, which lists PyTorch: the
    extension's second confirmation is therefore switched off (one question, not two)."""
    try:
        import PyTorchUtils  # the PyTorch extension (declared in EXTENSION_DEPENDS)
    except ImportError as exc:
        raise DependencyError(
            "The 'PyTorch' extension is not installed. Install it from the Extensions Manager, restart "
            "Slicer, and try again."
        ) from exc
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=version_requirement)
    return torch is not None


def slicer_pip_install(arguments: list[str]) -> None:  # pragma: no cover - needs Slicer
    """Slicer's package installer (``slicer.packaging`` behind ``slicer.util.pip_install`` in ≥ 5.12)."""
    import slicer

    slicer.util.pip_install(arguments)


def slicer_confirm(text: str) -> bool:  # pragma: no cover - needs Slicer's GUI
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle="SRCSM Segmenter: install packages"))


__all__ = [
    "IN_PROCESS_REQUIREMENTS",
    "REQUIREMENTS",
    "DependencyError",
    "InstallOutcome",
    "InstallPlan",
    "InstallStep",
    "PackageStatus",
    "Requirement",
    "build_install_plan",
    "check",
    "check_requirement",
    "ensure_dependencies",
    "manual_commands",
    "report",
    "slicer_confirm",
    "slicer_install_torch",
    "slicer_pip_install",
    "version_at_least",
]
