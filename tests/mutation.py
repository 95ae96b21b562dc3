"""Mutation testing of the core modules with mutmut 3, one module at a time against its mirrored
test files only (``make test-mutation``; ``MODULES="scoring patch"`` to pick modules).

For each module in ``[tool.mutmut-modules]`` of ``pyproject.toml`` (module file -> test files),
a scratch copy of ``src/``, ``tests/`` and ``pyproject.toml`` is made under
``build/mutation/<module>/`` with ``[tool.mutmut]`` narrowed to that module (``only_mutate``) and
its tests (``pytest_add_cli_args_test_selection``); mutmut runs there and the kill rate is printed
as ``module: killed/total (rate), survivors: ...``. Survivors are listed by mutmut name; see one
with ``cd build/mutation/<module> && mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
STATUS_KILLED = {"killed", "timeout", "segfault"}  # mutmut's names for a mutant the tests caught


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def scratch_copy(module: str, source: str, tests: list[str], base: dict) -> Path:
    """A copy of the project whose ``[tool.mutmut]`` mutates ``source`` and selects ``tests``."""
    work = ROOT / "build" / "mutation" / module
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    text = (ROOT / "pyproject.toml").read_text()
    text = text.split("\n[tool.mutmut]")[0].split("\n[tool.mutmut-modules]")[0]
    settings = {**base, "only_mutate": [source], "pytest_add_cli_args_test_selection": tests}
    lines = ["", "[tool.mutmut]"]
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    (work / "pyproject.toml").write_text(text.rstrip() + "\n" + "\n".join(lines) + "\n")
    return work


def run_module(
    module: str, source: str, tests: list[str], base: dict, max_children: int
) -> tuple[int, dict[str, str], list[str]]:
    """Run mutmut for one module; return the killed count, every mutant's status and the survivors."""
    work = scratch_copy(module, source, tests, base)
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the mutated copy must be the one imported
    subprocess.run([mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, check=False)
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    statuses = {}
    for line in out.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    survivors = sorted(n for n, s in statuses.items() if s not in STATUS_KILLED)
    return len(statuses) - len(survivors), statuses, survivors


def main() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    modules: dict[str, list[str]] = config["mutmut-modules"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"module files to mutate (default all): {', '.join(modules)}")
    parser.add_argument("--max-children", type=int, default=2)
    args = parser.parse_args()
    chosen = args.modules or list(modules)
    unknown = [m for m in chosen if m not in modules]
    if unknown:
        raise SystemExit(f"unknown modules {unknown}; choose from {list(modules)}")
    report = []
    for source in chosen:
        module = Path(source).stem
        killed, statuses, survivors = run_module(module, source, modules[source], config["mutmut"], args.max_children)
        total = len(statuses)
        rate = killed / total if total else float("nan")
        report.append(f"{source}: {killed}/{total} killed ({rate:.0%}); survivors: {', '.join(survivors) or 'none'}")
    print("\n".join(report))


if __name__ == "__main__":
    main()
