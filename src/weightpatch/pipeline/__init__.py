"""The pipeline layer: each stage is a function over a config (:mod:`weightpatch.config`) and a run
directory, resumable, with the same defaults from Python and from ``wpatch`` (the CLI only turns
flags into the config and calls the stage). A stage takes an already loaded pair as its second
argument, so a notebook (or the demo) loads the models once for several stages.

==============  ===================  ===================================================
stage           config               writes into the run directory
==============  ===================  ===================================================
run_check       CheckConfig          weight_delta (with ``run_dir``)
run_anchor      AnchorConfig         anchor.safetensors/.json, anchor_layers, steering
run_screen      ScreenConfig         scores, verified
run_trace       TraceConfig          activation scores, roles, supplier_edges, hierarchy,
                                     supplier_overlap, sufficiency, necessity
run_merge       MergeStageConfig     the merged model; merge_table, merge_evaluation
run_demo        DemoConfig           all of the above on the embedded pair, report.html
==============  ===================  ===================================================
"""

from weightpatch.pipeline.anchor import AnchorResult, run_anchor
from weightpatch.pipeline.check import CheckResult, run_check
from weightpatch.pipeline.demo import DemoResult, demo_configs, run_demo
from weightpatch.pipeline.inputs import open_pair
from weightpatch.pipeline.merge import MergeResult, run_merge
from weightpatch.pipeline.screen import ScreenResult, run_screen
from weightpatch.pipeline.trace import TraceResult, run_trace

__all__ = [
    "AnchorResult",
    "CheckResult",
    "DemoResult",
    "MergeResult",
    "ScreenResult",
    "TraceResult",
    "demo_configs",
    "open_pair",
    "run_anchor",
    "run_check",
    "run_demo",
    "run_merge",
    "run_screen",
    "run_trace",
]
