"""The meta-test protocol (the MAML paper's): adaptation curves on fresh tasks.

For each of ``n`` fresh tasks: collect episodes with the current policy, record their mean return,
take one inner step on them, repeat. Index ``k`` of the curve is the return after ``k`` steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metarl_tf.evaluation.statistics import confidence_interval95
from metarl_tf.rollout import Sampler

EVAL_SEED_SALT = 7_919_000  # keeps evaluation tasks apart from the training seeds' streams


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
