"""The documentation site builds with ``mkdocs build --strict``, and what the guide shows is real: every
code block comes from a file the suite executes, every command names something that exists, and the
method table and the API page cover the library."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_cost.aggregators import REGISTERED, aggregator_class
from lightning_cost.aggregators.base import Aggregator, GramianAggregator
from tests.test_examples import EXECUTED

ROOT = Path(__file__).resolve().parents[1]
GUIDE = sorted((ROOT / "docs").glob("*.md"))  # the guide's pages (docs/results/ holds measured tables)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$')


def blocks() -> list[tuple[str, str, str]]:
    return [(page.name, lang, body) for page in GUIDE for lang, body in FENCE.findall(page.read_text())]


def test_the_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "configure_multitask" in api and "ConflictMonitor" in api  # the reference is rendered from docstrings


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert {p.name for p in GUIDE} == set(re.findall(r": (\S+\.md)$", nav, re.M))


def test_code_blocks_are_included_from_executed_files() -> None:
    included = set()
    for page, lang, body in blocks():
        if lang == "bash":
            continue  # commands: checked below
        lines = body.strip().splitlines()
        assert len(lines) == 1 and SNIPPET.match(lines[0]), f"{page}: a {lang or 'plain'} block written inline"
        path = SNIPPET.match(lines[0]).group(1)
        included.add(path)
        if path.startswith("examples/"):
            assert Path(path).name in EXECUTED, f"{page} includes {path}, which no test runs"
    assert {f"examples/{name}" for name in EXECUTED} <= included | {"examples/own_data.yaml"}


def _check_command(page: str, words: list[str]) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^(\w+) = \[", section, re.M))
    if words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"{page}: no module {words[2]}"
    elif words[0] == "python":
        assert Path(words[1]).name in EXECUTED and (ROOT / words[1]).exists(), f"{page}: {words[1]}"
    elif words[0] == "bash":
        assert (ROOT / words[1]).exists(), f"{page}: no {words[1]}"
    elif words[:3] == ["pip", "install", "-e"]:
        wanted = set(re.fullmatch(r"\.\[([\w,]+)\]", words[3]).group(1).split(","))
        assert wanted <= extras, f"{page}: unknown extras {wanted - extras}"
    else:
        raise AssertionError(f"{page}: a command the tests do not check: {' '.join(words)}")


def test_every_command_names_something_that_exists() -> None:
    checked = 0
    for page, lang, body in blocks():
        if lang != "bash":
            continue
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                _check_command(page, words)
                checked += 1
    assert checked >= 5


def _family(name: str) -> tuple[str, str]:
    cls = aggregator_class(name)
    if issubclass(cls, GramianAggregator):
        return "Gramian weighting", "Gramian"
    return ("Jacobian aggregator", "Jacobian") if issubclass(cls, Aggregator) else ("loss weighting", "one backward")


def test_the_method_table_lists_every_method_with_its_family_and_engine() -> None:
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \| ([^|]+) \|", (ROOT / "docs" / "methods.md").read_text(), re.M)
    assert sorted(name for name, *_ in rows) == sorted(REGISTERED)
    for name, family, engine in rows:
        assert (family.strip(), engine.strip()) == _family(name), name


def test_the_api_page_covers_every_public_name() -> None:
    import lightning_cost

    api = (ROOT / "docs" / "api.md").read_text()
    for name in lightning_cost.__all__:
        if name != "__version__":
            assert f"::: lightning_cost.{name}\n" in api, name
