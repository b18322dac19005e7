"""The layout's habits, checked: no long functions, the settings named in few places, the built-in
teachers named only where they are defined, the configuration reference current, a short README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "automl_diff"


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_scheduler_config_travels_in_few_files():
    files = [path.relative_to(REPO).as_posix() for path in _sources() if "scheduler_config" in path.read_text()]
    assert len(files) <= 5, files


def test_the_built_in_teachers_are_named_only_in_the_zoo_and_the_presets():
    pattern = re.compile(r"""["'](digits|digits-t2i|shapes|shapes-t2i)["']""")
    named = [
        path.relative_to(REPO).as_posix()
        for path in _sources()
        if pattern.search(path.read_text()) and "zoo" not in path.parts and path.name != "presets.py"
    ]
    assert not named, named


def test_the_configuration_reference_is_current():
    from automl_diff.config.reference import reference

    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == reference(), "docs/configuration.md is stale: python -m automl_diff.config.reference > docs/configuration.md"


def test_the_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (REPO / target).is_file(), target


def test_the_readme_shows_the_quickstart_as_it_is():
    import yaml

    readme = (REPO / "README.md").read_text()
    shown = re.search(r"```yaml\n(name: quickstart.*?)```", readme, re.S).group(1)
    assert yaml.safe_load(shown) == yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
