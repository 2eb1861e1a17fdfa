"""Plots of sweep records (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch).

    plot_depth_sweep({"recurrent": recs, "baseline": recs2}, "out/depth.png", metric="accuracy")
    plot_exit_sweep(exit_records, "out/exit.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Records = Sequence[dict[str, Any]]


def _series(data: Records | dict[str, Records]) -> dict[str, Records]:
    return data if isinstance(data, dict) else {"": data}


def plot_series(data: Records | dict[str, Records], x: str, y: str, path: str | Path, title: str = "",
                xlabel: str | None = None, ylabel: str | None = None, logx: bool = False,
                annotate: str | None = None) -> Path:
    """Line plot of y against x for one list of records or several labelled lists; returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, recs in _series(data).items():
        pts = sorted(((r[x], r[y], r.get(annotate, "") if annotate else "") for r in recs
                      if r.get(x) is not None and r.get(y) is not None), key=lambda p: (p[0], p[1]))
        if not pts:
            raise ValueError(f"no records with both {x!r} and {y!r} to plot for series {label!r}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
        for px, py, note in pts:
            if annotate:
                text = "fixed" if note is None else f"{note:g}" if isinstance(note, float) else str(note)
                ax.annotate(text, (px, py), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(_series(data)):
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_depth_sweep(data: Records | dict[str, Records], path: str | Path, metric: str = "accuracy",
                     title: str = "") -> Path:
    """Metric against test-time recurrence depth r (log2 axis when every r is positive)."""
    logx = all(r["num_steps"] > 0 for recs in _series(data).values() for r in recs)
    return plot_series(data, "num_steps", metric, path, title or f"{metric} against test-time depth",
                       xlabel="recurrence steps r", ylabel=metric, logx=logx)


def plot_exit_sweep(data: Records | dict[str, Records], path: str | Path, metric: str = "accuracy",
                    title: str = "") -> Path:
    """Metric against mean recurrence steps per token, each point labelled with its exit threshold."""
    return plot_series(data, "mean_steps", metric, path, title or f"{metric} against mean steps (adaptive exit)",
                       xlabel="mean recurrence steps per token", ylabel=metric, annotate="threshold")


def plot_depth_by_level(records: Records, path: str | Path, title: str = "") -> Path:
    """Accuracy against depth, one line per difficulty level (records from a depth sweep with `accuracy_by_level`)."""
    levels = sorted({int(k) for r in records for k in r.get("accuracy_by_level", {})})
    if not levels:
        raise ValueError("the records hold no accuracy_by_level (rows need an int `level`)")
    series = {}
    for lvl in levels:
        series[f"level {lvl}"] = [{"num_steps": r["num_steps"], "accuracy": by.get(lvl, by.get(str(lvl)))}
                                  for r in records for by in [r.get("accuracy_by_level", {})]]
    return plot_depth_sweep(series, path, "accuracy", title or "accuracy against depth, by difficulty level")


def plot_level_heatmap(records: Records, path: str | Path, title: str = "") -> Path:
    """Accuracy as a heat map, difficulty level (rows) against test-time depth (columns), from depth-sweep records
    with `accuracy_by_level`: where harder levels need more iterations, the lit region widens with depth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = sorted({int(k) for r in records for k in r.get("accuracy_by_level", {})})
    if not levels:
        raise ValueError("the records hold no accuracy_by_level (rows need an int `level`)")
    depths = [r["num_steps"] for r in records]
    grid = [[float("nan")] * len(depths) for _ in levels]
    for j, r in enumerate(records):
        for k, v in r.get("accuracy_by_level", {}).items():
            grid[levels.index(int(k))][j] = v
    fig = Figure(figsize=(1.2 + 0.45 * len(depths), 1.2 + 0.3 * len(levels)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(levels)), [str(lvl) for lvl in levels])
    ax.set_xlabel("test-time depth r")
    ax.set_ylabel("difficulty level")
    ax.set_title(title or "accuracy by level and depth", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
