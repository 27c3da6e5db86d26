"""The package's shape, checked: no import cycle (module-level or function-local imports alike), entry
points only in cli.py, the loop short enough to read at once. See docs/architecture.md."""

import ast
import inspect
from pathlib import Path

import sslkit

PKG = Path(sslkit.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """sslkit module -> the sslkit modules it imports anywhere in its source (top level or inside functions).
    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}"
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (as a path), or []; a package __init__ importing its own submodules is not one unless
    the submodule imports back a name of the package."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_package_has_no_import_cycle():
    assert _cycle(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_function_local_sslkit_imports_in_the_package():
    """Imports of sslkit modules sit at the top of each module, where the layering is visible."""
    local = []
    for m, p in _modules().items():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sslkit"):
                        local.append(f"{m}.{fn.name}: from {node.module}")
                    elif isinstance(node, ast.Import) and any(a.name.startswith("sslkit") for a in node.names):
                        local.append(f"{m}.{fn.name}: import")
    assert local == []


def test_the_layers_point_one_way():
    """Lower layers never import higher ones (see docs/architecture.md): the loop, evaluation and the
    commands sit above the methods, the methods above models / data / schemas."""
    graph = import_graph()
    reach: dict[str, set[str]] = {}

    def closure(m: str) -> set[str]:
        if m not in reach:
            reach[m] = set()
            for t in graph[m]:
                reach[m] |= {t} | closure(t)
        return reach[m]

    top = {"sslkit.cli", "sslkit.tasks", "sslkit.engine", "sslkit.evaluation", "sslkit.export", "sslkit.config"}
    for low in ("sslkit.schemas", "sslkit.data", "sslkit.models", "sslkit.layers", "sslkit.masking",
                "sslkit.checkpoint", "sslkit.pretrained", "sslkit.methods.base"):
        assert not closure(low) & top, (low, closure(low) & top)


def test_cli_holds_entry_points_only():
    from sslkit import cli

    src = inspect.getsource(cli)
    assert len(src.splitlines()) <= 220
    tree = ast.parse(src)
    assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    public = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_"))
    assert public == ["check_keys", "data_main", "eval_main", "export_main", "finetune_main", "pretrain_main",
                      "visualize_main"]


def test_the_loop_reads_at_once():
    from sslkit import engine

    assert len(inspect.getsource(engine.train).splitlines()) <= 60
