"""The persistent compilation cache: compiled XLA programs are kept on disk, so a later process
that runs the same programs (same model config, shapes, sweep and jax version) loads them instead
of compiling them again. On by default from `import jinterp`:

- $JINTERP_COMPILE_CACHE: the directory; "0" or "off" turns the cache off;
- otherwise $XDG_CACHE_HOME/jinterp/xla, or ~/.cache/jinterp/xla;
- a cache directory already configured in jax (jax_compilation_cache_dir or
  $JAX_COMPILATION_CACHE_DIR), or jax_enable_compilation_cache=False, is left as it is.

Every program is cached, however fast it compiled (jax's default keeps only those over 1 s, which
leaves out most CPU programs); the directory is capped at 4 GiB, least recently used entries
first. Tracing and lowering (Python) remain per process, except for sweep programs that
jinterp.engine.traced keeps traced. In a multi-process run only
process 0 writes entries (jax's rule); the others read them when the directory is shared.

A program loaded from the cache still goes through jax's compile step: the
"/jax/core/compile/backend_compile_duration" monitoring event (which experiments/report.py's
count_compiles counts) fires for it too, so compile counts do not depend on the cache; a hit also
records "/jax/compilation_cache/cache_hits", a miss "/jax/compilation_cache/cache_misses".
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

ENV = "JINTERP_COMPILE_CACHE"
MAX_SIZE = 4 << 30


def default_path() -> Path | None:
    """Where the cache goes by default ($JINTERP_COMPILE_CACHE, else the user's cache directory);
    None when $JINTERP_COMPILE_CACHE turns it off."""
    v = os.environ.get(ENV, "").strip()
    if v.lower() in ("0", "off", "false", "no"):
        return None
    return Path(v).expanduser() if v else _user_dir()


def enable(path=None, *, max_size: int | None = MAX_SIZE) -> Path:
    """Cache every compiled program under `path` (default: default_path(), or the user's cache
    directory when that is off). max_size: bytes before the least recently used entries are
    evicted (None: no limit). Returns the directory."""
    path = Path(path).expanduser() if path is not None else (default_path() or _user_dir())
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if max_size is not None and _have_filelock():  # jax needs filelock to evict
        jax.config.update("jax_compilation_cache_max_size", int(max_size))
    else:
        jax.config.update("jax_compilation_cache_max_size", -1)
    _jax_cache.reset_cache()  # jax opens its cache once; let the next compile open this one
    return path


def disable() -> None:
    """Stop reading and writing the persistent cache in this process (programs compiled so far stay
    in memory)."""
    jax.config.update("jax_enable_compilation_cache", False)
    _jax_cache.reset_cache()


def path() -> Path | None:
    """The directory in use, or None when the persistent cache is off."""
    d = jax.config.jax_compilation_cache_dir
    return Path(d) if d and jax.config.jax_enable_compilation_cache else None


def enable_default() -> Path | None:
    """What `import jinterp` does: enable(default_path()), unless the cache is turned off or the
    user already configured jax's own. Never raises: an unwritable directory only warns."""
    if jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return None
    target = default_path()
    if target is None:
        return None
    try:
        return enable(target)
    except OSError as e:
        warnings.warn(f"jinterp: no persistent compilation cache ({target}: {e}); set {ENV} to a writable "
                      f"directory, or {ENV}=0 to silence this", stacklevel=2)
        return None


def _user_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jinterp" / "xla"


def _have_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def _map_count() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _max_maps() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def guard_map_count(share: float = 0.75) -> bool:
    """Clear JAX's in-memory caches (with a warning) when this process's memory maps near the kernel's
    limit. Every XLA:CPU executable holds its code in separate maps, and a process that keeps a few
    hundred large programs reaches vm.max_map_count; LLVM then aborts the process at the next compile
    ("Unable to allocate section memory"). Returns whether it cleared. The sweep driver calls it."""
    n, limit = _map_count(), _max_maps()
    if n is None or not limit or n < share * limit:
        return False
    warnings.warn(f"jinterp: this process holds {n} memory maps of the kernel's {limit} (vm.max_map_count), mostly "
                  "compiled programs; clearing JAX's caches so the next compile does not abort. Programs will "
                  "recompile (or load from the persistent cache). To keep them, raise the limit: "
                  "sysctl vm.max_map_count=262144", stacklevel=3)
    jax.clear_caches()
    return True
