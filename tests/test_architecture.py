"""The package's layers point one way and no module imports itself in a circle (docs/architecture.md)."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mdistiller"

# Rank of each top-level part of the package: a module may import its own part and parts of a lower rank only.
LAYERS = {
    "__init__": 0, "errors": 0,
    "registry": 1,
    "models": 2, "dataset": 2,
    "explain": 3,
    "distillers": 4,
    "engine": 5,
    "launch": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Every mdistiller module `path` imports (at any depth of the file), resolved to a module file that exists."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name` imports pkg itself
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("mdistiller") and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imported_modules(name, path, set(known)) for name, path in known.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_of_the_package_has_a_layer():
    parts = {layer(name) for name in modules()}
    assert parts <= set(LAYERS), f"parts without a layer in docs/architecture.md: {sorted(parts - set(LAYERS))}"


def test_imports_point_down_the_layers():
    upward = []
    for source, targets in import_graph().items():
        for target in targets:
            own, other = layer(source), layer(target)
            if own != other and LAYERS[other] >= LAYERS[own]:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(sorted(upward))


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_module_imports_itself_in_a_circle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = import_graph()
    graph["mdistiller.models.fold"] = graph["mdistiller.models.fold"] | {"mdistiller.engine.trainer"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert LAYERS[layer("mdistiller.engine.trainer")] > LAYERS[layer("mdistiller.models.fold")]
    assert imported_modules("mdistiller.distillers.KD", PACKAGE / "distillers" / "KD.py", set(modules())) >= {
        "mdistiller.distillers._base"}


@pytest.mark.parametrize("module, absent", [
    ("mdistiller.distillers", ["mdistiller.engine", "mdistiller.dataset", "tensorboardX"]),
    ("mdistiller.explain", ["mdistiller.distillers", "mdistiller.engine", "mdistiller.dataset"]),
    ("mdistiller.models", ["mdistiller.explain", "mdistiller.dataset"]),
    ("mdistiller.dataset", ["mdistiller.models", "mdistiller.explain", "mdistiller.engine"]),
])
def test_importing_a_layer_loads_nothing_above_it(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
