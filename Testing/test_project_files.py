"""What the project's own files promise is true on a fresh clone: packaging metadata without deprecation,
the extension's icon and screenshot URLs point at shipped files, docs and cards say no more than is there."""

from __future__ import annotations

import json
import re
import tomllib
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_pyproject_licence_is_an_spdx_string_without_deprecation_warning():
    """setuptools deprecates the `project.license` table (it stops reading it in 2027); reading our
    pyproject must raise no deprecation warning, and the build backend must be new enough for PEP 639."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["license"] == "Apache-2.0" and data["project"]["license-files"] == ["LICENSE"]
    req = next(r for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    assert tuple(map(int, re.search(r">=\s*([\d.]+)", req).group(1).split("."))) >= (77,)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    deprecations = [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__]
    assert not deprecations, deprecations
    assert dist.metadata.license_expression == "Apache-2.0"


@pytest.mark.parametrize("variable", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_extension_urls_point_at_shipped_files(variable):
    """The Extensions Manager shows these URLs; raw.githubusercontent.com/<org>/<repo>/main/<path> serves
    the repository's file at <path>, so each path must exist and be a PNG."""
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    (value,) = re.findall(rf'set\({variable}\s+"([^"]+)"\)', cmake)
    for url in value.split():
        m = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)", url)
        assert m, url
        path = REPO / m.group(1)
        assert path.is_file(), f"{variable} points at {m.group(1)}, which is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_cards_and_readme_do_not_call_a_final_model_interim():
    for card in (REPO / "Resources" / "Models").glob("*/model.json"):
        text = card.read_text(encoding="utf-8").lower()
        assert "interim" not in text and "training continues" not in text, card
    models = README[README.index("## Models"):README.index("## Training your own models")]
    assert "interim" not in models.lower()


def test_readme_never_exports_into_the_bundled_models_folder():
    """An export there would ship as (and hide) a bundled model; `python -m train export` refuses it."""
    exports = re.findall(r"python -m train export (\S+) (\S+)", README)
    assert exports
    assert all(not dest.startswith("Resources/Models") for _, dest in exports), exports


def test_readme_install_of_the_cpu_or_gpu_torch_matches_the_pin():
    """The README tells a CPU-only (or GPU) user how to get that torch build; the version it installs must
    be the one constraints.txt pins, or pip would fight the pin."""
    pin = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(encoding="utf-8"), re.M).group(1)
    assert f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu" in README
    assert re.search(rf"pip install torch=={re.escape(pin)} --index-url https://download.pytorch.org/whl/cu\d+", README)
    # the two commands of the README are unchanged: same install line as ./Testing/run-tests uses
    assert '.venv/bin/python -m pip install -c constraints.txt -e ".[train]" && .venv/bin/srcsm demo' in README


def test_readme_promises_of_the_catalogue_hold():
    assert "Resources/Models/catalog.json" in README
    index = json.loads((REPO / "Resources" / "Models" / "catalog.json").read_text(encoding="utf-8"))
    if not index["models"]:
        assert "ships empty" in README  # and says so, rather than promising downloads
    flat = " ".join(README.split())
    assert "srcsm models install https://" in flat and "--sha256 HEX" in flat
