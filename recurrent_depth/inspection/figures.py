"""PNG figures of an inspection (matplotlib's Agg canvas, no pyplot state, nothing shown on screen).

- `plot_convergence`: per-token step length (latent-diff) over the iterations as a heat map, with exit steps.
- `plot_exit_steps`: the step at which each exit criterion would stop, per token.
- `plot_trajectories`: latent trajectories on pairs of principal components (PC1/PC2, PC3/PC4, PC5/PC6).
- `plot_logit_lens`: the top decoded token per position at selected steps, shaded by its probability.
- `plot_overview`: the README picture: the prompt coloured by steps needed, the heat map and two trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from recurrent_depth.inspection.convergence import COUNT_CRITERIA, Convergence
from recurrent_depth.inspection.lens import LensEntry
from recurrent_depth.inspection.trajectories import Trajectory

try:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
except ImportError as err:  # matplotlib is in the `eval` extra
    raise ImportError("PNG figures need matplotlib: pip install 'recurrent_depth[eval]'") from err

STEP_CMAP = "viridis_r"  # few steps: light; many steps: dark
_CONTROL = {chr(i): repr(chr(i))[1:-1] for i in [*range(32), 127]}  # control characters, shown escaped


def label(text: str, width: int = 12) -> str:
    """A token's text for an axis label: visible whitespace, no mathtext, at most `width` characters."""
    shown = "".join(_CONTROL.get(ch, ch) for ch in text).replace("$", r"\$")
    if len(shown) > width:
        shown = shown[: width - 1] + "…"
    return f"'{shown}'"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _step_ticks(num_steps: int) -> list[int]:
    ticks = [1] + [2**i for i in range(1, int(math.log2(num_steps)) + 1)]
    return sorted({t for t in ticks if t <= num_steps} | {num_steps})


def plot_convergence(conv: Convergence, texts: Sequence[str], path: str | Path, criterion: str = "latent-diff") -> Path:
    """Heat map of log10 of `criterion`'s value (tokens x steps), with each token's exit step marked."""
    if criterion in COUNT_CRITERIA:
        raise ValueError(f"{criterion!r} counts steps; a log heat map needs a distance-like criterion")
    values = conv.values[criterion].T.clamp_min(1e-12)  # (T, R)
    T, R = values.shape
    fig = Figure(figsize=(min(4 + 0.12 * R, 14), 1.2 + 0.28 * T))
    ax = fig.add_subplot()
    im = ax.imshow(values.log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest",
                   extent=(0.5, R + 0.5, T - 0.5, -0.5))
    steps, exited = conv.exit_step[criterion], conv.exited[criterion]
    for p in range(T):
        if exited[p]:
            ax.plot(int(steps[p]), p, marker="|", color="cyan", markersize=10, markeredgewidth=2)
    ax.set_yticks(range(T), [label(t) for t in texts], fontsize=8)
    ax.set_xticks(_step_ticks(R))
    ax.set_xlabel("recurrence step t")
    ax.set_title(f"{criterion} per token (log10); | = step where {criterion} < {conv.thresholds[criterion]:g}")
    fig.colorbar(im, ax=ax, label=f"log10 {criterion}")
    return _save(fig, path)


