"""Meta-test evaluation: adaptation curves on fresh tasks (the MAML paper's protocol).

For each of ``n`` fresh tasks: collect episodes with the current policy, record their mean return,
take one inner step on them, repeat. Index ``k`` of the curve is the return after ``k`` steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metarl_tf.rollout import Sampler

EVAL_SEED_SALT = 7_919_000  # keeps evaluation tasks apart from the training seeds' streams


def confidence_interval95(per_task: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    n = len(per_task)
    return float(1.96 * np.std(per_task, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


# t_{0.975, df} for df = 1..30 (the across-seed CI over a handful of seeds); 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_confidence_interval95(values: np.ndarray) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean of a few values."""
    n = len(values)
    if n < 2:
        return float("nan")
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return float(t * np.std(values, ddof=1) / math.sqrt(n))


def adaptation_curve(bundle, tasks: list, episodes: int, steps: int, seed: int) -> dict[str, Any]:
    """Mean return per task after 0..``steps`` inner steps, each step on fresh episodes.

    Returns:
        ``{"per_task": [steps + 1][tasks], "mean_return": [...], "ci95": [...],
        "batches": the episodes of every step (for plots)}``.
    """
    return method_curve(
        bundle.task_distribution, bundle.policy, bundle.policy.parameters, bundle.make_adapter(),
        tasks, episodes, steps, seed,
    )  # fmt: skip


def method_curve(
    dist, policy, params, adapter, tasks: list, episodes: int, steps: int, seed: int, backend=None
) -> dict[str, Any]:
    """:func:`adaptation_curve` for any initial weights ``params`` and inner step ``adapter``.

    The noise seeds of the ``steps + 1`` samplings come from ``seed`` alone, so methods evaluated
    with the same seed see the same tasks and the same action noise (common random numbers).
    ``backend``: where the rollouts run (:func:`metarl_tf.rollout.make_backend`; default local).
    """
    sampler = Sampler(dist, policy, episodes, backend)
    rng = np.random.default_rng(seed)
    per_task, batches = [], []
    for k in range(steps + 1):
        batch = sampler.sample(params, tasks, int(rng.integers(2**31)))
        per_task.append(batch.episode_returns.mean(axis=1))
        batches.append(batch)
        if k < steps:
            params = adapter(params, batch, 1, first_step=k)[0]
    per_task_arr = np.array(per_task)
    return {
        "per_task": per_task_arr.tolist(),
        "mean_return": per_task_arr.mean(axis=1).tolist(),
        "ci95": [confidence_interval95(r) for r in per_task_arr],
        "batches": batches,
    }


def _step_size_label(bundle) -> float | str:
    if bundle.learned_step_sizes:
        return "learned (Meta-SGD, per parameter)"
    return float(bundle.step_sizes)


def aggregate_seeds(per_seed: list[np.ndarray]) -> dict[str, list[float]]:
    """Combines one method's per-task returns of several seeds (``[steps + 1, tasks]`` each).

    Every seed draws its own test tasks, so the tasks of all seeds are one sample of
    ``seeds × tasks`` tasks: ``mean_return`` is their mean (= the mean of the per-seed means when
    every seed has as many tasks) and ``ci95`` its normal-approximation CI over all of them.
    ``ci95_across_seeds`` is the Student-t CI of the per-seed means (it also covers what a seed
    changes besides the tasks, e.g. the random baseline's initialization; wide for few seeds).
    """
    pooled = np.concatenate([np.asarray(r, np.float64) for r in per_seed], axis=1)
    means = np.array([np.mean(r, axis=1) for r in per_seed])  # [seeds, steps + 1]
    out = {
        "mean_return": pooled.mean(axis=1).tolist(),
        "ci95": [confidence_interval95(r) for r in pooled],
    }
    if len(per_seed) > 1:
        out["ci95_across_seeds"] = [t_confidence_interval95(m) for m in means.T]
    return out


