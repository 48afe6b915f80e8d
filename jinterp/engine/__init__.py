"""The sweep engine: one driver (driver.py), its planner (plan.py) and the resumable store (store.py)."""

from jinterp.engine.driver import PatchingError, Runner, base_run, sweep, sweep_grid
from jinterp.engine.nan import SweepError

__all__ = ["PatchingError", "Runner", "SweepError", "base_run", "sweep", "sweep_grid"]
