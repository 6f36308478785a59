"""The ``evaluate`` command's report: every method (the bundle and its baselines) on the same test
tasks and noise for each seed, pooled over seeds, paired differences; and its text tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metarl_tf.evaluation.baselines import RANDOM_INIT_SALT, build_methods, random_parameters
from metarl_tf.evaluation.protocol import EVAL_SEED_SALT, method_curve
from metarl_tf.evaluation.statistics import aggregate_seeds, confidence_interval95


def _step_size_label(bundle) -> float | str:
    if bundle.learned_step_sizes:
        return "learned (Meta-SGD, per parameter)"
    return float(bundle.step_sizes)


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

    Every method (``maml`` = the bundle, plus ``baselines``, see :mod:`metarl_tf.evaluation.baselines`) runs
    on the same test tasks with the same noise for each seed in ``seeds`` (default ``[seed]``);
    seed ``s`` draws its tasks with ``EVAL_SEED_SALT + s``. ``methods`` holds the aggregate over
    seeds (:func:`aggregate_seeds`), ``per_seed`` the per-seed results with every task's return,
    ``paired_differences`` ``maml − baseline`` per task (same tasks and noise), mean and CI.
    ``backend`` runs every rollout (:func:`metarl_tf.rollout.make_backend`; default local).
    """
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
