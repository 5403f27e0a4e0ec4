"""The declared lower bounds are the ones CI tests: .ci/lowest-versions.txt pins exactly pyproject's bounds."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CORE_STACK = {"torch", "transformers", "tokenizers", "accelerate", "pymatgen", "spglib", "pyxtal", "smact"}


def lowest_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = Version(spec.version)
    return pins


def declared_lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lower:
            bounds[req.name.lower()] = max(lower)
    return bounds


def test_lowest_versions_file_pins_exactly_the_declared_lower_bounds():
    pins, bounds = lowest_pins(), declared_lower_bounds()
    assert set(pins) == CORE_STACK
    assert CORE_STACK <= set(bounds), "every package of the core stack declares a lower bound"
    assert {name: pins[name] for name in CORE_STACK} == {name: bounds[name] for name in CORE_STACK}


def test_no_upper_bounds_on_the_stack():
    # Users install the newest releases beside this package: an upstream change is fixed, not fenced off.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        assert not [s for s in Requirement(text).specifier if s.operator in ("<", "<=", "==", "~=")], text
