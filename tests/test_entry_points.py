"""Every ``python -m`` entry point of the benchmarks runs in the suite, as a newcomer would run it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def entry_points() -> list[str]:
    """The dotted names ``python -m`` accepts: modules with a ``__main__`` guard, packages with ``__main__.py``."""
    names = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if path.name == "__main__.py":
            names.append(".".join(parts[:-1]))
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body):
            names.append(".".join(parts[:-1] if path.name == "__init__.py" else parts))
    return names


def test_every_entry_point_is_run_by_some_test() -> None:
    others = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    found = entry_points()
    assert "benchmarks.run" in found and "benchmarks.teleport.effect" in found
    missing = [m for m in found if m not in others and f"from {m.rsplit('.', 1)[0]} import {m.rsplit('.', 1)[1]}"
               not in others]
    assert not missing, f"entry points no test runs: {missing}"


def test_every_entry_point_the_docs_name_exists() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "results" / "README.md"]
    named = {w.split()[2].rstrip(".,:;)`") for d in docs for w in _commands(d.read_text())}
    assert named, "no python -m command found in the docs"
    assert named <= set(entry_points()), f"named in the docs but not runnable: {sorted(named - set(entry_points()))}"


def _commands(text: str) -> list[str]:
    words = text.replace("`", " ").split()
    return [" ".join(words[i:i + 3]) for i in range(len(words) - 2) if words[i:i + 2] == ["python", "-m"]]
