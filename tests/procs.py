"""Tests that run scripts as separate processes (JAX's device count and its distributed runtime are
fixed when a process first uses JAX): a free local port, a clean environment, and a script run as
several processes joined by jinterp.distributed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**kw) -> dict:
    """This environment with one CPU device unless a script asks for more, and kw set."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(kw)
    return e


def python(script, *args, env, timeout=120) -> str:
    """Run `python -c script args` from the repository root; its stdout (its stderr's tail if it failed)."""
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def processes(script, *args, n=2, env, timeout=150) -> list[str]:
    """Run script as n processes at once, each given argv (coordinator port, process id, *args); their
    stdouts, once every one exited 0."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(port), str(i), *map(str, args)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (_, stderr)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i}: {stderr[-4000:]}"
    return [stdout for stdout, _ in logs]
