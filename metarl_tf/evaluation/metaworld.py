"""Meta-testing on Meta-World ML1's held-out test tasks: success rates before and after one inner
step (the benchmark's own measure: a task counts as solved in an episode when ``info["success"]``
was 1 at any step).

    python -m metarl_tf.evaluation.metaworld BUNDLE [N_TASKS] [EPISODES]

prints :func:`meta_test_success` as JSON.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from metarl_tf.bundle import load_bundle
from metarl_tf.envs.base import Task
from metarl_tf.envs.metaworld_ml1 import NUM_TASKS, MetaWorldML1
from metarl_tf.rollout import Sampler


def success_rate(
    dist: MetaWorldML1, policy, params, tasks: list[Task], episodes: int, seed: int
) -> float:
    """Fraction of episodes in which ``info["success"]`` was reached at some step.

    Args:
        dist: the distribution (its split should match the tasks').
        policy: the policy (its numpy sampler, ``sample_noise`` and ``numpy_act``).
        params: per-task weights ``[tasks, ...]`` (e.g. adapted ones) or one shared set.
        tasks: the tasks, ``episodes`` episodes each.
        seed: seeds initial states and action noise.
    """
    env = dist.make_batched_env(tasks, episodes)
    env.seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    params = [np.asarray(p, np.float32) for p in params]
    if params[0].ndim == 2:
        params = [np.broadcast_to(p, (len(tasks), *p.shape)) for p in params]
    rng = np.random.default_rng(seed)
    obs = env.reset()
    succeeded = np.zeros(env.num_envs, bool)
    active = np.ones(env.num_envs, bool)
    for _ in range(dist.horizon):
        noise = policy.sample_noise(rng, (len(tasks), episodes))
        actions = policy.numpy_act(params, obs.reshape(len(tasks), episodes, -1), noise)
        ts = env.step(actions.reshape(env.num_envs, -1))
        succeeded |= np.array(env.get_attr("episode_success")) & active
        active &= ~ts.done
        obs = ts.observation
        if not active.any():
            break
    return float(succeeded.mean())


def meta_test_success(
    bundle, n_tasks: int = NUM_TASKS, episodes: int = 10, seed: int = 0
) -> dict[str, float]:
    """Success rates on ML1's *test* tasks before and after one inner step.

    For each of ``n_tasks`` test tasks: ``episodes`` episodes with the meta-learned policy
    (their success rate is ``"pre"``), one inner step on them with the bundle's adapter, then
    ``episodes`` fresh episodes with the adapted policy (``"post"``).

    Args:
        bundle: a :class:`metarl_tf.bundle.Bundle` trained on ``metaworld-ml1``.
        n_tasks: test tasks (the first ``n_tasks`` of a seeded permutation of the 50).
        episodes: episodes per task, before and after adaptation.
        seed: seeds task order, initial states and action noise.
    """
    dist = bundle.task_distribution
    if not isinstance(dist, MetaWorldML1):
        raise ValueError(f"the bundle was trained on {dist.name!r}, not metaworld-ml1")
    test = dist.with_split("test")
    tasks = test.sample_tasks(n_tasks, seed=seed)
    params = [p.numpy() for p in bundle.policy.parameters]
    pre = success_rate(test, bundle.policy, params, tasks, episodes, seed)
    batch = Sampler(test, bundle.policy, episodes).sample(params, tasks, seed)
    tensors = type(batch)(*[tf.convert_to_tensor(x) for x in batch])
    adapted, _, _ = bundle.make_adapter()(bundle.policy.parameters, tensors, steps=1)
    post = success_rate(
        test, bundle.policy, [a.numpy() for a in adapted], tasks, episodes, seed + 1
    )
    returns_pre = float(batch.episode_returns.mean())
    test.close()
    return {"tasks": n_tasks, "episodes": episodes, "success_pre": pre, "success_post": post,
            "return_pre": returns_pre}  # fmt: skip


if __name__ == "__main__":  # python -m metarl_tf.evaluation.metaworld BUNDLE [N_TASKS] [EPISODES]
    import json
    import sys

    n, eps = (
        (int(sys.argv[2]) if len(sys.argv) > 2 else NUM_TASKS),
        (int(sys.argv[3]) if len(sys.argv) > 3 else 10),
    )
    print(json.dumps(meta_test_success(load_bundle(sys.argv[1]), n, eps), indent=1))
