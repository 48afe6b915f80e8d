"""Runtime at scale: the persistent compilation cache across processes, and one sweep run by two
processes (4 CPU devices each) joined with jinterp.distributed. Each process is a subprocess: JAX's
device count and the distributed runtime are fixed when a process first uses JAX."""

import json
import time

import jax
import numpy as np
import pytest

from jinterp import compile_cache, distributed
from tests import procs

# a tiny random GPT-2-style model and a resid_pre sweep on it; the same in every process
SETUP = """
import jax, numpy as np
import jinterp
from jinterp import arch, metrics, patching

def setup():
    cfg = jinterp.Config(family="gpt2", n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_mlp=64,
                         d_vocab=50, n_ctx=16)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rs.normal(0, 0.3, s.shape).astype(s.dtype), arch.param_shapes(cfg))
    model = jinterp.Model(cfg, params)
    clean = rs.randint(0, 50, (2, 8))
    corrupted = clean.copy()
    corrupted[:, 2] = rs.randint(0, 50, 2)
    metric = metrics.logit_diff(rs.randint(0, 50, (2, 2)))
    return model, clean, corrupted, metric

def resid_pre(mesh=None, **kw):
    model, clean, corrupted, metric = setup()
    _, cache = model.run_with_cache(clean)
    return patching.resid_pre(model, corrupted, cache, metric, progress=False, mesh=mesh, **kw).values
"""

CACHE_SCRIPT = SETUP + """
import json, sys
events = []
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
assert str(jinterp.compile_cache.path()) == sys.argv[1], jinterp.compile_cache.path()
from jinterp.engine import traced
values = resid_pre()
kept = dict(traced.stats)

def own_metric(logits):  # defined outside jinterp: its sweep is traced every time, never kept
    return logits[:, -1, 3].mean()

model, clean, corrupted, _ = setup()
_, cache = model.run_with_cache(clean)
own = patching.resid_pre(model, corrupted, cache, own_metric, progress=False).values
print(json.dumps(dict(values=values.tolist(), own=own.tolist(), hits=events.count("/jax/compilation_cache/cache_hits"),
                      misses=events.count("/jax/compilation_cache/cache_misses"), kept=kept,
                      uncached=traced.stats["uncached"] - kept["uncached"])))
"""

HOSTS_SCRIPT = """
import sys
from jinterp import distributed
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(f"127.0.0.1:{port}", 2, pid, local_devices=4, timeout=60)
""" + SETUP + """
from jax.sharding import NamedSharding, PartitionSpec
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
mesh = jax.make_mesh((8,), ("sweep",), axis_types=(jax.sharding.AxisType.Auto,))
values = resid_pre(mesh)
# to_host gathers an array whose shards live in both processes
rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("sweep")), np.arange(4) + 4 * pid)
np.testing.assert_array_equal(distributed.to_host(rows), np.arange(8))
if distributed.is_main():
    np.save(out, values)
# a checkpointed sweep: process 0 saves; the re-run resumes in both processes from process 0's copy
ckpt = out + ".ckpt"
np.testing.assert_array_equal(resid_pre(mesh, checkpoint_dir=ckpt, chunk_size=4), values)
stats = {}
np.testing.assert_array_equal(resid_pre(mesh, checkpoint_dir=ckpt, stats=stats), values)
assert stats["chunks"] == [], stats["chunks"]  # nothing left to run
# an experiment report: every process makes it, process 0 alone writes it
from experiments.report import Report
rep = Report(out + ".report", "two-hosts")
rep.number("pid", pid)
rep.arrays("raw", values=values)
rep.finish("two hosts")
print("host", pid, "ok")
"""

UNREACHABLE_SCRIPT = """
import sys, time
from jinterp import distributed
t = time.monotonic()
try:
    distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, 1, local_devices=1, timeout=3)
except distributed.DistributedError as e:
    print(f"{time.monotonic() - t:.1f}", e)
"""


def _reference():
    ns = {}
    exec(SETUP, ns)
    return ns["resid_pre"]()


