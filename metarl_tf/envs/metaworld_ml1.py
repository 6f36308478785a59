"""Meta-World ML1 (e.g. ``reach-v3``, ``push-v3``) as a task distribution -- optional extra.

``pip install -e ".[metaworld]"`` installs ``metaworld`` (3.x), which pins ``mujoco==3.3.0``;
pip then replaces the MuJoCo 4 that ``gymnasium[mujoco]`` alone would bring. gymnasium's v5
HalfCheetah/Ant envs run on both (their tests pass under either).

ML1 fixes 50 training and 50 test tasks (goal positions) of one manipulation environment, drawn
by the benchmark's own seed. A task here is ``{"split": "train" | "test", "index": i}``: the
distribution built with ``split="train"`` samples training tasks (meta-training), the one with
``split="test"`` the held-out test tasks (meta-testing). Observations are Meta-World's 39 numbers
with the goal hidden (zeros), as float32; actions are 4-dimensional in ``[-1, 1]``; the reward
is Meta-World's dense v3 reward. An episode lasts ``horizon`` steps (Meta-World's own limit is
500). :func:`success_rate` meta-tests a policy: a task counts as solved in an episode when
``info["success"]`` was 1 at any step.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium
import numpy as np

from metarl_tf.envs.base import Task
from metarl_tf.envs.gym_adapter import GymTaskDistribution

NUM_TASKS = 50  # per split, fixed by ML1


@functools.lru_cache(maxsize=4)
def _benchmark(env_name: str, seed: int):
    try:
        import metaworld
    except ImportError as err:
        raise ImportError('Meta-World is an optional extra: pip install -e ".[metaworld]"') from err
    return metaworld.ML1(env_name, seed=seed)


class ML1TaskEnv(gymnasium.Env):
    """One ML1 task as a gymnasium env; ``episode_success`` says whether this episode succeeded.

    Args:
        env_name: the ML1 environment, e.g. ``"reach-v3"``.
        task: ``{"split": "train" | "test", "index": i}``.
        horizon: the episode is truncated after this many steps (<= 500).
        benchmark_seed: the seed of ``metaworld.ML1`` (it draws the 50 + 50 tasks).
    """

    metadata = {"render_modes": []}

    def __init__(self, env_name: str, task: Task, horizon: int = 200, benchmark_seed: int = 0):
        if not 1 <= horizon <= 500:
            raise ValueError(f"horizon must be in [1, 500] (Meta-World's limit), got {horizon}")
        self.env_name, self.horizon, self.benchmark_seed = env_name, int(horizon), benchmark_seed
        bench = _benchmark(env_name, benchmark_seed)
        self._env = bench.train_classes[env_name]()
        self.observation_space = gymnasium.spaces.Box(
            -np.inf, np.inf, self._env.observation_space.shape, np.float32
        )
        self.action_space = gymnasium.spaces.Box(
            self._env.action_space.low, self._env.action_space.high, dtype=np.float32
        )
        self.set_task(task)
        self._t = 0
        self.episode_success = False

    def set_task(self, task: Task) -> None:
        split, index = task.get("split"), task.get("index")
        if split not in ("train", "test") or not isinstance(index, int):
            raise ValueError(
                f'an ML1 task is {{"split": "train"|"test", "index": int}}, got {task}'
            )
        if not 0 <= index < NUM_TASKS:
            raise ValueError(f"task index must be in [0, {NUM_TASKS}), got {index}")
        bench = _benchmark(self.env_name, self.benchmark_seed)
        tasks = bench.train_tasks if split == "train" else bench.test_tasks
        self._env.set_task(tasks[index])
        self.task = dict(task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self._env.reset(seed=seed)
        self._t = 0
        self.episode_success = False
        return np.asarray(obs, np.float32), {**info, "task": dict(self.task)}

    def step(self, action):
        obs, reward, terminated, _, info = self._env.step(np.asarray(action, np.float32))
        self._t += 1
        self.episode_success = self.episode_success or bool(info.get("success", 0.0))
        truncated = self._t >= self.horizon
        return np.asarray(obs, np.float32), float(reward), bool(terminated), truncated, info

    def close(self) -> None:
        self._env.close()


class MetaWorldML1(GymTaskDistribution):
    """ML1 tasks of one Meta-World environment, from its train or its test split.

    Args:
        env_name: e.g. ``"reach-v3"``, ``"push-v3"``.
        split: ``"train"`` (meta-training) or ``"test"`` (the held-out tasks).
        horizon: episode length (<= 500).
        benchmark_seed: seed of ``metaworld.ML1`` (which 50 + 50 goals).
        num_workers: ignored (bundles written when it chose worker processes still load).
    """

    name = "metaworld-ml1"

    def __init__(
        self,
        env_name: str = "reach-v3",
        split: str = "train",
        horizon: int = 200,
        benchmark_seed: int = 0,
        num_workers: int = 0,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.env_name, self.split, self.benchmark_seed = env_name, split, int(benchmark_seed)
        super().__init__(
            make_env=functools.partial(
                ML1TaskEnv, env_name, horizon=int(horizon), benchmark_seed=self.benchmark_seed
            ),
            sample_tasks=functools.partial(_sample_indices, split),
            horizon=horizon,
            num_workers=num_workers,
        )

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "env_name": self.env_name,
            "split": self.split,
            "benchmark_seed": self.benchmark_seed,
        }

    def with_split(self, split: str) -> MetaWorldML1:
        """The same distribution over the other split (e.g. ``"test"`` for meta-testing)."""
        return MetaWorldML1(self.env_name, split, self.horizon, self.benchmark_seed)


def _sample_indices(split: str, n: int, rng: np.random.Generator) -> list[Task]:
    """``n`` task indices of the split: without replacement while ``n <= 50``."""
    idx = rng.permutation(NUM_TASKS)[:n] if n <= NUM_TASKS else rng.integers(0, NUM_TASKS, n)
    return [{"split": split, "index": int(i)} for i in idx]


def success_rate(
    dist: MetaWorldML1, policy, params, tasks: list[Task], episodes: int, seed: int
) -> float:
    """Fraction of episodes in which ``info["success"]`` was reached at some step.

    Args:
        dist: the distribution (its split should match the tasks').
        policy: the policy (its activation is used with :func:`metarl_tf.policy.numpy_forward`).
        params: per-task weights ``[tasks, ...]`` (e.g. adapted ones) or one shared set.
        tasks: the tasks, ``episodes`` episodes each.
        seed: seeds initial states and action noise.
    """
    from metarl_tf.policy import numpy_forward

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
        mean, log_std = numpy_forward(
            params, obs.reshape(len(tasks), episodes, -1), policy.activation
        )
        noise = rng.standard_normal(mean.shape).astype(np.float32)
        ts = env.step((mean + np.exp(log_std) * noise).reshape(env.num_envs, -1))
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
    import tensorflow as tf

    from metarl_tf.rollout import Sampler

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


if __name__ == "__main__":  # python -m metarl_tf.envs.metaworld_ml1 BUNDLE [N_TASKS] [EPISODES]
    import json
    import sys

    from metarl_tf.bundle import load_bundle
    from metarl_tf.envs.metaworld_ml1 import meta_test_success as _run  # not __main__'s copy

    n, eps = (
        (int(sys.argv[2]) if len(sys.argv) > 2 else NUM_TASKS),
        (int(sys.argv[3]) if len(sys.argv) > 3 else 10),
    )
    print(json.dumps(_run(load_bundle(sys.argv[1]), n, eps), indent=1))
