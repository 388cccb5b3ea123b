"""The CI script (.ci/run): the README command it runs and the Python it calls exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CI_SCRIPT = REPO / ".ci" / "run"


def test_readme_has_the_test_command_ci_runs() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    marker = lines.index("<!-- test-command -->")
    command = lines[marker + 2]  # as .ci/run reads it: the line after the code fence
    assert "pytest" in command, command


def test_every_python_snippet_of_the_ci_script_runs() -> None:
    """A module renamed or moved must not leave CI picking the wrong CPU kind silently."""
    snippets = re.findall(r"python -c '([^']+)'", CI_SCRIPT.read_text(encoding="utf-8"))
    assert snippets, "no python -c snippet found in .ci/run"
    for code in snippets:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{code}: {done.stderr.strip()}"
        assert done.stdout.strip() in ("0", "1"), done.stdout
