"""One report writer for every experiment: numbers, claims, tables, figures and raw arrays.

    report = Report(out_dir, "ioi", config={...}, overwrite=False)
    report.section("Logit difference", "text ...")
    report.number("logit_diff", 3.1)
    report.claim("mean logit difference", paper=3.56, measured=3.1, holds=True, note="...")
    report.table("heads", labelled_or_dataframe)          # CSV + a markdown table inline
    report.figure("path_patching", labelled)              # PNG heatmap inline (or a matplotlib figure)
    report.arrays("raw", logit_diff=array, ...)           # .npz
    report.finish()                                       # report.md + report.json, then publish

Everything is written into a hidden staging directory next to `out_dir` and moved into place by
`finish()`, so an interrupted run leaves no half-written report, and an existing output
directory is only replaced with `overwrite=True`. In a multi-process run (`jinterp.distributed`)
every process runs the experiment, but only process 0 writes: the others stage into a private
temporary directory that `finish()` removes.

`count_compiles()` is a context manager counting the XLA programs compiled inside it (through
`jax.monitoring`), so a report can say how many programs a run needed.
"""

from __future__ import annotations

import collections
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


class OutputExists(FileExistsError):
    pass


# jax emits this duration event once per XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT,
# around compiler.compile_or_get_cached, so a persistent-cache hit is counted too).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class count_compiles:
    """Count the XLA programs compiled while the block runs (jit, eager ops and sweeps alike).

        with count_compiles() as c:
            model(tokens)
        c.count, c.seconds, c.by_function    # 1, 0.8, Counter({'forward': 1})

    Programs already in jax's in-memory cache are not compiled again, so a second identical run
    in the same process counts fewer. Thread-unsafe only in the sense that compilations from
    other threads during the block are counted too.
    """

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.by_function: collections.Counter = collections.Counter()
        self.wall_seconds = 0.0

    def _listener(self, event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += float(duration)
            self.by_function[str(kw.get("fun_name", "?"))] += 1

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        self.wall_seconds = time.perf_counter() - self._t0
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False

    def summary(self, top: int = 8) -> dict:
        """JSON-ready: {"compiled_programs", "compile_seconds", "compiled_functions" (the most frequent)}."""
        return {"compiled_programs": self.count, "compile_seconds": round(self.seconds, 2),
                "compiled_functions": dict(self.by_function.most_common(top))}


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


class Report:
    def __init__(self, out_dir, name: str, *, config: dict | None = None, overwrite: bool = False):
        self.out = Path(out_dir)
        exists = self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not overwrite
        if _process_count() > 1:
            # process 0 (the writer) decides for all; this also keeps any process from finishing (and moving
            # the report into place) before every process has checked
            from jax.experimental import multihost_utils

            exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
        if exists:
            raise OutputExists(f"{self.out} already exists and is not empty; pass --overwrite to replace it, or choose another --out")
        self.overwrite = overwrite
        self.name = name
        self.config = dict(config or {})
        self.main = _process_index() == 0
        if self.main:
            self.stage = self.out.parent / f".{self.out.name}.partial"
            if self.stage.exists():
                shutil.rmtree(self.stage)
            self.stage.mkdir(parents=True)
        else:  # not process 0: the same calls, into a directory nobody reads
            self.stage = Path(tempfile.mkdtemp(prefix=f"jinterp-{name}-process-"))
        self.numbers: dict = {}
        self.claims: list[dict] = []
        self.files: list[str] = []
        self.meta: dict = {}  # run facts that vary between identical runs (wall time, ...)
        self._md: list[str] = []

    # ------------------------------------------------------------------ content
    def section(self, title: str, text: str = "") -> None:
        self._md += [f"## {title}", ""] + ([text, ""] if text else [])

    def text(self, text: str) -> None:
        self._md += [text, ""]

    def number(self, name: str, value) -> None:
        """A measured number (into report.json's "numbers")."""
        self.numbers[name] = _jsonable(value)

    def claim(self, name: str, paper, measured, holds: bool, note: str = "") -> None:
        """The paper's number beside ours. `holds` is decided by the caller's stated criterion, never tuned."""
        self.claims.append(dict(name=name, paper=_jsonable(paper), measured=_jsonable(measured), holds=bool(holds), note=note))

    def table(self, name: str, data, caption: str = "", max_rows: int = 20) -> Path:
        """A table (DataFrame, Labelled, or list of dicts) -> name.csv, shown inline (first rows)."""
        import pandas as pd

        df = data.to_dataframe() if hasattr(data, "to_dataframe") else pd.DataFrame(data)
        path = self.stage / f"{name}.csv"
        df.to_csv(path, index=False)
        self.files.append(path.name)
        shown = df.head(max_rows)
        cols = list(shown.columns)
        lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in shown.itertuples(index=False)]
        more = f"\n\n({len(df)} rows; all in [{path.name}]({path.name}))" if len(df) > max_rows else f"\n\n[{path.name}]({path.name})"
        self._md += ([caption, ""] if caption else []) + lines + ["", more.strip(), ""]
        return path

    def figure(self, name: str, what, caption: str = "", **kw) -> Path:
        """A PNG: a Labelled (heatmap), a list of heatmap panels (dicts for jinterp.plots.save_heatmaps;
        keyword arguments go to it), a matplotlib Figure, or a path to a PNG already written."""
        path = self.stage / f"{name}.png"
        if isinstance(what, (list, tuple)):
            from jinterp import plots

            plots.save_heatmaps(path, list(what), **kw)
        elif hasattr(what, "heatmap"):
            what.heatmap(path, **kw)
        elif hasattr(what, "savefig"):
            what.savefig(path, dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(what)
        else:
            shutil.copy(what, path)
        self.files.append(path.name)
        self._md += [f"![{caption or name}]({path.name})", ""] + ([f"*{caption}*", ""] if caption else [])
        return path

    def arrays(self, name: str, **arrays) -> Path:
        path = self.stage / f"{name}.npz"
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
        self.files.append(path.name)
        return path

    # ------------------------------------------------------------------ output
    def claims_markdown(self) -> list[str]:
        return claims_markdown(self.claims)

    def finish(self, title: str, summary: str = "") -> Path:
        """Write report.md and report.json into the staging directory, then move it to out_dir."""
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        md = [f"# {title}", "", summary, "", f"Run {when}. Configuration:", "", "```json",
              json.dumps(_jsonable(self.config), indent=1), "```", ""]
        if self.claims:
            md += ["## The paper's numbers and ours", ""] + self.claims_markdown() + [""]
        md += self._md
        (self.stage / "report.md").write_text("\n".join(md))
        doc = dict(experiment=self.name, config=_jsonable(self.config), numbers=self.numbers, claims=self.claims,
                   files=sorted(self.files), run=_jsonable(dict(self.meta, finished=when)))
        (self.stage / "report.json").write_text(json.dumps(doc, indent=1))
        if not self.main:
            self.abandon()
            return self.out
        old = None
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
                self.abandon()  # something appeared at out_dir while we ran
                raise OutputExists(f"{self.out} appeared while the experiment ran; nothing was replaced")
            old = self.out.parent / f".{self.out.name}.old"
            _remove(old)
            self.out.rename(old)  # the old report stays whole until the new one is in place
        self.stage.rename(self.out)
        if old is not None:
            _remove(old)
        return self.out

    def abandon(self) -> None:
        """Remove the staging directory (an interrupted or failed run)."""
        shutil.rmtree(self.stage, ignore_errors=True)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _process_count() -> int:
    import jax

    return jax.process_count()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def claims_markdown(claims: list[dict]) -> list[str]:
    """The claims as markdown table lines: claim, the paper's value, ours, whether it holds, the criterion."""
    lines = ["| claim | paper | ours | holds | note |", "|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['name']} | {_fmt(c['paper'])} | {_fmt(c['measured'])} | {_fmt(c['holds'])} | {c['note']} |")
    return lines
