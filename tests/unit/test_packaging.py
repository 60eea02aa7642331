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


def test_the_lite_phone_library_is_enough() -> None:
    """`phonenumberslite` is `phonenumbers` without the geocoder, carrier and time-zone data
    (~40 MB): nothing here may import them."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("phonenumberslite") for d in deps)
    assert not any(d.startswith("phonenumbers>") or d == "phonenumbers" for d in deps)
    for folder in ("service", "bench", "scripts"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text(encoding="utf-8")
            for part in ("geocoder", "carrier", "timezone"):
                assert f"phonenumbers.{part}" not in text, source
                assert f"from phonenumbers import {part}" not in text, source
