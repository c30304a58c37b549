"""What an installed copy holds. A non-editable install (`pip install .`, as on a cluster's nodes)
has only the files pyproject.toml names: every module, the built-in configs and the demo's VOC
sample must be among them, each in a folder setuptools is told is a package (it warns about, and
may drop, files in a folder it was not told of)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders(table: dict) -> dict[str, Path]:
    """Listed package -> its folder in the checkout."""
    package_dir = table.get("package-dir", {})
    return {name: ROOT / package_dir.get(name, name.replace(".", "/")) for name in table["packages"]}


def _shipped_files(table: dict) -> set[Path]:
    """The files a wheel built from pyproject.toml holds: the modules of the listed packages and
    the files their package-data globs match."""
    shipped = set()
    for name, folder in _package_folders(table).items():
        shipped.update(folder.glob("*.py"))
        for pattern in table.get("package-data", {}).get(name, []):
            shipped.update(path for path in folder.glob(pattern) if path.is_file())
    return shipped


def test_every_file_of_the_package_and_its_configs_ships():
    table = _setuptools_table()
    # configs/mmseg/ holds mmsegmentation configs that training reads from the checkout by path
    sources = {path for folder in ("pipeline", "configs") for path in (ROOT / folder).rglob("*")
               if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
               and "mmseg" not in path.relative_to(ROOT).parts}
    missing = sorted(str(path.relative_to(ROOT)) for path in sources - _shipped_files(table))
    assert not missing, f"not in the distribution: {missing}"
    assert any(path.name == "voc.yaml" for path in sources) and any(path.suffix == ".jpg" for path in sources)


def test_every_shipped_file_sits_in_a_listed_package():
    table = _setuptools_table()
    folders = set(_package_folders(table).values())
    outside = sorted(str(path.relative_to(ROOT)) for path in _shipped_files(table) if path.parent not in folders)
    assert not outside, f"in a folder pyproject.toml does not list as a package: {outside}"
