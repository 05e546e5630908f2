"""A wheel of zsad holds every package of pipeline/ (pyproject.toml lists them by hand, because of the
schemas/ and jobs/ folders it maps in): a new sub-package missing from the list would work in the
editable install of the tests and be absent from an installed zsad (pipeline.report once was)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_pipeline_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pipeline").rglob("__init__.py")}
    assert found - listed == set(), f"missing from pyproject.toml's [tool.setuptools] packages: {found - listed}"
    assert {"pipeline._schemas", "pipeline._jobs"} <= listed
