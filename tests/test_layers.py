"""The package is built in floors: a module imports only from its own package or from lower floors, so
components never depend on the recipes that use them, and no modules import each other in a circle.

Every import counts, including those inside functions and under `TYPE_CHECKING`: a lazy import that runs
back up is still a dependency that runs back up.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "polyfuse"

# Lowest floor first. A package may import from any lower floor, never from its own floor or above.
FLOORS: list[set[str]] = [
    {"__init__", "errors"},  # the package itself holds only its version
    {"config", "registry", "progress"},
    {"data"},
    {"objectives"},
    {"models"},
    {"alignment", "sampling", "scorers", "merge"},
    {"teacher", "evaluation", "logprobs"},  # logprobs scores through the sampling backends
    {"trainers", "toyworld"},
    {"pipeline"},
    {"cli"},
    {"__main__"},
]
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every `polyfuse...` module imported anywhere in the file (from-imports of names count as the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("polyfuse"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("polyfuse"))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the polyfuse modules it imports (only names that are modules of the package)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_floor():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(FLOOR), f"packages without a floor in FLOORS: {sorted(units - set(FLOOR))}"


def test_no_import_runs_back_up():
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if unit_of(a) != unit_of(b) and FLOOR[unit_of(b)] >= FLOOR[unit_of(a)]
    )
    assert not upward, "imports that run back up or sideways:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 finished
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_a_package_exports_only_its_own_names():
    """A package's `__init__` re-exports names of its own modules only: a name of a lower floor is imported
    from where it lives, so each name has one home."""
    foreign = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        for target in targets
        if not target.startswith(name + ".")
    )
    assert not foreign, "package __init__ files that re-export other packages' names:\n" + "\n".join(foreign)