def evaluate(
    bundle,
    n_tasks: int = 40,
    episodes: int = 20,
    steps: int = 3,
    seed: int = 0,
    *,
    seeds: list[int] | None = None,
    baselines: list[str] | tuple[str, ...] = (),
    pretrained=None,
    oracle=None,
    baseline_step_size: float | None = None,
    backend=None,
) -> dict[str, Any]:
    """The ``evaluate`` command's JSON (without plots); see ``python -m metarl_tf evaluate -h``.

    Every method (``maml`` = the bundle, plus ``baselines``, see :mod:`metarl_tf.baselines`) runs
    on the same test tasks with the same noise for each seed in ``seeds`` (default ``[seed]``);
    seed ``s`` draws its tasks with ``EVAL_SEED_SALT + s``. ``methods`` holds the aggregate over
    seeds (:func:`aggregate_seeds`), ``per_seed`` the per-seed results with every task's return,
    ``paired_differences`` ``maml − baseline`` per task (same tasks and noise), mean and CI.
    ``backend`` runs every rollout (:func:`metarl_tf.rollout.make_backend`; default local).
    """
    from metarl_tf.baselines import RANDOM_INIT_SALT, build_methods, random_parameters

    seeds = list(seeds) if seeds else [seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (each draws its own test tasks), got {seeds}")
    methods = build_methods(
        bundle, list(baselines), pretrained=pretrained, oracle=oracle,
        step_size=baseline_step_size, validation_tasks=n_tasks, episodes=episodes, steps=steps,
        backend=backend,
    )  # fmt: skip
    per_task: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    per_seed: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for s in seeds:
        tasks = bundle.task_distribution.sample_tasks(n_tasks, seed=EVAL_SEED_SALT + s)
        per_seed[str(s)] = {}
        for m in methods:
            params = (
                random_parameters(m.policy, RANDOM_INIT_SALT + s)
                if m.name == "random"
                else m.params
            )
            curve = method_curve(
                m.task_distribution, m.policy, params, m.adapter, tasks, episodes, steps, s, backend
            )
            per_task[m.name].append(np.array(curve["per_task"]))
            per_seed[str(s)][m.name] = {k: curve[k] for k in ("mean_return", "ci95", "per_task")}
            if s == seeds[0]:
                first[m.name] = curve
        if s == seeds[0]:
            first_tasks = tasks
    summary = {}
    for m in methods:
        summary[m.name] = {
            **aggregate_seeds(per_task[m.name]),
            "step_size": _step_size_label(bundle) if m.step_size is None else m.step_size,
            "source": m.source,
        }
        if m.selection:
            summary[m.name]["step_size_selection"] = m.selection
    maml = np.concatenate(per_task["maml"], axis=1)
    paired = {}
    for m in methods[1:]:
        diff = maml - np.concatenate(per_task[m.name], axis=1)
        paired[f"maml - {m.name}"] = {
            "mean": diff.mean(axis=1).tolist(),
            "ci95": [confidence_interval95(d) for d in diff],
        }
    result = {
        "bundle": str(bundle.path),
        "tasks": n_tasks,
        "episodes": episodes,
        "seed": seeds[0],
        "seeds": seeds,
        "steps": steps,
        "methods": summary,
        "per_seed": per_seed,
        "_curve": first["maml"],
        "_curves": first,
        "_tasks": first_tasks,
    }
    if paired:
        result["paired_differences"] = paired
    return result


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


def format_paired(result: dict[str, Any]) -> str:
    """``maml − baseline`` per task (same tasks and noise): mean ± 95% CI per number of steps."""
    paired = result.get("paired_differences", {})
    if not paired:
        return ""
    steps = len(next(iter(paired.values()))["mean"])
    header = f"{'difference':<22}" + "".join(
        f"{f'{k} step' + ('s' if k != 1 else ''):>18}" for k in range(steps)
    )
    lines = [header, "-" * len(header)]
    for name, d in paired.items():
        cells = "".join(
            f"{f'{r:+.2f} ± {c:.2f}':>18}" for r, c in zip(d["mean"], d["ci95"], strict=True)
        )
        lines.append(f"{name:<22}{cells}")
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
    from metarl_tf.trainer import read_metrics_rows

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


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


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
