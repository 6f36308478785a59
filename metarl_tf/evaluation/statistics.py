"""Statistics of meta-test returns: confidence intervals of a mean, seeds pooled, trailing means."""

from __future__ import annotations

import math

import numpy as np


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


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)
