"""The README's promises about how the project is run."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


CI_STRICT_SAMPLES = {
    "test_importorskip.py": "import pytest\npytest.importorskip('no_such_module_for_ci')\ndef test_never():\n    pass\n",
    "test_module_skip.py": "import pytest\npytest.skip('module switched off', allow_module_level=True)\ndef test_never():\n    pass\n",
    "test_marks.py": (
        "import pytest\n"
        "@pytest.mark.skipif(True, reason='condition holds')\ndef test_skipif():\n    pass\n"
        "@pytest.mark.xfail(reason='known broken')\ndef test_xfail_mark():\n    assert False\n"
        "def test_xfail_call():\n    pytest.xfail('called xfail')\n"
        "@pytest.mark.xfail(reason='thought broken')\ndef test_xpass():\n    pass\n"
        "def test_plain():\n    pass\n"
    ),
}


def _ci_strict_run(folder: Path, ci: str | None, loader: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """pytest on ``folder`` with tests/ci_strict.py loaded by ``-p`` or by a conftest holding tests/conftest.py's import of
    it; the run and its short summary lines (-rA)."""
    arguments = ["-p", "tests.ci_strict"] if loader == "-p" else []
    if loader == "conftest":
        imports = [line for line in (REPO / "tests" / "conftest.py").read_text().splitlines() if line.startswith("from tests.ci_strict ")]
        (folder / "conftest.py").write_text("\n".join(imports) + "\n")
    env = {key: value for key, value in os.environ.items() if key != "CI"} | {"PYTHONPATH": str(REPO)} | ({"CI": ci} if ci else {})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *arguments, str(folder)],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    summary = run.stdout.split("short test summary info", 1)[-1].splitlines()
    return run, [line for line in summary if line.split(" ", 1)[0] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")]


@pytest.mark.parametrize("loader", ["-p", "conftest"])
def test_skips_while_collected_xfails_and_xpasses_fail_under_ci(tmp_path, loader):
    """Under CI=true every way a test can not run or not pass is a failure with its reason; without CI pytest's own outcomes."""
    for name, text in CI_STRICT_SAMPLES.items():
        (tmp_path / name).write_text(text)
    must_run, must_pass = "under CI=true, where every test must run", "under CI=true, where every test must pass"
    strict, lines = _ci_strict_run(tmp_path, "true", loader)
    assert strict.returncode == 1, strict.stdout
    assert sorted(lines) == sorted([
        f"FAILED test_importorskip.py::skipped-while-collected - Failed: skipped while collected {must_run}: "
        "could not import 'no_such_module_for_ci': No module named 'no_such_module_for_ci'",
        f"FAILED test_module_skip.py::skipped-while-collected - Failed: skipped while collected {must_run}: module switched off",
        f"ERROR test_marks.py::test_skipif - skipped {must_run}: condition holds",  # failed in its setup, where marks are read
        f"FAILED test_marks.py::test_xfail_mark - expected to fail (xfail) {must_pass}: known broken",
        f"FAILED test_marks.py::test_xfail_call - expected to fail (xfail) {must_pass}: called xfail",
        f"FAILED test_marks.py::test_xpass - marked xfail but passed (XPASS) {must_pass}: remove the mark (thought broken)",
        "PASSED test_marks.py::test_plain",
    ]), strict.stdout
    assert strict.stdout.strip().splitlines()[-1].startswith("5 failed, 1 passed, 1 error in ")

    relaxed, lines = _ci_strict_run(tmp_path, None, loader)
    assert relaxed.returncode == 0, relaxed.stdout
    assert relaxed.stdout.strip().splitlines()[-1].startswith("1 passed, 3 skipped, 2 xfailed, 1 xpassed in "), relaxed.stdout
    assert {"PASSED test_marks.py::test_plain", "XFAIL test_marks.py::test_xfail_mark - known broken",
            "XFAIL test_marks.py::test_xfail_call - called xfail", "XPASS test_marks.py::test_xpass - thought broken",
            "SKIPPED [1] test_marks.py:2: condition holds", "SKIPPED [1] test_module_skip.py:2: module switched off",
            "SKIPPED [1] test_importorskip.py:2: could not import 'no_such_module_for_ci': No module named 'no_such_module_for_ci'",
            } <= set(lines), relaxed.stdout


