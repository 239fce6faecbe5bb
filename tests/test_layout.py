"""Packaging invariants from DESIGN.md."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "Linux", out.stderr


FORBIDDEN = ("ray", "mlflow", "optuna", "fsspec", "s3fs")


def test_core_imports_no_platform_dependencies():
    """Every module of wsss_core (walked, not listed): importing them all loads none of the
    platform's libraries, and no import statement anywhere in them names one (lazy ones too)."""
    import ast

    code = ("import importlib, pkgutil, sys, wsss_core\n"
            "for m in pkgutil.walk_packages(wsss_core.__path__, 'wsss_core.'): importlib.import_module(m.name)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    files = sorted((REPO / "wsss_core").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in FORBIDDEN], f"{path}: imports {names}"


def test_console_script_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "wsss"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo-data" in out.stdout


def test_no_platform_function_over_60_lines():
    """The platform is thin glue: every function fits on a screen."""
    import ast

    long = []
    for path in sorted((REPO / "platform" / "wsss_platform").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_platform_names_no_method_in_an_if():
    """Methods meet through registries: no `if ... == "clip_es"` (or any registered name) in the platform."""
    import ast

    from wsss_core.registry import CAM_SOURCES, REFINERS

    names = set(CAM_SOURCES.names()) | set(REFINERS.names())
    hits = []
    for path in sorted((REPO / "platform" / "wsss_platform").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if any(c in names for c in consts if isinstance(c, str)):
                    hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not hits, hits


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a package (a package is its ``__init__``)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        out[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return out


def _import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (at the top or inside a function)."""
    import ast

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join([*anchor[: len(anchor) - node.level + 1], *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import wsss_core.models.x` of a package reaches its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

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
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_round_a_cycle():
    """No import cycle among the modules of wsss_core and wsss_platform, lazy imports included: a
    lazy import inside a function is never the way round one."""
    mods = _modules(REPO / "wsss_core", "wsss_core") | _modules(REPO / "platform" / "wsss_platform", "wsss_platform")
    graph = _import_graph(mods)
    assert len(mods) > 60 and "wsss_core.pairs" in graph["wsss_core.refine.random_walk"]  # the walk sees imports
    assert not _cycles(graph)
    # and it would see one: a module importing a module that imports it back
    assert _cycles(graph | {"wsss_core.pairs": graph["wsss_core.pairs"] | {"wsss_core.refine.random_walk"}})
