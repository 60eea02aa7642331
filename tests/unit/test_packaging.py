"""The wheel carries every package of the source tree (the list in pyproject.toml is explicit,
because `sql/` is mapped into the package): a folder added without being listed would import in
a checkout and fail in an installed wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "service").rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    mapped = {name for name in listed - found if name in config.get("package-dir", {})}
    assert listed - found == mapped, "listed packages that do not exist"
    assert (ROOT / config["package-dir"]["service.sql"] / "__init__.py").is_file()
