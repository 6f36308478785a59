"""MuJoCo locomotion task families of the MAML paper (Finn et al., 2017, Sec. 5.3), on
gymnasium's v5 MuJoCo environments (``gymnasium[mujoco]``, headless).

- **HalfCheetahVel** (``halfcheetah-vel``): target velocity ``v_goal ~ U[0, 2]``;
  reward ``-|v - v_goal| - 0.05 * ||a||^2``.
- **HalfCheetahDir** (``halfcheetah-dir``): direction ``d in {-1, +1}``;
  reward ``d * v - 0.05 * ||a||^2``.
- **AntDir** (``ant-dir``): direction ``d in {-1, +1}`` along the x axis (the MAML paper's
  forward/backward ant task, as in pytorch-maml-rl's ``AntDirEnv``; not the random-angle variant);
  reward ``d * v - 0.005 * ||a||^2 - 0.0005 * ||clip(cfrc_ext, -1, 1)||^2 + 0.05``, the control,
  contact and survival terms of rllab / pytorch-maml-rl.

``v`` is the forward velocity gymnasium computes, ``info["x_velocity"]``: the difference of the x
position before and after the step divided by ``dt`` (``0.05`` s: 5 MuJoCo steps of 0.01 s);
for HalfCheetah that is the root slider joint ``qpos[0]`` (the torso's x), for Ant the torso
body's ``xpos[0]`` -- the same quantity as pytorch-maml-rl's ``(x_after - x_before) / dt`` on the
torso. ``a`` is the torque: the action (times ``action_scale``) clipped to ``[-1, 1]^n`` (the
env clips).

``action_scale`` multiplies the policy's action before the clip to ``[-1, 1]^n``, so the policy
acts in ``[-1 / action_scale, 1 / action_scale]^n``: pytorch-maml-rl's ant-dir config wraps the
env in ``NormalizedActionWrapper(scale=10)``, i.e. ``action_scale=0.1`` (preset ``ant-dir``).
A Gaussian policy's initial σ = 1 then explores with σ = 0.1 in torque units instead of flailing
at the torque limits. The default ``1.0`` keeps the action in torque units (bundles written
before the option keep their config). The control cost is on the torque.

Observations are gymnasium's v5 observations as float32: HalfCheetah 17 numbers (``qpos[1:]``,
``qvel``), Ant 105 (``qpos[2:]``, ``qvel``, clipped external contact forces of the 13 bodies).

Episodes last exactly ``horizon`` steps (the paper uses 200, pytorch-maml-rl 100). HalfCheetah
never terminates. For Ant, gymnasium's ``terminate_when_unhealthy`` is **off**:
pytorch-maml-rl's AntDirEnv reports ``done`` when the torso height leaves ``[0.2, 1.0]``, but
fixed-length episodes keep every sub-env of the batch in step, make the linear baseline's time
features meaningful, and a flipped ant simply collects no forward reward for the rest of the
episode (the survival bonus is only 0.05 per step).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import gymnasium
import numpy as np

from metarl_tf.envs.base import Task, check_action_scale
from metarl_tf.envs.gym_adapter import GymTaskDistribution

CTRL_COST_CHEETAH = 0.05
CTRL_COST_ANT = 0.005  # rllab / pytorch-maml-rl: 0.5 * 1e-2 * ||a / scaling||^2, scaling 1
CONTACT_COST_ANT = 0.0005  # 0.5 * 1e-3 * ||clip(cfrc_ext, -1, 1)||^2 (gymnasium's default)
SURVIVE_ANT = 0.05
VELOCITY_LOW, VELOCITY_HIGH = 0.0, 2.0

_log = logging.getLogger(__name__)
_seen_warnings: set[str] = set()
_routed = [False]


def _route_mujoco_warnings() -> None:
    """MuJoCo prints every compiler warning to stderr and appends it to ``MUJOCO_LOG.TXT`` in the
    working directory (MuJoCo 4 warns that gymnasium's HalfCheetah XML uses the deprecated
    ``settotalmass``, once per env built: hundreds per batch). Route them to Python logging,
    each distinct message once per process."""
    import mujoco

    def warn(message: str) -> None:
        if message not in _seen_warnings:
            _seen_warnings.add(message)
            _log.warning("MuJoCo: %s", message.strip())

    if not _routed[0] and hasattr(mujoco, "set_mju_user_warning"):
        mujoco.set_mju_user_warning(warn)
        _routed[0] = True


def _sample_velocities(n: int, rng: np.random.Generator) -> list[Task]:
    return [{"velocity": float(v)} for v in rng.uniform(VELOCITY_LOW, VELOCITY_HIGH, size=n)]


def _sample_directions(n: int, rng: np.random.Generator) -> list[Task]:
    return [{"direction": int(d)} for d in 2 * rng.integers(0, 2, size=n) - 1]


class MuJoCoTaskEnv(gymnasium.Env):
    """One task of a MuJoCo family as a gymnasium env (task-specific reward, fixed horizon).

    ``gymnasium.make("metarl_tf/HalfCheetahDir-v0", task={"direction": -1})``; without a task,
    one is sampled at every ``reset`` from the env's ``np_random``.

    Args:
        family: ``"halfcheetah-vel"``, ``"halfcheetah-dir"`` or ``"ant-dir"``.
        task: ``{"velocity": v}`` or ``{"direction": +-1}``, or ``None``.
        horizon: the episode is truncated after this many steps.
        action_scale: the env's torque is ``clip(action_scale * action, -1, 1)``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        family: str,
        task: Task | None = None,
        horizon: int = 200,
        action_scale: float = 1.0,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown MuJoCo family {family!r}; known: {sorted(FAMILIES)}")
        self.family = family
        self.horizon = int(horizon)
        self.action_scale = check_action_scale(action_scale)
        _route_mujoco_warnings()
        if family.startswith("halfcheetah"):
            from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

            self._env = HalfCheetahEnv()
        else:
            from gymnasium.envs.mujoco.ant_v5 import AntEnv

            self._env = AntEnv(terminate_when_unhealthy=False)
        obs_dim = self._env.observation_space.shape
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, obs_dim, np.float32)
        self.action_space = gymnasium.spaces.Box(
            self._env.action_space.low / self.action_scale,
            self._env.action_space.high / self.action_scale,
            dtype=np.float32,
        )
        self.task: Task | None = None
        self._fixed_task = task is not None
        if task is not None:
            self.set_task(task)
        self._t = 0

    def set_task(self, task: Task) -> None:
        """Switches the task (from the next step on)."""
        key = "velocity" if self.family == "halfcheetah-vel" else "direction"
        if key not in task:
            raise ValueError(f"a {self.family} task needs {key!r}, got {task}")
        if key == "direction" and task[key] not in (-1, 1):
            raise ValueError(f"direction must be -1 or +1, got {task[key]!r}")
        self.task = dict(task)
        self._fixed_task = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if not self._fixed_task:
            sampler = _sample_velocities if self.family == "halfcheetah-vel" else _sample_directions
            self.task = sampler(1, self.np_random)[0]
        obs, _ = self._env.reset(seed=seed)
        self._t = 0
        return obs.astype(np.float32), {"task": dict(self.task)}

    def reward(self, info: dict[str, Any], action: np.ndarray) -> float:
        """The task's reward from gymnasium's step ``info`` and the (clipped) action."""
        v = float(info["x_velocity"])
        if self.family == "halfcheetah-vel":
            return -abs(v - self.task["velocity"]) - CTRL_COST_CHEETAH * float(action @ action)
        if self.family == "halfcheetah-dir":
            return self.task["direction"] * v - CTRL_COST_CHEETAH * float(action @ action)
        return (
            self.task["direction"] * v
            - CTRL_COST_ANT * float(action @ action)
            + float(info["reward_contact"])  # -CONTACT_COST_ANT * ||contact forces||^2
            + SURVIVE_ANT
        )

    def step(self, action):
        if self.task is None:
            raise RuntimeError("call reset() (or pass a task) before step()")
        action = np.clip(self.action_scale * np.asarray(action, np.float64), -1.0, 1.0)
        obs, _, terminated, _, info = self._env.step(action)
        self._t += 1
        info = {**info, "task": dict(self.task)}
        truncated = self._t >= self.horizon
        return obs.astype(np.float32), self.reward(info, action), terminated, truncated, info

    def close(self) -> None:
        self._env.close()


