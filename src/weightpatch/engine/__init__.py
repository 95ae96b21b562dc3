"""The sweep engine: one loop over variants for every exact-style method (:mod:`.sweep`), and the
objective it reads them with (:mod:`.objective`). Methods are small strategies over it
(:mod:`weightpatch.screening`, :mod:`weightpatch.activation`, :mod:`weightpatch.tracing`,
:mod:`weightpatch.validation`), registered by name in :mod:`weightpatch.methods`."""

from weightpatch.engine.objective import Objective, readout_variants, run_blocks
from weightpatch.engine.sweep import EffectStrategy, Strategy, sweep

__all__ = ["EffectStrategy", "Objective", "Strategy", "readout_variants", "run_blocks", "sweep"]