def test_compile_cache_across_processes(tmp_path):
    """A second process running the same sweep loads every program from the cache: same numbers,
    only cache hits, no new entries; its sweep program is loaded traced (engine/traced.py), not traced
    again. A sweep whose metric is defined outside jinterp is never kept traced."""
    cache = tmp_path / "xla"
    env = procs.env(JINTERP_COMPILE_CACHE=str(cache))
    entries = lambda: sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))
    first = json.loads(procs.python(CACHE_SCRIPT, cache, env=env).splitlines()[-1])
    written = entries()
    assert first["misses"] > 0 and first["hits"] == 0 and len(written) == first["misses"]
    second = json.loads(procs.python(CACHE_SCRIPT, cache, env=env).splitlines()[-1])
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert entries() == written
    np.testing.assert_array_equal(second["values"], first["values"])
    np.testing.assert_array_equal(second["own"], first["own"])
    assert first["kept"]["saved"] >= 1 and first["kept"]["loaded"] == 0
    assert second["kept"]["loaded"] == first["kept"]["saved"] and second["kept"]["saved"] == 0
    assert first["uncached"] >= 1 and second["uncached"] == first["uncached"]
    assert len(list((cache / "jinterp-traced").iterdir())) == first["kept"]["saved"]


def test_traced_program_keys():
    """A kept program's key changes with its static arguments and argument shapes; static arguments
    that refer to code outside jinterp (a lambda, a function of another module) give no key."""
    from jinterp import metrics
    from jinterp.engine import traced

    m = metrics.logit_diff(np.array([[1, 2]]))
    args = (np.zeros((2, 3), np.float32), {"a": np.arange(4)})
    k = traced.key("f", args, dict(metric=m, n=1))
    assert k == traced.key("f", args, dict(metric=m, n=1))
    assert k != traced.key("f", args, dict(metric=m, n=2))
    assert k != traced.key("f", (np.zeros((2, 4), np.float32), args[1]), dict(metric=m, n=1))
    assert k != traced.key("g", args, dict(metric=m, n=1))
    assert traced.key("f", args, dict(metric=lambda x: x)) is None
    assert traced.key("f", args, dict(metric=procs.free_port)) is None  # tests.procs: not jinterp's


def test_compile_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.default_path() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.default_path() == tmp_path / "c"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_path() == tmp_path / "jinterp" / "xla"
    # a cache directory the user configured in jax is left alone
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert compile_cache.enable_default() is None
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_two_processes_run_one_sweep(tmp_path):
    """Two processes of 4 CPU devices each split one sweep over a mesh of all 8; process 0 alone
    writes the result, which equals the single-process one."""
    out = tmp_path / "resid_pre.npy"
    logs = procs.processes(HOSTS_SCRIPT, out, env=procs.env(JINTERP_COMPILE_CACHE="0"))
    for i, stdout in enumerate(logs):
        assert f"host {i} ok" in stdout, stdout
    np.testing.assert_allclose(np.load(out), _reference(), atol=1e-5)
    # one checkpoint (process 0's) and one report, process 0's; nothing else left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, out.name + ".ckpt", out.name + ".report"])
    assert json.loads((tmp_path / (out.name + ".report") / "report.json").read_text())["numbers"] == {"pid": 0}


def test_unreachable_coordinator_fails_within_the_timeout():
    port = procs.free_port()  # nothing listens there
    t = time.monotonic()
    out = procs.python(UNREACHABLE_SCRIPT, port, env=procs.env(JINTERP_COMPILE_CACHE="0"), timeout=60)
    assert time.monotonic() - t < 30
    waited, message = out.strip().splitlines()[-1].split(" ", 1)
    assert 3 <= float(waited) < 8
    assert f"127.0.0.1:{port}" in message and "3 s" in message


def test_initialize_after_jax_started_says_so():
    jax.devices()
    with pytest.raises(distributed.DistributedError, match="already initialised"):
        distributed.initialize("127.0.0.1:1", 2, 1)
    assert distributed.is_main()
    np.testing.assert_array_equal(distributed.to_host(jax.numpy.arange(3)), np.arange(3))


def test_map_count_guard(monkeypatch):
    """Near vm.max_map_count (simulated), the guard warns, names the limit and the fix, and clears JAX's
    caches; below it, nothing happens."""
    n = compile_cache._map_count()  # the real count, on Linux
    assert n is None or n > 0
    calls = []
    monkeypatch.setattr(jax, "clear_caches", lambda: calls.append(1))
    monkeypatch.setattr(compile_cache, "_max_maps", lambda: 1000)
    monkeypatch.setattr(compile_cache, "_map_count", lambda: 700)
    assert not compile_cache.guard_map_count() and not calls
    monkeypatch.setattr(compile_cache, "_map_count", lambda: 800)
    with pytest.warns(UserWarning, match=r"800 memory maps .*1000.*vm.max_map_count=262144"):
        assert compile_cache.guard_map_count()
    assert calls == [1]
