"""The packages' layering, read from the source: no module imports a layer above its own, and no two modules
import each other, however indirectly (only imports that run when a module loads count; ``TYPE_CHECKING``
blocks are none). gradio is imported only under app/ui/, plotly only by app/plots."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "explorer"
# A package may import its own layer and those below (tracing and editing are side by side; an edit's default
# layer comes from a trace, so editing may use tracing, never the reverse). testing/ serves tests and benchmarks.
RANK = {"core": 0, "tracing": 1, "editing": 2, "studies": 3, "app": 4, "cli": 4, "testing": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """The explorer modules ``path`` (module ``name``, by default read from its place) imports at load time."""
    tree = ast.parse(path.read_text())
    package = (name or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("explorer")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("explorer"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if (REPO / (candidate.replace(".", "/") + ".py")).exists()
                              or (REPO / candidate.replace(".", "/") / "__init__.py").exists() else base)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}
GRAPH = {name: {target for target in imports(path) if target in MODULES} for name, path in MODULES.items()}


def test_no_module_imports_a_layer_above_its_own():
    upward = [(name, target) for name, targets in GRAPH.items() for target in targets
              if layer(name) and layer(target) and RANK[layer(target)] > RANK[layer(name)]]
    assert upward == []


def test_no_import_cycles():
    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            current = stack.pop()
            for target in GRAPH[current]:
                if target == goal:
                    return True
                if target not in seen and not goal.startswith(target + ".") and not target.startswith(current + "."):
                    seen.add(target)
                    stack.append(target)
        return False

    # A package's __init__ importing its own modules is how it exports them; a cycle runs between modules.
    plain = {name for name, path in MODULES.items() if path.name != "__init__.py"}
    cycles = sorted(name for name in plain if reaches(name, name))
    assert cycles == []


def test_gradio_only_in_the_ui_and_plotly_only_in_plots():
    for name, path in MODULES.items():
        text = path.read_text()
        if "import gradio" in text or "from gradio" in text:
            assert name.startswith("explorer.app.ui"), name
        if "import plotly" in text or "from plotly" in text:
            assert name == "explorer.app.plots", name


def test_the_checker_sees_an_upward_import(tmp_path):
    """Not vacuous: an upward import written into a core module's source is caught by the same reading."""
    probe = ROOT / "core" / "prompts.py"
    copy = tmp_path / "prompts.py"
    copy.write_text(probe.read_text() + "\nfrom ..studies import compare\n")
    found = imports(copy, module_name(probe))  # read as if it stood where the real module stands
    assert "explorer.studies.compare" in found and layer("explorer.studies.compare") == "studies"
    assert RANK[layer("explorer.studies.compare")] > RANK[layer(module_name(probe))]
