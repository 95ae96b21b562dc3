"""A real exact screen killed with SIGKILL mid-run, then resumed: the final table is bit-equal to
an uninterrupted run's, with no duplicated row and no leftover temporaries."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import weightpatch
from weightpatch.rundir import PENDING_SCORES, RunDir

SCREEN = """
import sys
import torch
from weightpatch import demo
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.rundir import RunDir
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen

torch.set_num_threads(1)
paths = demo.paths()
pair = load_pair(paths.base, paths.specialized)
texts = [p.prompt for p in demo.prompts("heldout")[:12]]
anchor = build_anchor(pair, texts, None, layer=3, method="model_diff")
names = [str(c) for c in pair.space.components(kinds=("head", "neuron")) if c.kind == "head" or c.index < 6]
with RunDir.open(sys.argv[1], "screen", {"what": "kill test"}, pair.identities()) as run:
    done = run.done("exact")
    print("todo", len(names) - len(done), flush=True)

    def save(rows):
        run.append_scores(rows)
        print("rows", len(rows), flush=True)

    ExactScreen(AnchorScorer(pair, anchor, texts, batch_size=4)).run(names, skip=done, on_result=save, progress=False)
print("finished", flush=True)
"""


def _screen(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(weightpatch.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCREEN, str(run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


@pytest.mark.slow
def test_sigkill_mid_screen_then_resume_is_bit_equal_without_duplicates(tmp_path):
    reference = _screen(tmp_path / "reference")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0 and "finished" in out
    total = int(out.split()[1])

    killed = _screen(tmp_path / "killed")
    rows = 0
    for line in killed.stdout:
        if line.startswith("rows"):
            rows += int(line.split()[1])
            if rows >= total // 3:
                killed.send_signal(signal.SIGKILL)
                break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / PENDING_SCORES).is_file()  # the rows it wrote wait in the pending log
    kept = RunDir(tmp_path / "killed").scores().frame  # readable while nothing holds the directory
    assert 0 < len(kept) < total and not kept.duplicated(["component", "method"]).any()

    time.sleep(0.1)
    resumed = _screen(tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"todo {total - len(kept)}" in out

    final = RunDir(tmp_path / "killed").scores().frame
    expected = RunDir(tmp_path / "reference").scores().frame
    assert len(final) == total and not final.duplicated(["component", "method"]).any()
    pd.testing.assert_frame_equal(final, expected, check_exact=True)
    for run in ("reference", "killed"):
        leftovers = [p.name for p in (tmp_path / run).iterdir() if p.name.endswith((".tmp", ".wptmp"))]
        assert leftovers == [] and not (tmp_path / run / PENDING_SCORES).exists()
    csv = pd.read_csv(tmp_path / "killed" / "scores.csv")
    assert list(csv["component"]) == list(final["component"])
