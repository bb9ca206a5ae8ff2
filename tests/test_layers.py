"""The package is built in floors: a module imports only from its own package or from lower floors, so
components never depend on the recipes that use them, and no modules import each other in a circle.

Every import counts, including those inside functions and under `TYPE_CHECKING`: a lazy import that runs
back up is still a dependency that runs back up.

A dependency can also run back up without an import: a parameter typed `Any` (or not typed) lets a function
read a higher floor's objects by duck typing. The objectives, pure functions of tensors and arrays, are held
to plain inputs.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import typing
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "polyfuse"

# Lowest floor first. A package may import from any lower floor, never from its own floor or above.
FLOORS: list[set[str]] = [
    {"__init__", "errors"},  # the package itself holds only its version
    {"config", "registry", "progress", "lazy"},
    {"data"},
    {"objectives", "pairs"},  # pairs: training data from scored samples (data only)
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
    from where it lives, so each name has one home. (`polyfuse.lazy` gives a package its lazy `__getattr__`
    and re-exports nothing.)"""
    foreign = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        for target in targets
        if not target.startswith(name + ".") and target != "polyfuse.lazy"
    )
    assert not foreign, "package __init__ files that re-export other packages' names:\n" + "\n".join(foreign)


# What an objective may take: Python's own types, arrays and tensors, and the objectives' own types.
PLAIN_MODULES = ("builtins", "types", "typing", "collections.abc", "numpy", "torch", "polyfuse.objectives")


def annotation_types(hint: object) -> Iterator[object]:
    """Every type an annotation names: `list[X | None]` gives list, the union, X and NoneType."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal or hint is Ellipsis:
        return
    yield hint if origin is None else origin
    for arg in typing.get_args(hint):
        for inner in arg if isinstance(arg, list) else [arg]:  # Callable[[A, B], C] lists its parameters
            yield from annotation_types(inner)


def objective_inputs() -> Iterator[tuple[str, str, object]]:
    """(where, name, annotation) of every parameter of the objectives' functions and methods and every field
    of their dataclasses; an unannotated parameter comes as `Any`, as a type checker reads it."""
    for name in sorted(m for m in import_graph() if unit_of(m) == "objectives"):
        module = importlib.import_module(name)
        own = [v for v in vars(module).values() if getattr(v, "__module__", None) == name]
        functions = [f for f in own if inspect.isfunction(f)]
        for cls in (c for c in own if inspect.isclass(c)):
            written = (f for f in vars(cls).values() if inspect.isfunction(f))  # not those dataclass generates
            functions += [f for f in written if f.__code__.co_filename == module.__file__]
            if dataclasses.is_dataclass(cls):
                hints = typing.get_type_hints(cls)
                yield from ((f"{name}.{cls.__qualname__}", f.name, hints[f.name]) for f in dataclasses.fields(cls))
        for function in functions:
            hints = typing.get_type_hints(function)
            for parameter in list(inspect.signature(function).parameters)[1 if "." in function.__qualname__ else 0:]:
                yield f"{name}.{function.__qualname__}", parameter, hints.get(parameter, typing.Any)


def test_objectives_take_plain_data_only():
    """No objective reads another floor's objects, imported or not: every input is typed with plain types."""
    foreign = sorted(
        f"{where}({parameter}: {hint})"
        for where, parameter, hint in objective_inputs()
        for named in annotation_types(hint)
        if named is typing.Any or not (getattr(named, "__module__", "") or "").startswith(PLAIN_MODULES)
    )
    assert not foreign, "objective inputs typed Any, untyped, or typed from another layer:\n" + "\n".join(foreign)
