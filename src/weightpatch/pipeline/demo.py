"""The demo: the whole pipeline on the embedded model pair, ending with the HTML report.

:func:`demo_configs` spells out the stage configs the demo runs, so the same numbers come from
Python by running those stages (``run_anchor``, ``run_screen``, ``run_trace``) yourself: anchor layer
search with the instruction method on paired prompts (with / without the format instruction) and a
steering check; screen-then-verify on heads, modules and neurons of the held-out prompts; then the
trace stage (activation-space scores, roles, supplier tracing of the carriers, sufficiency/necessity
curves); then the report. ``base``/``specialized``/``prompts``/``heldout`` replace the shipped pair
and prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from weightpatch.config import AnchorConfig, DemoConfig, ScreenConfig, TraceConfig
from weightpatch.pipeline.anchor import run_anchor
from weightpatch.pipeline.inputs import open_pair, open_run
from weightpatch.pipeline.screen import run_screen
from weightpatch.pipeline.trace import run_trace

logger = logging.getLogger("weightpatch")


@dataclass
class DemoConfigs:
    anchor: AnchorConfig
    screen: ScreenConfig
    trace: TraceConfig


@dataclass
class DemoResult:
    report: Path
    timings_seconds: dict[str, float]
    run_dir: Path


def demo_configs(cfg: DemoConfig | None = None) -> DemoConfigs:
    """The three stage configs of the demo (all in ``cfg.run_dir``)."""
    from weightpatch import demo as shipped

    cfg = cfg or DemoConfig()
    if cfg.base is None or cfg.specialized is None:
        paths = shipped.paths()
        base, specialized = cfg.base or str(paths.base), cfg.specialized or str(paths.specialized)
    else:
        base, specialized = cfg.base, cfg.specialized
    prompts = cfg.prompts or shipped.prompt_path("anchor")
    heldout = cfg.heldout or shipped.prompt_path("heldout")
    models = ("device", "device_map", "max_memory", "dtype", "trust_remote_code", "revision")
    shared = {k: getattr(cfg, k) for k in (*models, "batch_size")}
    shared |= {k: getattr(cfg, k) for k in ("seed", "run_dir", "progress", "debug")}
    shared |= {"base": base, "specialized": specialized}
    return DemoConfigs(
        anchor=AnchorConfig(
            prompts=prompts,
            heldout=heldout,
            max_prompts=cfg.anchor_prompts,
            method="instruction",
            alphas=cfg.alphas,
            steering_prompts=cfg.steering_prompts,
            max_new_tokens=cfg.max_new_tokens,
            **shared,
        ),
        screen=ScreenConfig(
            prompts=heldout, max_prompts=cfg.screen_prompts, method="verify", kinds=cfg.kinds, top_k=cfg.top_k, **shared
        ),
        trace=TraceConfig(prompts=heldout, max_prompts=cfg.screen_prompts, **shared),
    )


def run_demo(cfg: DemoConfig | None = None) -> DemoResult:
    """Anchor, screen, trace and report on the embedded pair (or the replacements in ``cfg``)."""
    from weightpatch.report import build_report

    start = time.perf_counter()
    cfg = cfg or DemoConfig()
    configs = demo_configs(cfg)
    pair = open_pair(configs.anchor)
    timings: dict[str, float] = {}
    for name, stage, stage_cfg in (
        ("anchor", run_anchor, configs.anchor),
        ("screen", run_screen, configs.screen),
        ("trace", run_trace, configs.trace),
    ):
        t = time.perf_counter()
        stage(stage_cfg, pair)
        timings[name] = time.perf_counter() - t
    t = time.perf_counter()
    report = build_report(cfg.run_path)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    with open_run(cfg, "demo", pair, [configs.anchor.base, configs.anchor.specialized]) as run:
        run.update_record(demo_timings_seconds={k: round(v, 1) for k, v in timings.items()})
    logger.info("demo timings: %s", timings)
    return DemoResult(report, timings, cfg.run_path)
