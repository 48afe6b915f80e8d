"""The sweep engine: one driver (driver.py), its planner (plan.py) and the resumable store (store.py)."""

from jinterp.engine.driver import Runner, base_run, sweep, sweep_grid

__all__ = ["Runner", "base_run", "sweep", "sweep_grid"]
