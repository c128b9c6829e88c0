"""The package's architecture as its imports show it: no import cycles inside messearch/, and no intra-package
import hidden inside a function (except the CLI's, which keep `messearch --help` fast)."""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "messearch"
# Modules that may import package modules inside functions: the CLI's (fast --help) only.
LOCAL_IMPORTS_ALLOWED = {"cli", "cli_prepare", "cli_front"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _package_target(node: ast.ImportFrom, module: str, path: Path) -> list[str]:
    """Package modules an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        if not (node.module or "").startswith("messearch"):
            return []
        base = node.module.split(".")[1:]
    else:
        pkg = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
        base = (pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg) + (node.module.split(".") if node.module else [])
    if node.module:
        return [".".join(base)]
    return [".".join(base + [alias.name]) for alias in node.names]   # from . import stats


def _imports():
    """(module, target, is_function_local, line) of every intra-package import, and the module names."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        local = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in _package_target(node, module, path):
                    if target in modules or target == "":
                        edges.append((module, target, id(node) in local, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("messearch."):
                        edges.append((module, alias.name[len("messearch."):], id(node) in local, node.lineno))
    return modules, edges


def test_no_import_cycles():
    modules, edges = _imports()
    graph = {m: set() for m in modules}
    for a, b, _, _ in edges:
        if b and a != b:
            graph[a].add(b)
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_known_edges():
    """The walk really reads imports (relative, `from . import x`), so an empty cycle list means something."""
    _, edges = _imports()
    pairs = {(a, b) for a, b, _, _ in edges}
    assert ("search", "metrics") in pairs and ("cache", "cache_format") in pairs and ("search_driver", "front") in pairs


def test_no_function_local_package_imports():
    _, edges = _imports()
    hidden = [f"messearch/{a.replace('.', '/')}.py:{line} imports {b}" for a, b, local, line in edges
              if local and a not in LOCAL_IMPORTS_ALLOWED]
    assert not hidden, "intra-package imports inside functions:\n" + "\n".join(hidden)


def test_search_and_cache_reader_import_neither_torch_nor_ray():
    """The cache's read contract is readable without torch or Ray (module-level imports only)."""
    tree = ast.parse((PACKAGE / "cache_format.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [n for n in names if n.split(".")[0] in ("torch", "ray")], names
    _, edges = _imports()
    assert not [b for a, b, _, _ in edges if a == "cache_format" and b not in ("errors", "files")]


def test_ray_is_imported_lazily():
    """Every command that does not use Ray works where Ray is not installed: no module imports it at the top."""
    top_level_ray = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            top_level_ray += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "ray"]
    assert not top_level_ray, top_level_ray


def test_a_search_trial_imports_no_torch():
    """A Tune trial of the search unpickles its arguments and runs search_shard: torch would cost seconds per trial."""
    import subprocess
    import sys
    code = ("import pickle, sys; import messearch.search_shard; from messearch.cost_table import CostTable; "
            "from messearch.cache_format import CacheArrays; from messearch.search_spec import SearchSpec; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')], 'torch imported'")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
