"""Peak resident memory of jinterp.load against the model's bytes, each dtype in a fresh process.

    python benchmarks/load_memory.py [DIR]     # DIR: an HF checkpoint (default: the llama-1b one the
                                               # patching benchmark saves with --model-dir /tmp/l1b)
"""

import subprocess
import sys

CHILD = r"""
import json, sys
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import jax, jax.numpy as jnp, numpy as np
import jinterp
jax.numpy.zeros(1).block_until_ready()
before = rss("VmRSS:")
m = jinterp.load(sys.argv[1], dtype=getattr(jnp, sys.argv[2]), tokenizer=False)
jax.block_until_ready(m.params)
nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(m.params))
print(json.dumps(dict(dtype=sys.argv[2], model_gb=round(nbytes / 1e9, 3), rss_before_gb=round(before / 1e9, 3),
                      peak_gb=round(rss("VmHWM:") / 1e9, 3), load_peak_over_model=round((rss("VmHWM:") - before) / nbytes, 3))))
"""


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/l1b"
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", CHILD, d, dtype], capture_output=True, text=True,
                             env={"JINTERP_COMPILE_CACHE": "0", "PATH": "/usr/bin:/bin"})
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
