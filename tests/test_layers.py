"""The package's layers import downward only, at module and at function level, and no files import each other.

Layers, bottom up: ``data``, ``model``, ``diffusion`` (and the top-level helpers they use) < ``train``, ``eval``,
``inference`` < ``commands`` and ``cli``. A lower layer that imports a higher one, even inside a function,
ties the two together: the lower one can no longer be used, tested or read without the higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddsc"
LOW = ("ddsc.data", "ddsc.model", "ddsc.diffusion")
HIGH = ("ddsc.train", "ddsc.eval", "ddsc.commands", "ddsc.inference")
CLI = ("ddsc.commands", "ddsc.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ddsc module -> the ddsc modules it imports anywhere in its source (``from pkg import module`` counts as
    the module when it is one)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ddsc"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("ddsc"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    assert len(graph) > 50
    assert "ddsc.train.deepspeed_engine" in graph["ddsc.train.trainer"]  # imported inside a function: seen too
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(LOW) for t in ts if t.startswith(HIGH))
    assert upward == []
    into_cli = sorted(
        f"{m} -> {t}" for m, ts in graph.items() if not m.startswith(CLI) for t in ts if t.startswith(CLI)
    )
    assert into_cli == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_small():
    """One concept per module: none over 350 lines (a longer one is two concepts waiting to be split)."""
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 350
    }
    assert long == {}


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


def test_references_in_the_package_exist():
    """Every ``ddsc.module.name`` a docstring or comment names resolves, and every ``*.py`` / ``*.md`` file it
    names is in the repository (generated outputs such as a report's ``summary.md`` excepted)."""
    import importlib
    import re

    root = PACKAGE.parent
    files = {p.name for p in root.rglob("*") if not {".venv", ".git"} & set(p.parts)}
    from ddsc.latent.export import REMOTE_CODE_MODULES

    generated = {"summary.md", *REMOTE_CODE_MODULES}  # a report's page; the file names of an export's code
    examples = {"ddsc.a.b", "ddsc.x.y"}  # relative_imports' docstring
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for ref in {m.rstrip(".") for m in re.findall(r"\bddsc(?:\.[A-Za-z_]\w*)+", text)} - examples:
            parts = ref.split(".")
            depth = next(i for i in range(len(parts), 0, -1) if _is_module(".".join(parts[:i])))
            obj = importlib.import_module(".".join(parts[:depth]))
            for attr in parts[depth:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(f"{path.name}: {ref}")
        for ref in set(re.findall(r"[\w./-]+\.(?:py|md)\b", text)):
            if Path(ref).name not in files | generated:
                missing.append(f"{path.name}: {ref}")
    assert missing == []
