"""The house's drawing from its imports (ast only, nothing imported): no import circle, no module over 900 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tuner"
MAX_LINES = 900


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _targets(node: ast.AST, name: str, mods: dict[str, Path]) -> list[str]:
    """The tuner modules one import statement loads (`from tuner import x` names module tuner.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    if node.level:  # relative import: resolve against the importing module's package
        base = name.split(".")[: len(name.split(".")) - node.level + (name in _packages(mods))]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    out = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
    return out or ([mod] if mod in mods else [])


def _packages(mods: dict[str, Path]) -> set[str]:
    return {m for m, p in mods.items() if p.name == "__init__.py"}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def import_graph(function_level: bool = False) -> dict[str, set[str]]:
    """Module → the tuner modules it imports when loaded (or, with function_level, also inside functions)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def visit(node: ast.AST, name: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue  # never runs
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (function_level or not in_function):
                graph[name].update(t for t in _targets(child, name, mods) if t != name)
            visit(child, name, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for name, path in mods.items():
        visit(ast.parse(path.read_text()), name, False)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_sees_a_circle_through_function_level_imports(tmp_path):
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_when_modules_load():
    assert cycles(import_graph()) == []


def test_no_import_circle_counting_function_level_imports():
    # the planner and the space do not import each other: what joins them (the region, the contexts that fit,
    # a rig's verdicts) lives in tuner.search.feasible, which imports both
    assert cycles(import_graph(function_level=True)) == []


def test_no_module_over_900_lines():
    over = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert over == {}


# The pipeline, lowest layer first: a package may import its own layer and those below, never one above.
# "tuner" is the ground floor (tuner/*.py: the record, errors, units, statistics, tables, the llama.cpp glue).
LAYERS = (
    "tuner",
    "tuner.model",
    "tuner.quality",
    "tuner.measure",
    "tuner.plan",
    "tuner.search",
    "tuner.report",
    "tuner.cli",
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the package a module belongs to (tuner/x.py: the ground floor)."""
    parts = module.split(".")
    if len(parts) == 2 and (PKG / f"{parts[1]}.py").exists():
        return 0
    return LAYERS.index(".".join(parts[:2]))


def test_every_module_is_in_a_layer():
    assert all(layer_of(m) >= 0 for m in modules() if m != "tuner")


def test_no_package_imports_one_above_it():
    up = sorted(
        f"{m} imports {t}"
        for m, ts in import_graph(function_level=True).items()
        if m != "tuner"
        for t in ts
        if layer_of(t) > layer_of(m)
    )
    assert up == []


def test_layer_check_sees_an_import_from_above():
    assert layer_of("tuner.measure.runner") < layer_of("tuner.plan.planner") < layer_of("tuner.cli.options")
    assert layer_of("tuner.record") == 0


def _imports_of(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(node.module or "")
    return out


def test_click_only_in_cli():
    clicky = sorted(
        m
        for m, p in modules().items()
        if not m.startswith("tuner.cli") and any(i == "click" or i.startswith("click.") for i in _imports_of(p))
    )
    assert clicky == []


def private_crossings(path: Path, mods: dict[str, Path]) -> list[str]:
    """`from tuner.x import _name` and `x._name` where x is a tuner module imported by the file."""
    tree = ast.parse(path.read_text())
    aliases, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tuner"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{node.module}.{a.name}")
                if f"{node.module}.{a.name}" in mods:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name.startswith("tuner"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module():
    mods = modules()
    crossing = {m: c for m, p in mods.items() if (c := private_crossings(p, mods))}
    assert crossing == {}


def test_private_crossing_check_sees_both_forms(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from tuner.plan.planner import _pad\nfrom tuner.search import confirm\nconfirm._short(1)\n")
    assert private_crossings(f, modules()) == ["tuner.plan.planner._pad", "confirm._short"]
