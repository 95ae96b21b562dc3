"""The layers are enforced (issue 29): the import-linter contracts in pyproject.toml hold (the layers,
and nothing outside demo/ imports demo/)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_layers_contract_is_kept():
    pytest.importorskip("importlinter", reason="import-linter is not installed (the test extra)")
    check = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_the_demo_contract_covers_every_module_outside_demo():
    """A module added to the package is a source of the "nothing imports demo/" contract too."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    demo = next(c for c in contracts if c.get("forbidden_modules") == ["weightpatch.demo"])
    package = ROOT / "src" / "weightpatch"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    assert {f"weightpatch.{m}" for m in modules - {"demo"}} == set(demo["source_modules"])
