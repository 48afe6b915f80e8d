"""Several hosts: one process per host (or per group of devices), every process runs the same script.

    from jinterp import distributed
    distributed.initialize()            # first, before any JAX computation
    result = patching.resid_pre(model, corrupted, clean_cache, metric, mesh=distributed.device_mesh())
    with distributed.split_sweeps():    # every sweep in the block, e.g. a whole experiment
        experiments.run("ioi", "out/ioi")   # (experiments.run does this itself with several processes)
    if distributed.is_main():
        result.to_dataframe().to_csv("resid_pre.csv")

`initialize` takes the coordinator's address, the number of processes and this process's id as
arguments or from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
on TPU pods, Slurm and Open MPI jax detects them itself. A sweep given a mesh over every global
device splits its cells over all processes and returns the whole result in each of them; write
files from process 0 only (`is_main()`). `to_host` turns any jax array, including one whose
shards live on other hosts, into a numpy array; like every cross-process step it must run in all
processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import time

import jax
import numpy as np


_sweep_mesh = contextvars.ContextVar("jinterp_sweep_mesh", default=None)


class DistributedError(RuntimeError):
    """The processes could not be connected (bad arguments, unreachable coordinator, too late)."""


def _env_int(name):
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def _wait_for(address: str, timeout: float) -> None:
    """Block until a TCP connection to host:port succeeds, or raise DistributedError after `timeout` s.
    jax's own client aborts the whole process (not an exception) when the coordinator never answers."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(
        f"could not reach the coordinator at {address} within {timeout:g} s ({last}). Is process 0 running, "
        "with the same coordinator address, and is the port open between the hosts?"
    )


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_devices: int | None = None, timeout: float = 60) -> None:
    """Join this process to a multi-process JAX run. Call it first, before any JAX computation
    (also before jax.devices() or loading a model).

    coordinator_address: "host:port" of process 0, where it serves the coordinator (every process
    passes the same address); default $JAX_COORDINATOR_ADDRESS.
    num_processes, process_id: default $JAX_NUM_PROCESSES, $JAX_PROCESS_ID (process ids are
    0..num_processes-1). On TPU pods, Slurm and Open MPI, anything left None is detected by jax.
    local_devices: how many CPU devices this process exposes (CPU runs and tests; GPUs and TPUs
    use the process's own accelerators).
    timeout: seconds to wait for the coordinator and for every process to join; past it a
    DistributedError names the address, instead of a hang.

    On CPU, cross-process collectives use gloo.
    """
    from jax._src import xla_bridge  # jax internal: the only way to ask whether backends exist yet

    if jax.distributed.is_initialized():
        raise DistributedError("jinterp.distributed.initialize was already called in this process")
    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            "JAX has already initialised its devices in this process (some JAX computation, jax.devices() or a "
            "model load ran first); call jinterp.distributed.initialize() at the top of the script, right after "
            "the imports"
        )
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address and process_id not in (None, 0):
        _wait_for(coordinator_address, timeout)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=max(1, int(timeout)))
    except (ValueError, TypeError) as e:
        raise DistributedError(
            f"{e} (pass coordinator_address, num_processes and process_id, or set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        ) from e
    except Exception as e:  # the coordinator answered, but not every process joined in time
        raise DistributedError(
            f"joining the run at {coordinator_address} as process {process_id} of {num_processes} failed within "
            f"{timeout:g} s: {e}"
        ) from e


def is_main() -> bool:
    """Whether this is process 0, the one that writes results (True in a single-process run)."""
    return jax.process_index() == 0


def to_host(x):
    """A numpy copy of x (a jax array, or a pytree of them), even when its shards live on other
    processes. Collective: with several processes, every one must call it, in the same order."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def device_mesh(axis: str = "sweep"):
    """A one-axis mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), (axis,), axis_types=(jax.sharding.AxisType.Auto,))


@contextlib.contextmanager
def split_sweeps(mesh=None):
    """Within the block, every sweep (every patching recipe, path patching, ablation scan) splits its
    cells over `mesh` (default: device_mesh(), every device of every process), as if called with
    `mesh=`; a sweep given its own mesh, or on a model sharded with jinterp.load(..., mesh=), keeps
    that. With several processes, each runs its share of the cells and gets the whole result back,
    so a script written for one process (an experiment, say) splits its sweeps over every host
    unchanged. Like every cross-process step, the sweeps must run in every process, in the same order."""
    token = _sweep_mesh.set(device_mesh() if mesh is None else mesh)
    try:
        yield
    finally:
        _sweep_mesh.reset(token)


def sweep_mesh():
    """The mesh split_sweeps set for this block, or None."""
    return _sweep_mesh.get()
