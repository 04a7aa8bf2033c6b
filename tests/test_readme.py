"""The README's two commands stay true: CI runs the README's test command verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("```")[0].strip() for b in blocks]


def test_readme_starts_with_setup_and_test_commands():
    setup, test = readme_commands()
    assert 'pip install -e ".[dev]"' in setup and "simple_train.py" in setup
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test in ci_lines
