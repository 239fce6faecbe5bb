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
