"""README.md states the versions of the direct dependencies the suite last passed with."""
from tested_versions import direct_dependencies, readme_line


def test_the_readme_pins_every_direct_dependency():
    line = readme_line()
    assert line, "README.md lacks its tested-versions line: run python tests/tested_versions.py --write"
    pins = dict(pin.split("==", 1) for pin in line.split())
    assert sorted(pins) == direct_dependencies(), "a direct dependency was added or removed: refresh the line"
    assert all(version and version != "?" for version in pins.values()), pins

