"""The layout the design promises: no import cycle anywhere in the package (imports inside
functions included), ``backends/`` holds one file per solver plus the registry and base, and the
search imports no backend (it is handed solve callables)."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignment_solver"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in (ROOT / "formulations").glob("*.py"):       # installed as alignment_solver.formulations
        name = "alignment_solver.formulations" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for target in imports(name, path, set(mods)):
            if not name.startswith(target + "."):       # a module importing its own package's __init__
                g.add_edge(name, target)
    return g


def test_no_import_cycle_in_the_package():
    cycles = [c for c in nx.simple_cycles(graph()) if len(c) > 1]
    assert cycles == [], cycles[:5]


def test_backends_hold_only_backends_and_the_search_imports_none():
    files = sorted(p.stem for p in (PACKAGE / "backends").glob("*.py"))
    assert files == ["__init__", "_pulp", "base", "cpsat", "flow", "greedy", "pulp_cbc", "pulp_highs"], files
    g = graph()
    for name in g:
        if name.startswith("alignment_solver.search"):
            bad = [t for t in g.successors(name) if t.startswith("alignment_solver.backends")]
            assert bad == [], (name, bad)
