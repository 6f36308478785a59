"""Reference returns for the discrete presets, on the same fresh tasks ``python -m metarl_tf
evaluate --tasks N --seed S`` uses: a uniformly random policy (bandit: in expectation,
``horizon · mean_a p_a``; cartpole: measured with all-zero logits and ``--episodes`` episodes
per task) and, for the bandit, the oracle that always pulls the best arm (``horizon · max_a p_a``).

    python bench/discrete_reference.py [--tasks 40] [--episodes 20] [--seed 0] [--json PATH]

Prints mean ± 95% CI over tasks; asserts nothing.
"""

from __future__ import annotations

import argparse
import json

import metarl_tf  # noqa: F401  (environment for TensorFlow)


def main() -> None:
    """Computes and prints the reference returns."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import numpy as np

    from metarl_tf.config import get_preset
    from metarl_tf.envs import BernoulliBandit, make_task_distribution
    from metarl_tf.evaluation.protocol import EVAL_SEED_SALT
    from metarl_tf.evaluation.statistics import confidence_interval95
    from metarl_tf.policy import make_policy
    from metarl_tf.rollout import Sampler

    def stat(x):
        x = np.asarray(x, np.float64)
        return {
            "mean_return": round(float(x.mean()), 3),
            "ci95": round(confidence_interval95(x), 3),
        }

    figures = {"tasks": args.tasks, "episodes": args.episodes, "seed": args.seed}
    for preset in ("bandit-k5", "cartpole"):
        c = get_preset(preset)
        dist = make_task_distribution(c.task_distribution, horizon=c.horizon, **c.task_kwargs)
        tasks = dist.sample_tasks(args.tasks, seed=EVAL_SEED_SALT + args.seed)
        out = {}
        if isinstance(dist, BernoulliBandit):
            out["oracle (expected)"] = stat([dist.oracle_return(t, dist.horizon) for t in tasks])
            out["random (expected)"] = stat([dist.random_return(t, dist.horizon) for t in tasks])
        policy = make_policy(dist.observation_spec, dist.action_spec, c.hidden_sizes)
        zeros = [np.zeros(s, np.float32) for s in policy.parameter_shapes]  # uniform policy
        batch = Sampler(dist, policy, args.episodes).sample(zeros, tasks, seed=args.seed)
        out["random (sampled)"] = stat(batch.episode_returns.mean(axis=1))
        figures[preset] = out
        for name, v in out.items():
            print(f"{preset:<10} {name:<18} {v['mean_return']:8.2f} ± {v['ci95']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
