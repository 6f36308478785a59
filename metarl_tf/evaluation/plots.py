"""Figures: adaptation curves and trajectories of an evaluation, training curves of runs
(matplotlib, imported when a figure is drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metarl_tf.evaluation.statistics import moving_average
from metarl_tf.training.trainer import read_metrics_rows


def plot_trajectories(result: dict[str, Any], path, max_tasks: int = 4) -> None:
    """Nav2D: trajectories before (0 steps) and after adaptation, goal marked (MAML Fig. 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, tasks = result["_curve"], result["_tasks"]
    before, after = curve["batches"][0], curve["batches"][-1]
    n = min(max_tasks, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        for batch, color, label in (
            (before, "tab:gray", "0 steps"),
            (after, "tab:red", f"{len(curve['batches']) - 1} steps"),
        ):
            for e in range(min(3, batch.observations.shape[1])):
                t = int(batch.mask[i, e].sum())
                xy = batch.observations[i, e, :t, :2]
                ax.plot(
                    xy[:, 0],
                    xy[:, 1],
                    color=color,
                    lw=1,
                    alpha=0.8,
                    label=label if e == 0 else None,
                )
        gx, gy = tasks[i]["goal"]
        ax.plot([gx], [gy], marker="*", ms=14, color="gold", mec="k", label="goal")
        ax.plot([0], [0], marker="o", color="k", ms=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"task {i}")
        if i == 0:
            ax.legend(loc="lower left", fontsize=7)
    fig.suptitle("Nav2D trajectories before and after adaptation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def new_axes(figsize=(6.4, 3.8)):
    """A figure and axes on matplotlib's file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_axes(fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size=None) -> None:
    """Labels, legend and light grid; writes the PNG and closes the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(result: dict[str, Any], path) -> None:
    """Return vs. number of inner steps, one line per method, shaded 95% CI."""
    fig, ax = new_axes((5.2, 3.8))
    for name, m in result["methods"].items():
        r, c = np.array(m["mean_return"]), np.array(m["ci95"])
        x = np.arange(len(r))
        size = m.get("step_size")
        label = f"{name} (α = {size:g})" if isinstance(size, float) else name
        ax.plot(x, r, marker="o", label=label)
        ax.fill_between(x, r - c, r + c, alpha=0.2)
    seeds = result.get("seeds", [result.get("seed")])
    ax.set_xticks(range(len(r)))
    title = (f"{result.get('tasks')} test tasks x {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, "
             "mean ± 95% CI")  # fmt: skip
    save_axes(fig, ax, path, "inner gradient steps", "mean return", title)


def plot_method_trajectories(result: dict[str, Any], path, max_tasks: int = 3) -> None:
    """Nav2D: one row per method, one column per task; trajectories before (gray) and after the
    last inner step (red), goal marked. Uses the first seed's episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, tasks = result["_curves"], result["_tasks"]
    n = min(max_tasks, len(tasks))
    fig, axes = plt.subplots(len(curves), n, figsize=(2.6 * n, 2.6 * len(curves)), squeeze=False)
    for row, (name, curve) in enumerate(curves.items()):
        before, after = curve["batches"][0], curve["batches"][-1]
        for i in range(n):
            ax = axes[row, i]
            for batch, color in ((before, "tab:gray"), (after, "tab:red")):
                for e in range(min(3, batch.observations.shape[1])):
                    t = int(batch.mask[i, e].sum())
                    xy = batch.observations[i, e, :t, :2]
                    ax.plot(xy[:, 0], xy[:, 1], color=color, lw=1, alpha=0.8)
            gx, gy = tasks[i]["goal"]
            ax.plot([gx], [gy], marker="*", ms=12, color="gold", mec="k")
            ax.plot([0], [0], marker="o", color="k", ms=3)
            ax.set_xlim(-0.6, 0.6)
            ax.set_ylim(-0.6, 0.6)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(f"task {i}", fontsize=9)
    steps = len(next(iter(curves.values()))["batches"]) - 1
    fig.suptitle(
        f"Nav2D: before (gray) and after {steps} inner step{'s' if steps != 1 else ''} (red)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl`` (a file, or a run/bundle directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    rows = read_metrics_rows(path)
    for number, row in enumerate(rows, 1):
        if "iteration" not in row or "returns/post_adaptation" not in row:
            raise ValueError(f"{path}: row {number}: no 'iteration'/'returns/post_adaptation'")
    if not rows:
        raise ValueError(f"{path} holds no iterations")
    return rows


def plot_training(runs: dict[str, list[dict]], path, window: int = 10) -> None:
    """Training return per meta-iteration, before (dashed) and after (solid) adaptation: the raw
    values faint, their trailing ``window``-iteration mean bold; one colour per run."""
    fig, ax = new_axes()
    for k, (name, rows) in enumerate(runs.items()):
        colour = f"C{k}"
        it = np.array([r["iteration"] for r in rows])
        for key, style, label in (
            ("returns/pre_adaptation", "--", "before adaptation"),
            ("returns/post_adaptation", "-", "after adaptation"),
        ):
            values = np.array([r[key] for r in rows])
            ax.plot(it, values, style, color=colour, alpha=0.2, linewidth=0.8)
            ax.plot(it, moving_average(values, window), style, color=colour,
                    label=f"{name}: {label}")  # fmt: skip
    title = f"training batches; bold: {window}-iteration moving average"
    save_axes(fig, ax, path, "meta-iteration", "mean training return", title, legend_size=8)