def plot_exit_steps(conv: Convergence, texts: Sequence[str], path: str | Path) -> Path:
    """Tokens x criteria table of exit steps, coloured by step; a token that never exits shows '>R'."""
    T, R = len(texts), conv.num_steps
    criteria = conv.criteria
    grid = torch.stack([conv.exit_step[c] for c in criteria], dim=1).float()  # (T, C)
    fig = Figure(figsize=(1.4 + 1.1 * len(criteria), 1.0 + 0.28 * T))
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1, vmax=max(R, 2))  # steps on a log scale: 2 vs 4 shows as much as 32 vs 64
    ax.imshow(grid.numpy(), aspect="auto", cmap=STEP_CMAP, norm=norm, interpolation="nearest")
    for p in range(T):
        for j, c in enumerate(criteria):
            text = str(int(grid[p, j])) if conv.exited[c][p] else f">{R}"
            shade = float(norm(float(grid[p, j])))
            ax.text(j, p, text, ha="center", va="center", fontsize=7, color="white" if shade > 0.5 else "black")
    ax.set_xticks(range(len(criteria)), [f"{c}\n{'>=' if c in COUNT_CRITERIA else '<'}{conv.thresholds[c]:g}"
                                         for c in criteria], fontsize=7)
    ax.set_yticks(range(T), [label(t) for t in texts], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("step at which each exit criterion would stop", pad=28)
    return _save(fig, path)


def _draw_trajectory(ax, coords: torch.Tensor, i: int, j: int, title: str) -> None:  # noqa: ANN001
    R1 = coords.shape[0]
    cmap = colormaps["plasma"]
    if coords.shape[1] <= j:
        ax.text(0.5, 0.5, "too few steps for this component", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    x, y = coords[:, i].numpy(), coords[:, j].numpy()
    ax.plot(x, y, color="0.75", linewidth=0.8, zorder=1)
    ax.scatter(x, y, c=range(R1), cmap=cmap, s=12, zorder=2)
    ax.scatter(x[:1], y[:1], marker="o", facecolors="none", edgecolors="black", s=50, zorder=3, label="s_0")
    ax.scatter(x[-1:], y[-1:], marker="*", color="black", s=60, zorder=3, label=f"s_{R1 - 1}")
    ax.set_xlabel(f"PC{i + 1}", fontsize=8)
    ax.set_ylabel(f"PC{j + 1}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def plot_trajectories(trajs: Sequence[Trajectory], texts: Sequence[str], path: str | Path) -> Path:
    """One row per chosen token: its state path on PC1/PC2, PC3/PC4 and PC5/PC6, coloured by step."""
    fig = Figure(figsize=(11, 3.2 * max(len(trajs), 1)))
    for row, traj in enumerate(trajs):
        for col in range(3):
            ax = fig.add_subplot(len(trajs), 3, 3 * row + col + 1)
            i, j = 2 * col, 2 * col + 1
            share = float(traj.explained[i:j + 1].sum()) if traj.explained.numel() > j else 0.0
            title = f"{label(texts[traj.position])} @{traj.position}: PC{i + 1}/PC{j + 1} ({share:.0%} var.)"
            _draw_trajectory(ax, traj.coords, i, j, title)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("latent trajectories over the iterations (PCA per token; colour: step, dark to bright)")
    fig.tight_layout()
    return _save(fig, path)


def lens_steps(num_steps: int, count: int = 12) -> list[int]:
    """About `count` steps spread geometrically over 1..num_steps (always with 1 and num_steps)."""
    if num_steps <= count:
        return list(range(1, num_steps + 1))
    raw = [round(num_steps ** (k / (count - 1))) for k in range(count)]
    return sorted(set(raw) | {1, num_steps})


def plot_logit_lens(lens: Sequence[Sequence[Sequence[LensEntry]]], texts: Sequence[str], path: str | Path) -> Path:
    """Tokens x selected steps: the most likely next token decoded from each intermediate state."""
    T, R = len(lens), len(lens[0])
    steps = lens_steps(R)
    probs = torch.tensor([[lens[p][s - 1][0].prob for s in steps] for p in range(T)])
    fig = Figure(figsize=(1.6 + 0.9 * len(steps), 1.0 + 0.3 * T))
    ax = fig.add_subplot()
    im = ax.imshow(probs.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for p in range(T):
        for j, s in enumerate(steps):
            entry = lens[p][s - 1][0]
            ax.text(j, p, label(entry.text, 8), ha="center", va="center", fontsize=6,
                    color="white" if entry.prob > 0.6 else "black")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
    ax.set_yticks(range(T), [label(t) for t in texts], fontsize=8)
    ax.set_xlabel("recurrence step t")
    ax.set_title("logit lens: top next token decoded from each intermediate state")
    fig.colorbar(im, ax=ax, label="probability")
    return _save(fig, path)


def _text_rows(texts: Sequence[str], per_line: int) -> list[list[tuple[int, str, float]]]:
    """Lay the tokens out in lines of about `per_line` character widths: rows of (position, label, x)."""
    rows: list[list[tuple[int, str, float]]] = [[]]
    x = 0.0
    for p, text in enumerate(texts):
        shown = label(text, 14)[1:-1] or " "
        width = len(shown) + 0.5
        if rows[-1] and x + width > per_line:
            rows.append([])
            x = 0.0
        rows[-1].append((p, shown, x))
        x += width
        if text.endswith("\n"):
            rows.append([])
            x = 0.0
    return [r for r in rows if r]


def plot_overview(conv: Convergence, texts: Sequence[str], trajs: Sequence[Trajectory], path: str | Path,
                  criterion: str = "kl") -> Path:
    """The prompt coloured by the steps `criterion` needs, the latent-diff heat map, and up to two trajectories."""
    R, T = conv.num_steps, len(texts)
    per_line = 135  # character widths per line of the coloured text (10 pt monospace on a 12 in figure)
    rows = _text_rows(texts, per_line)
    text_h, body_h = 0.6 + 0.3 * len(rows), 3.2 + 0.12 * min(T, 60)
    fig = Figure(figsize=(12, text_h + body_h), layout="constrained")
    top, body = fig.subfigures(2, 1, height_ratios=[text_h, body_h])
    ax_text = top.add_axes((0.01, 0.0, 0.98, 1.0 - 0.35 / text_h))
    ax_text.set_xlim(0, per_line)
    ax_text.set_ylim(len(rows) - 0.5, -0.5)
    cmap = colormaps[STEP_CMAP]
    steps, exited = conv.exit_step[criterion], conv.exited[criterion]
    lo, hi = int(steps.min()), int(steps.max())  # the colour scale spans the steps this prompt needed
    for r, row in enumerate(rows):
        for p, shown, x in row:
            shade = (int(steps[p]) - lo) / max(hi - lo, 1)
            ax_text.text(x, r, shown, fontsize=10, family="monospace", va="center",
                         color="white" if shade > 0.5 else "black",
                         bbox=dict(boxstyle="square,pad=0.15", facecolor=cmap(shade),
                                   edgecolor="none" if exited[p] else "red"))
    ax_text.set_axis_off()
    top.suptitle(f"steps needed per token ({criterion} < {conv.thresholds[criterion]:g}): lightest = {lo}, "
                 f"darkest = {hi}; red edge = not converged in {R}", fontsize=10)
    grid = body.add_gridspec(2, 2, width_ratios=[1.6, 1])
    ax_heat = body.add_subplot(grid[:, 0])
    values = conv.relative.T.clamp_min(1e-12).log10()
    im = ax_heat.imshow(values.numpy(), aspect="auto", cmap="magma", interpolation="nearest",
                        extent=(0.5, R + 0.5, T - 0.5, -0.5))
    ax_heat.set_yticks(range(T), [label(t) for t in texts], fontsize=6 if T > 24 else 8)
    ax_heat.set_xlabel("recurrence step t")
    ax_heat.set_title("log10 ‖s_t − s_(t−1)‖ / ‖s_t‖ per token", fontsize=10)
    body.colorbar(im, ax=ax_heat, fraction=0.04, pad=0.01)
    for k, traj in enumerate(trajs[:2]):
        ax = body.add_subplot(grid[k, 1])
        _draw_trajectory(ax, traj.coords, 0, 1, f"{label(texts[traj.position])} @{traj.position}: PC1/PC2")
    return _save(fig, path)
