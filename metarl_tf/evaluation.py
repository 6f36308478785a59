"""Meta-test evaluation: adaptation curves on fresh tasks (the MAML paper's protocol).

For each of ``n`` fresh tasks: collect episodes with the current policy, record their mean return,
take one inner step on them, repeat. Index ``k`` of the curve is the return after ``k`` steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from metarl_tf.rollout import Sampler

EVAL_SEED_SALT = 7_919_000  # keeps evaluation tasks apart from the training seeds' streams


def confidence_interval95(per_task: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    n = len(per_task)
    return float(1.96 * np.std(per_task, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def adaptation_curve(bundle, tasks: list, episodes: int, steps: int, seed: int) -> dict[str, Any]:
    """Mean return per task after 0..``steps`` inner steps, each step on fresh episodes.

    Returns:
        ``{"per_task": [steps + 1][tasks], "mean_return": [...], "ci95": [...],
        "trajectories": observations of step 0 and the last step (for plots)}``.
    """
    sampler = Sampler(bundle.task_distribution, bundle.policy, episodes)
    adapter = bundle.make_adapter()
    params = bundle.policy.parameters
    rng = np.random.default_rng(seed)
    per_task, batches = [], []
    for k in range(steps + 1):
        batch = sampler.sample(params, tasks, int(rng.integers(2**31)))
        per_task.append(batch.episode_returns.mean(axis=1))
        batches.append(batch)
        if k < steps:
            params = adapter(params, batch, 1)[0]
    per_task_arr = np.array(per_task)
    return {
        "per_task": per_task_arr.tolist(),
        "mean_return": per_task_arr.mean(axis=1).tolist(),
        "ci95": [confidence_interval95(r) for r in per_task_arr],
        "batches": batches,
    }


def evaluate(
    bundle, n_tasks: int = 40, episodes: int = 20, steps: int = 3, seed: int = 0
) -> dict[str, Any]:
    """The ``evaluate`` command's JSON (without plots); see ``python -m metarl_tf evaluate -h``."""
    tasks = bundle.task_distribution.sample_tasks(n_tasks, seed=EVAL_SEED_SALT + seed)
    curve = adaptation_curve(bundle, tasks, episodes, steps, seed)
    return {
        "bundle": str(bundle.path),
        "tasks": n_tasks,
        "episodes": episodes,
        "seed": seed,
        "steps": steps,
        "methods": {"maml": {"mean_return": curve["mean_return"], "ci95": curve["ci95"]}},
        "_curve": curve,
        "_tasks": tasks,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per method, one column per number of inner steps."""
    steps = len(next(iter(result["methods"].values()))["mean_return"])
    header = f"{'method':<12}" + "".join(
        f"{f'{k} step' + ('s' if k != 1 else ''):>18}" for k in range(steps)
    )
    lines = [header, "-" * len(header)]
    for name, m in result["methods"].items():
        cells = "".join(
            f"{f'{r:.2f} ± {c:.2f}':>18}" for r, c in zip(m["mean_return"], m["ci95"], strict=True)
        )
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


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


def plot_curve(result: dict[str, Any], path) -> None:
    """Return vs. number of inner steps, one line per method, shaded 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, m in result["methods"].items():
        r, c = np.array(m["mean_return"]), np.array(m["ci95"])
        x = np.arange(len(r))
        ax.plot(x, r, marker="o", label=name)
        ax.fill_between(x, r - c, r + c, alpha=0.2)
    ax.set_xlabel("inner gradient steps")
    ax.set_ylabel("mean return")
    ax.set_xticks(range(len(r)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
