"""The public API: every name a package exports can be imported."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PACKAGES = [
    "atm_lightning",
    "atm_lightning.calibration",
    "atm_lightning.callbacks",
    "atm_lightning.data",
    "atm_lightning.merge",
    "atm_lightning.patch",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_star_import_gives_every_name_in_all(name: str) -> None:
    namespace: dict = {}
    exec(f"from {name} import *", namespace)  # raised AttributeError when __all__ named EViT unimported
    module = importlib.import_module(name)
    assert set(module.__all__) <= set(namespace)


def test_the_front_page_fits_on_a_screen() -> None:
    """The README is what it is, install, the commands, a little Python, one table and links; the
    rest lives in docs/ (it had grown back to 171 lines)."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert len(readme.read_text().splitlines()) < 120


def test_every_module_stays_small() -> None:
    """One job per module: none of the package's grows past 350 lines."""
    package = Path(__file__).resolve().parents[1] / "atm_lightning"
    sizes = {str(path.relative_to(package)): len(path.read_text().splitlines()) for path in package.rglob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > 350} == {}
