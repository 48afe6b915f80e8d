"""A second process's first sweep call against its warm calls (issue 13's compile-time target: within 1.3x).

Two fresh processes run the same resid_pre sweep on the same checkpoint, sharing a new, empty compile
cache directory: the first fills it (compiled programs, and the sweep programs kept traced, see
jinterp/engine/traced.py); the second should then neither compile nor trace its sweep program. Each
process times its first call and its warm calls (every call includes the base run and the planning).

    python benchmarks/patching_vs_transformerlens.py --shape llama-1b --batch 2 --seq 8 --model-dir /tmp/l1b --skip-tl
    python benchmarks/second_process.py /tmp/l1b --batch 2 --seq 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
import numpy as np
import jax
import jinterp
from jinterp import metrics, patching
from jinterp.engine import traced

m = jinterp.load(sys.argv[1])
B, S, runs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rs = np.random.RandomState(0)
V = m.cfg.d_vocab
clean, corrupted = rs.randint(0, V, (B, S)), rs.randint(0, V, (B, S))
metric = metrics.logit_diff(rs.randint(0, V, (B, 2)))
_, cache = m.run_with_cache(clean)
jax.block_until_ready(cache["blocks.0.hook_resid_pre"])
times = []
for _ in range(runs):
    t = time.perf_counter()
    patching.resid_pre(m, corrupted, cache, metric, progress=False)
    times.append(time.perf_counter() - t)
print(json.dumps(dict(first_s=round(times[0], 3), warm_s=round(min(times[1:]), 3), traced=dict(traced.stats))))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="calls per process (the first, then warm ones)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JINTERP_COMPILE_CACHE=cache)
        rows = []
        for name in ("first process", "second process"):
            out = subprocess.run([sys.executable, "-c", CHILD, a.model_dir, str(a.batch), str(a.seq), str(a.runs)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["first_over_warm"] = round(r["first_s"] / r["warm_s"], 2)
            rows.append(dict(process=name, **r))
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
