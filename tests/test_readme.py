"""README's two set-up commands stay in sync with what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list:
    return re.findall(r"```\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_starts_with_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "tools/quickstart.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_command_two_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines
