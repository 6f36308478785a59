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
500). ``episode_success`` (``env.get_attr``) tells whether ``info["success"]`` was 1 at any step
of the current episode; the meta-test on it is :mod:`metarl_tf.evaluation.metaworld`.
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