FAMILIES = {
    "halfcheetah-vel": _sample_velocities,
    "halfcheetah-dir": _sample_directions,
    "ant-dir": _sample_directions,
}


class _MuJoCoDistribution(GymTaskDistribution):
    """A MuJoCo task family. Args: ``horizon`` (default 200, the paper's); ``action_scale``
    (default 1.0; see the module docstring); ``num_workers`` is ignored (bundles written when it
    chose worker processes still load; sub-envs step in parallel on Ray actors with
    ``--backend ray``)."""

    family = ""

    def __init__(self, horizon: int = 200, action_scale: float = 1.0, num_workers: int = 0):
        self.action_scale = check_action_scale(action_scale)
        super().__init__(
            make_env=functools.partial(
                MuJoCoTaskEnv, self.family, horizon=int(horizon), action_scale=self.action_scale
            ),
            sample_tasks=FAMILIES[self.family],
            horizon=horizon,
            num_workers=num_workers,
            name=self.family,
        )

    def config(self) -> dict[str, Any]:
        config = super().config()
        if self.action_scale != 1.0:  # bundles written before the option keep their config
            config["action_scale"] = self.action_scale
        return config


class HalfCheetahVel(_MuJoCoDistribution):
    """HalfCheetah running at a target velocity ``~ U[0, 2]``; a task is ``{"velocity": v}``."""

    name = family = "halfcheetah-vel"


class HalfCheetahDir(_MuJoCoDistribution):
    """HalfCheetah running forward or backward; a task is ``{"direction": +-1}``."""

    name = family = "halfcheetah-dir"


class AntDir(_MuJoCoDistribution):
    """Ant running forward or backward along x; a task is ``{"direction": +-1}``."""

    name = family = "ant-dir"
