"""The type checker's baseline may only shrink (issue 29): run mypy over ``src/`` (settings in
pyproject.toml, ``[tool.mypy]``) and compare its error count with the number recorded in
``tests/mypy-baseline.txt``. More errors fail; fewer ask for the file to be lowered to the new count
(``--update`` writes it). ``make lint`` runs it::

    python tests/mypy_baseline.py [--update]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "mypy-baseline.txt"


def error_count() -> tuple[int, str]:
    """mypy's error count over src/ and its output."""
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    output = run.stdout + run.stderr
    if run.returncode not in (0, 1):
        raise SystemExit(f"error: mypy did not run (exit {run.returncode}):\n{output}")
    found = re.search(r"Found (\d+) errors? in", output)
    return (int(found.group(1)) if found else 0), output


def main(argv: list[str]) -> int:
    count, output = error_count()
    recorded = int(BASELINE.read_text().split()[0])
    if "--update" in argv:
        BASELINE.write_text(f"{count}\n")
        print(f"mypy baseline: {recorded} -> {count} errors")
        return 0
    if count > recorded:
        print(output)
        print(
            f"error: mypy finds {count} errors, more than the baseline's {recorded}; fix the new ones", file=sys.stderr
        )
        return 1
    if count < recorded:
        print(f"mypy: {count} errors, below the baseline's {recorded}: lower it with `python {__file__} --update`")
    else:
        print(f"mypy: {count} errors (baseline {recorded})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
