"""The README's example is a complete file that runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_the_readme_shows_the_example_file_verbatim():
    assert EXAMPLE.read_text().strip() in (ROOT / "README.md").read_text()


def test_the_example_runs_and_teleports(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("step ") and "|g0| x" in line for line in lines)
    assert lines[-1].startswith("trigger ratio per epoch: [0.0,")
