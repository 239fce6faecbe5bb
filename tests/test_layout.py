"""Packaging invariants from DESIGN.md."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "Linux", out.stderr


def test_core_imports_no_platform_dependencies():
    code = ("import sys, wsss_core, wsss_core.clip_es, wsss_core.refine, wsss_core.masks, wsss_core.prompts, wsss_core.metrics;"
            "bad = [m for m in ('ray', 'mlflow', 'optuna', 'fsspec', 's3fs') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_console_script_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "wsss"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo-data" in out.stdout
