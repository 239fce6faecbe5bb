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