def test_the_test_suite_loads_every_hook_of_ci_strict():
    """tests/conftest.py imports tests/ci_strict.py's hooks by name: each one it defines, none left out."""
    hooks = {node.name for node in ast.parse((REPO / "tests" / "ci_strict.py").read_text()).body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("pytest_")}
    imported = {alias.name for node in ast.parse((REPO / "tests" / "conftest.py").read_text()).body
                if isinstance(node, ast.ImportFrom) and node.module == "tests.ci_strict" for alias in node.names}
    assert hooks and imported == hooks


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


# Test folders that are not one package's unit tests: engines run together on real models and servers, and the
# project's own promises.
TEST_FOLDERS_APART = {"integration", "project"}
# Benchmark results written by the package's own commands rather than by a script beside them.
COMMAND_RESULT_FOLDERS = {"evaluate", "sequential", "average"}


def test_tests_mirror_the_packages():
    """Each folder of unit tests is a package of ``explorer/`` at the same path; integration tests live apart."""
    for folder in sorted(p for p in (REPO / "tests").rglob("*") if p.is_dir() and p.name != "__pycache__"):
        relative = folder.relative_to(REPO / "tests")
        if relative.parts[0] in TEST_FOLDERS_APART:
            assert len(relative.parts) == 1, f"tests/{relative} nests under a folder kept apart"
            continue
        package = REPO / "explorer" / relative
        assert (package / "__init__.py").exists(), f"tests/{relative} mirrors no package explorer/{relative}"
        for test_file in folder.glob("test_*.py"):
            module = test_file.stem.removeprefix("test_")
            # test_handlers.py covers the package's *_handlers modules together.
            named = [m for m in package.glob("*.py") if m.stem == module or m.stem.endswith(f"_{module}")]
            assert named, f"{test_file.relative_to(REPO)} names no module of explorer/{relative}"
    loose = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    assert loose == [], f"test files outside the package folders: {loose}"


def test_benchmarks_separate_speed_from_studies_with_results_beside_each_script():
    root = REPO / "benchmarks"
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__") == ["speed", "studies"]
    assert [p.name for p in root.iterdir() if p.is_file()] == ["README.md"]
    index = (root / "README.md").read_text()
    for kind in ("speed", "studies"):
        scripts = {p.stem for p in (root / kind).glob("*.py")}
        for script in scripts:
            assert f"`{kind}/{script}.py`" in index, f"benchmarks/README.md does not list {kind}/{script}.py"
        for result in (p for p in (root / kind).iterdir() if p.is_file() and p.suffix != ".py"):
            assert any(result.name.startswith(script) for script in scripts), \
                f"benchmarks/{kind}/{result.name} lies beside no script named like it"
        for folder in (p for p in (root / kind).iterdir() if p.is_dir() and p.name != "__pycache__"):
            assert kind == "studies" and folder.name in COMMAND_RESULT_FOLDERS, f"benchmarks/{kind}/{folder.name}/ is no command's results"
            assert f"`studies/{folder.name}/`" in index


def test_the_package_list_names_every_package():
    """pyproject.toml lists the packages by hand (a folder outside explorer/ maps to explorer.assets): none missing."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "explorer").rglob("__init__.py")}
    assert listed == found | {"explorer.assets"}


def test_a_wheel_installed_outside_the_checkout_reads_the_bundled_data(tmp_path):
    """`pip install .` (no checkout beside it): the fact set and the CounterFact records are read from the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"),
                    str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    probe = ("from explorer.core.assets import ASSETS; from explorer.core.facts import load_facts; "
             "from explorer.studies.evaluate import REAL_COUNTERFACT; import json; "
             "print(json.dumps([str(ASSETS), len(load_facts()), REAL_COUNTERFACT.is_file()]))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assets, facts, counterfact = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(assets) == target / "explorer" / "assets"
    assert facts == len(json.loads((REPO / "assets" / "known_facts.json").read_text())) and counterfact
