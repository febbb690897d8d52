"""The README's promises about how the project is run."""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    block = (REPO / "README.md").read_text().split("<!-- test-command -->", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command_unchanged():
    """The line of `.ci/run` that finds the command, run as it stands there, yields the README's command."""
    script = (REPO / ".ci" / "run").read_text()
    finder = re.search(r"^command=\$\((.*)\)$", script, re.M).group(1)
    extracted = subprocess.run(["bash", "-c", finder], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    command = _readme_test_command()
    assert extracted == command
    assert 'bash -c "$command"' in script and script.index("export CI=true") < script.index('bash -c "$command"')
    assert "requirements-test.txt" in command and "pytest" in command
    assert "-rs" in command.split()  # skips are listed with their reasons


def test_ci_installs_the_browser_the_tests_look_for():
    from tests.app_server import CHROMIUM

    assert f"[ ! -x {CHROMIUM} ]" in (REPO / ".ci" / "run").read_text()


def test_a_skip_fails_under_ci_and_hypothesis_is_derandomized(tmp_path):
    """tests/ci_strict.py, run by a real pytest on a file that skips and one that reports hypothesis's settings."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\nfrom hypothesis import settings\n"
        "def test_skips():\n    pytest.skip('no such thing here')\n"
        "def test_profile():\n    print('derandomize', settings().derandomize)\n"
    )
    import os

    def run(ci: str | None):
        env = {key: value for key, value in os.environ.items() if key != "CI"} | {"PYTHONPATH": str(REPO)}
        env |= {"CI": ci} if ci is not None else {}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "tests.ci_strict", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True,
        )

    strict, relaxed = run("true"), run(None)
    assert strict.returncode == 1 and "every test must run: no such thing here" in strict.stdout, strict.stdout
    assert "derandomize True" in strict.stdout
    assert relaxed.returncode == 0 and "SKIPPED" in relaxed.stdout and "derandomize False" in relaxed.stdout, relaxed.stdout


def test_readme_front_matter_makes_a_gradio_space():
    front = (REPO / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


def test_torch_is_pinned():
    assert "torch==2.13.0" in (REPO / "requirements.txt").read_text().splitlines()


def test_readme_layout_names_every_package_and_each_manual_every_module():
    """A newcomer reads the architecture from ``ls explorer/``: the root holds packages only, the README's layout
    names each, and each package's ``__init__`` docstring names every module in it."""
    root = REPO / "explorer"
    assert sorted(path.name for path in root.glob("*.py")) == ["__init__.py", "__main__.py"]
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    packages = sorted(path.parent for path in root.rglob("__init__.py"))
    top = {package.name for package in packages if package.parent == root}
    assert sorted(name for name in top if f"{name}/" not in layout) == []
    for package in packages:
        manual = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        members = [path.stem for path in package.glob("*.py") if path.stem != "__init__"]
        members += [path.parent.name for path in package.glob("*/__init__.py")]
        assert sorted(name for name in members if f"``{name}``" not in manual and f"{name}/" not in manual) == [], package
