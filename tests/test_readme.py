"""The README tells the truth: CI runs exactly its Quickstart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_them_verbatim():
    commands = quickstart_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is not in .ci/run"


def test_quickstart_installs_the_cpu_build():
    assert "requirements-cpu.txt" in quickstart_commands()[0]
    pins = [line for line in (ROOT / "requirements-cpu.txt").read_text().splitlines() if line.startswith("torch")]
    assert pins == ["torch==2.13.0"]
