"""The house: the rooms' import contracts hold, and they can fail; no driver is known by
name outside provision/drivers; the package's top level stays small."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.workspace import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
DRIVER_NAMES = ("local", "netns", "hosts", "ec2")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_contracts_are_kept() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 kept, 0 broken" in done.stdout


@pytest.fixture
def copy_of_the_house(tmp_path: Path) -> Path:
    """The package, the contract file and the custom contract type, in a folder of their own."""
    shutil.copytree(REPO / "orchestrator", tmp_path / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    (tmp_path / "tests" / "helpers").mkdir(parents=True)
    for name in ("tests/__init__.py", "tests/helpers/__init__.py", "tests/helpers/import_contracts.py"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def lint_with(house: Path, module: str, added: str) -> str:
    """lint-imports on the copy with ``added`` appended to ``module``; its report, once it failed."""
    path = house / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + added)
    done = lint_imports(house)
    assert done.returncode != 0, done.stdout
    return " ".join(done.stdout.split())


def test_an_agent_module_importing_a_third_party_package_breaks_its_contract(copy_of_the_house: Path) -> None:
    report = lint_with(copy_of_the_house, "orchestrator.agent.errors", "\nimport yaml  # noqa: E402\n")
    assert "The agent imports only the standard library and its own package BROKEN" in report
    assert "orchestrator.agent.errors imports yaml" in report


def test_an_upward_import_inside_a_function_breaks_the_rooms(copy_of_the_house: Path) -> None:
    late = "\n\ndef _late() -> None:\n    from orchestrator.fleet import spawn  # noqa\n"
    report = lint_with(copy_of_the_house, "orchestrator.state.info", late)
    assert "Each room imports only the rooms below it BROKEN" in report
    assert "No import cycles, at any depth (imports inside functions count) BROKEN" in report


def test_no_driver_name_is_compared_outside_provision_drivers() -> None:
    names = "|".join(DRIVER_NAMES)
    comparison = re.compile(rf"""(==|!=|\bin\b|\bis\b|case)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        if (REPO / "orchestrator" / "provision" / "drivers") in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if comparison.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_the_package_top_level_holds_at_most_six_modules() -> None:
    modules = sorted(p.name for p in (REPO / "orchestrator").glob("*.py"))
    assert len(modules) <= 6, modules


def test_every_room_says_what_it_owns() -> None:
    for package in sorted(p.parent for p in (REPO / "orchestrator").rglob("__init__.py")):
        text = (package / "__init__.py").read_text()
        assert text.lstrip().startswith('"""'), f"{package.relative_to(REPO)} has no docstring"
