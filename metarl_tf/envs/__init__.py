"""Task distributions by name, and their gymnasium registration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium

from metarl_tf.envs.bandits import BernoulliBandit, BernoulliBanditEnv
from metarl_tf.envs.base import (
    BatchedEnv,
    Task,
    TaskDistribution,
    TimeStep,
    check_task_distribution,
)
from metarl_tf.envs.cartpole import CartPoleVaried, CartPoleVariedEnv
from metarl_tf.envs.gym_adapter import GymTaskDistribution
from metarl_tf.envs.metaworld_ml1 import MetaWorldML1
from metarl_tf.envs.mujoco import AntDir, HalfCheetahDir, HalfCheetahVel, MuJoCoTaskEnv
from metarl_tf.envs.navigation import Navigation2D, Navigation2DEnv
from metarl_tf.envs.oracle import OracleObservation, oracle_variant

TASK_DISTRIBUTIONS: dict[str, Callable[..., TaskDistribution]] = {"nav2d": Navigation2D}
# Oracle variants (task parameters in the observation), see metarl_tf/envs/oracle.py.
TASK_DISTRIBUTIONS["nav2d-oracle"] = oracle_variant(
    "nav2d-oracle", Navigation2D, lambda t: t["goal"]
)
TASK_DISTRIBUTIONS["bandit"] = BernoulliBandit  # discrete: k-armed Bernoulli bandits
TASK_DISTRIBUTIONS["cartpole"] = CartPoleVaried  # discrete: CartPole with varied physics
# MuJoCo locomotion families (gymnasium[mujoco]); see metarl_tf/envs/mujoco.py.
TASK_DISTRIBUTIONS.update(
    {"halfcheetah-vel": HalfCheetahVel, "halfcheetah-dir": HalfCheetahDir, "ant-dir": AntDir}
)
TASK_DISTRIBUTIONS["halfcheetah-vel-oracle"] = oracle_variant(
    "halfcheetah-vel-oracle", HalfCheetahVel, lambda t: [t["velocity"]]
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

for _id, _entry in (
    ("metarl_tf/BernoulliBandit-v0", "metarl_tf.envs.bandits:BernoulliBanditEnv"),
    ("metarl_tf/CartPoleVaried-v0", "metarl_tf.envs.cartpole:CartPoleVariedEnv"),
):
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=_entry, max_episode_steps=None)
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
    "BernoulliBandit",
    "BernoulliBanditEnv",
    "CartPoleVaried",
    "CartPoleVariedEnv",
    "Navigation2D",
    "Navigation2DEnv",
    "OracleObservation",
    "TASK_DISTRIBUTIONS",
    "Task",
    "TaskDistribution",
    "TimeStep",
    "check_task_distribution",
    "make_task_distribution",
    "oracle_variant",
]
