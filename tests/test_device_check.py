"""benchmarks/device_check.py: without a CUDA GPU it says so, writes nothing and exits 0; with one, its
timing helper waits for the GPU's queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "device_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "device.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU on this machine" in result.stdout
    assert "nothing measured" in result.stdout
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_synchronized_times_queued_gpu_work():
    sys.path.insert(0, str(SCRIPT.parent))
    import device_check

    assert device_check.no_gpu_message() is None
    x = torch.randn(4096, 4096, device="cuda")
    result, seconds = device_check.synchronized(lambda: (x @ x).sum())
    assert seconds > 0 and torch.isfinite(result)
