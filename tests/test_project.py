"""The README's promises about how the project is run."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_unchanged():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1)
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/```$/p' README.md | sed -n '/^```bash$/,/^```$/p' | sed '1d;$d'"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command.strip()
    assert "requirements-test.txt" in command and "pytest" in command


def test_readme_front_matter_makes_a_gradio_space():
    front = (REPO / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


def test_torch_is_pinned():
    assert "torch==2.13.0" in (REPO / "requirements.txt").read_text().splitlines()
