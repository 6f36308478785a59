"""Task distributions by name, and their gymnasium registration."""

from __future__ import annotations

from typing import Any

import gymnasium

from metarl_tf.envs.base import (
    BatchedEnv,
    Task,
    TaskDistribution,
    TimeStep,
    check_task_distribution,
)
from metarl_tf.envs.gym_adapter import GymTaskDistribution
from metarl_tf.envs.metaworld_ml1 import MetaWorldML1
from metarl_tf.envs.mujoco import AntDir, HalfCheetahDir, HalfCheetahVel, MuJoCoTaskEnv
from metarl_tf.envs.navigation import Navigation2D, Navigation2DEnv

TASK_DISTRIBUTIONS: dict[str, type[TaskDistribution]] = {"nav2d": Navigation2D}
# MuJoCo locomotion families (gymnasium[mujoco]); see metarl_tf/envs/mujoco.py.
TASK_DISTRIBUTIONS.update(
    {"halfcheetah-vel": HalfCheetahVel, "halfcheetah-dir": HalfCheetahDir, "ant-dir": AntDir}
)
# Meta-World ML1 (optional extra `metaworld`; imported only when the distribution is built).
TASK_DISTRIBUTIONS["metaworld-ml1"] = MetaWorldML1


def make_task_distribution(name: str, **kwargs: Any) -> TaskDistribution:
    """Builds a registered task distribution, e.g. ``make_task_distribution("nav2d")``."""
    try:
        cls = TASK_DISTRIBUTIONS[name]
    except KeyError:
        known = ", ".join(sorted(TASK_DISTRIBUTIONS))
        raise ValueError(f"unknown task distribution {name!r}; known: {known}") from None
    return cls(**kwargs)


if "metarl_tf/Navigation2D-v0" not in gymnasium.registry:
    gymnasium.register(
        id="metarl_tf/Navigation2D-v0",
        entry_point="metarl_tf.envs.navigation:Navigation2DEnv",
        max_episode_steps=None,
    )

for _id, _family in (
    ("HalfCheetahVel-v0", "halfcheetah-vel"),
    ("HalfCheetahDir-v0", "halfcheetah-dir"),
    ("AntDir-v0", "ant-dir"),
):
    if f"metarl_tf/{_id}" not in gymnasium.registry:
        gymnasium.register(
            id=f"metarl_tf/{_id}",
            entry_point="metarl_tf.envs.mujoco:MuJoCoTaskEnv",
            kwargs={"family": _family},
            max_episode_steps=None,
        )

__all__ = [
    "AntDir",
    "GymTaskDistribution",
    "HalfCheetahDir",
    "HalfCheetahVel",
    "MuJoCoTaskEnv",
    "BatchedEnv",
    "Navigation2D",
    "Navigation2DEnv",
    "TASK_DISTRIBUTIONS",
    "Task",
    "TaskDistribution",
    "TimeStep",
    "check_task_distribution",
    "make_task_distribution",
]
