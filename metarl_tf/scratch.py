"""From-scratch baseline: a TF-Agents PPO agent trained on each test task alone.

Meta-learning's claim is sample efficiency on a new task. This module measures the other side:
how many environment steps a standard RL agent (TF-Agents' ``PPOClipAgent``, trained from a
random initialization on one task) needs to reach the return a bundle reaches after k inner
steps. Each task runs through its gymnasium registration (``metarl_tf/Navigation2D-v0`` etc.), so
the agent sees exactly what an outside user's agent would.

    python -m metarl_tf scratch-ppo saved_models/nav2d-maml --tasks 5 --env-steps 200000

TF-Agents builds its networks with legacy ``tf.keras`` (tf-keras): ``TF_USE_LEGACY_KERAS=1`` is
set below, before TensorFlow and tf-agents load. ``import keras`` (Keras 3) resolves ``tf.keras``
for the process, so import this module before anything that imports Keras 3 (the CLI does).
Nothing here touches our Keras 3 policies.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# isort: split
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
import tensorflow as tf
from tf_agents.agents.ppo import ppo_clip_agent
from tf_agents.drivers import dynamic_episode_driver
from tf_agents.environments import batched_py_environment, py_environment, tf_py_environment
from tf_agents.networks import actor_distribution_network, value_network
from tf_agents.replay_buffers import tf_uniform_replay_buffer
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

import metarl_tf.envs  # noqa: F401  (gymnasium registrations)

# The gymnasium id of each task distribution with a single-task gymnasium view.
GYM_IDS = {
    "nav2d": "metarl_tf/Navigation2D-v0",
    "bandit": "metarl_tf/BernoulliBandit-v0",
    "cartpole": "metarl_tf/CartPoleVaried-v0",
    "halfcheetah-vel": "metarl_tf/HalfCheetahVel-v0",
    "halfcheetah-dir": "metarl_tf/HalfCheetahDir-v0",
    "ant-dir": "metarl_tf/AntDir-v0",
}


def _array_spec(space: gymnasium.Space, name: str) -> array_spec.ArraySpec:
    if isinstance(space, gymnasium.spaces.Box):
        low = np.broadcast_to(space.low, space.shape)
        high = np.broadcast_to(space.high, space.shape)
        if np.all(np.isinf(low)) and np.all(np.isinf(high)):
            return array_spec.ArraySpec(space.shape, np.float32, name)
        return array_spec.BoundedArraySpec(space.shape, np.float32, low, high, name)
    if isinstance(space, gymnasium.spaces.Discrete):
        return array_spec.BoundedArraySpec((), np.int64, 0, int(space.n) - 1, name)
    raise ValueError(f"no TF-Agents spec for the gymnasium space {space}")


class GymnasiumPyEnvironment(py_environment.PyEnvironment):
    """A gymnasium (>= 1.0) environment as a TF-Agents ``PyEnvironment``.

    ``terminated`` ends the episode with discount 0, ``truncated`` with discount 1 (the value of
    the last state still counts); the next ``step`` after either resets (TF-Agents auto-reset).
    """

    def __init__(self, env: gymnasium.Env, seed: int):
        super().__init__(handle_auto_reset=True)
        self._env = env
        self._seed: int | None = seed
        self._observation_spec = _array_spec(env.observation_space, "observation")
        self._action_spec = _array_spec(env.action_space, "action")

    def observation_spec(self):
        return self._observation_spec

    def action_spec(self):
        return self._action_spec

    def _reset(self):
        observation, _ = self._env.reset(seed=self._seed)
        self._seed = None  # seed the first reset only; later ones continue the env's stream
        return ts.restart(np.asarray(observation, np.float32))

    def _step(self, action):
        observation, reward, terminated, truncated, _ = self._env.step(action)
        observation = np.asarray(observation, np.float32)
        reward = np.float32(reward)
        if terminated:
            return ts.termination(observation, reward)
        if truncated:
            return ts.truncation(observation, reward)
        return ts.transition(observation, reward)


@dataclass(frozen=True)
class PPOConfig:
    """TF-Agents PPO-clip settings (its common continuous-control defaults).

    Attributes:
        episodes_per_iteration: episodes collected (in parallel copies of the task) per update.
        hidden_sizes: actor and value MLP widths.
        learning_rate: Adam learning rate.
        epochs: PPO epochs over each batch.
        clip: importance-ratio clip range.
        gae_lambda: GAE λ.
        gamma: discount.
    """

    episodes_per_iteration: int = 20
    hidden_sizes: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    epochs: int = 10
    clip: float = 0.2
    gae_lambda: float = 0.95
    gamma: float = 0.99


def train_on_task(
    gym_id: str, task: dict, env_steps: int, seed: int, config: PPOConfig = PPOConfig(),
    horizon: int | None = None,
) -> dict[str, list[float]]:  # fmt: skip
    """Trains a fresh PPO agent on one task for at least ``env_steps`` environment steps
    (episodes of at most ``horizon`` steps; default: the environment's own).

    Returns:
        ``{"env_steps": [...], "mean_return": [...]}``: after each update, the cumulative
        environment steps and the mean undiscounted return of the episodes that update was
        computed from (collected by the agent's stochastic policy, as MAML's are).
    """
    if env_steps < 1:
        raise ValueError(f"env_steps must be >= 1, got {env_steps}")
    n = config.episodes_per_iteration
    tf.random.set_seed(seed)
    kwargs = {"task": task} if horizon is None else {"task": task, "horizon": horizon}
    envs = [
        GymnasiumPyEnvironment(gymnasium.make(gym_id, **kwargs), seed=seed * 1000 + i)
        for i in range(n)
    ]
    env = tf_py_environment.TFPyEnvironment(
        batched_py_environment.BatchedPyEnvironment(envs, multithreading=False)
    )
    try:
        return _train(env, envs, env_steps, config)
    finally:
        env.close()


def require_legacy_tf_keras() -> None:
    """Raises ``RuntimeError`` when ``tf.keras`` is Keras 3 in this process: TF-Agents' networks
    built on it train nothing (the returns stay at the random policy's) without any error."""
    version = str(getattr(tf.keras, "__version__", "2"))
    if int(version.split(".")[0]) >= 3:
        raise RuntimeError(
            f"tf.keras is Keras {version} in this process, but TF-Agents needs the legacy tf.keras "
            "(tf-keras): import metarl_tf.scratch before anything that imports Keras 3 "
            "(metarl_tf.training, metarl_tf.bundle, ...), or set TF_USE_LEGACY_KERAS=1 before "
            "Python starts"
        )


def _train(env, envs, env_steps: int, config: PPOConfig) -> dict[str, list[float]]:
    require_legacy_tf_keras()
    n = config.episodes_per_iteration
    actor = actor_distribution_network.ActorDistributionNetwork(
        env.observation_spec(), env.action_spec(), fc_layer_params=config.hidden_sizes,
        activation_fn=tf.keras.activations.tanh,
    )  # fmt: skip
    critic = value_network.ValueNetwork(
        env.observation_spec(), fc_layer_params=config.hidden_sizes,
        activation_fn=tf.keras.activations.tanh,
    )  # fmt: skip
    agent = ppo_clip_agent.PPOClipAgent(
        env.time_step_spec(), env.action_spec(),
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        actor_net=actor, value_net=critic, importance_ratio_clipping=config.clip,
        lambda_value=config.gae_lambda, discount_factor=config.gamma, num_epochs=config.epochs,
        use_gae=True, normalize_observations=True, normalize_rewards=True,
    )  # fmt: skip
    agent.initialize()
    horizon = envs[0]._env.unwrapped.horizon if hasattr(envs[0]._env.unwrapped, "horizon") else 1000
    buffer = tf_uniform_replay_buffer.TFUniformReplayBuffer(
        agent.collect_data_spec, batch_size=n, max_length=horizon + 2
    )
    driver = dynamic_episode_driver.DynamicEpisodeDriver(
        env, agent.collect_policy, observers=[buffer.add_batch], num_episodes=n
    )
    train = tf.function(agent.train)
    collect = tf.function(driver.run)
    steps, curve_steps, curve_returns = 0, [], []
    while steps < env_steps:
        collect()
        experience = buffer.gather_all()
        boundary = experience.is_boundary().numpy()
        steps += int(np.sum(~boundary))
        returns = episode_returns(experience.reward.numpy(), boundary, experience.is_last().numpy())
        train(experience=experience)
        buffer.clear()
        curve_steps.append(steps)
        curve_returns.append(float(np.mean(returns)) if len(returns) else float("nan"))
    return {"env_steps": curve_steps, "mean_return": curve_returns}


def episode_returns(reward, boundary, last) -> np.ndarray:
    """Undiscounted returns of the episodes that end (``last``) in ``[batch, time]`` trajectories;
    ``boundary`` steps (LAST -> FIRST) carry no reward; episodes cut off by the batch are dropped.
    """
    out = []
    for row_reward, row_boundary, row_last in zip(reward, boundary, last, strict=True):
        total = 0.0
        for r, b, end in zip(row_reward, row_boundary, row_last, strict=True):
            if b:
                total = 0.0
                continue
            total += float(r)
            if end:
                out.append(total)
                total = 0.0
    return np.array(out)


def steps_to_reach(curve: dict[str, list[float]], level: float, window: int = 3) -> int | None:
    """First environment-step count at which the trailing ``window``-update mean return reaches
    ``level``; ``None`` if it never does."""
    from metarl_tf.evaluation.statistics import moving_average

    reached = np.flatnonzero(moving_average(curve["mean_return"], window) >= level)
    return int(curve["env_steps"][reached[0]]) if len(reached) else None


def scratch_baseline(
    task_distribution: str, tasks: list[dict], env_steps: int, seed: int,
    config: PPOConfig = PPOConfig(), progress=None, horizon: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """:func:`train_on_task` on every task; the curves and their mean over tasks on a common grid
    of environment steps (each task's curve held constant between its updates)."""
    if task_distribution not in GYM_IDS:
        raise ValueError(
            f"no single-task gymnasium view of {task_distribution!r}; known: {sorted(GYM_IDS)}"
        )
    gym_id = GYM_IDS[task_distribution]
    curves = []
    for i, task in enumerate(tasks):
        curves.append(train_on_task(gym_id, task, env_steps, seed + i, config, horizon))
        if progress is not None:
            progress(i + 1, len(tasks))
    grid = sorted({s for c in curves for s in c["env_steps"]})
    per_task = np.array([np.interp(grid, c["env_steps"], c["mean_return"]) for c in curves])
    return {
        "config": {**config.__dict__, "hidden_sizes": list(config.hidden_sizes)},
        "per_task_curves": curves,
        "env_steps": grid,
        "mean_return": per_task.mean(axis=0).tolist(),
    }


def compare_with_bundle(
    bundle, n_tasks: int, episodes: int, steps: int, env_steps: int, seed: int,
    config: PPOConfig = PPOConfig(), progress=None,
) -> dict[str, Any]:  # fmt: skip
    """The bundle's adaptation curve and PPO from scratch on the same ``n_tasks`` test tasks (the
    tasks ``evaluate --seed seed`` uses), and the environment steps PPO needs to match MAML after
    1..``steps`` inner steps."""
    from metarl_tf.evaluation.protocol import EVAL_SEED_SALT, adaptation_curve

    dist_name = bundle.meta["task_distribution"]["name"]
    tasks = bundle.task_distribution.sample_tasks(n_tasks, seed=EVAL_SEED_SALT + seed)
    maml = adaptation_curve(bundle, tasks, episodes, steps, seed)
    # env steps MAML consumed per task before its k-th evaluation batch: the k adaptation batches
    used = np.cumsum([0] + [b.num_steps / n_tasks for b in maml["batches"][:-1]])
    horizon = bundle.task_distribution.horizon
    scratch = scratch_baseline(dist_name, tasks, env_steps, seed, config, progress, horizon)
    per_task_maml = np.array(maml["per_task"])  # [steps + 1, tasks]
    reach = []
    for k in range(1, steps + 1):
        per_task = [steps_to_reach(c, float(per_task_maml[k, i]))
                    for i, c in enumerate(scratch["per_task_curves"])]  # fmt: skip
        mean_level = float(per_task_maml[k].mean())
        reach.append({
            "inner_steps": k,
            "maml_mean_return": mean_level,
            "maml_env_steps": float(used[k]),
            "ppo_env_steps_per_task": per_task,
            "ppo_env_steps_mean_curve": steps_to_reach(
                {"env_steps": scratch["env_steps"], "mean_return": scratch["mean_return"]},
                mean_level,
            ),
        })  # fmt: skip
    return {
        "bundle": str(bundle.path),
        "task_distribution": dist_name,
        "tasks": n_tasks,
        "episodes": episodes,
        "seed": seed,
        "env_steps_budget": env_steps,
        "maml": {
            "mean_return": maml["mean_return"],
            "ci95": maml["ci95"],
            "env_steps": used.tolist(),
        },
        "ppo_scratch": scratch,
        "steps_to_match_maml": reach,
    }


def plot_comparison(result: dict[str, Any], path) -> None:
    """Return vs. environment steps on the new tasks: PPO from scratch (each task faint, mean
    bold) and MAML after 0..k inner steps (points)."""
    from metarl_tf.evaluation.plots import new_axes, save_axes

    fig, ax = new_axes()
    for c in result["ppo_scratch"]["per_task_curves"]:
        ax.plot(c["env_steps"], c["mean_return"], color="C1", alpha=0.2, linewidth=0.8)
    s = result["ppo_scratch"]
    ax.plot(s["env_steps"], s["mean_return"], color="C1", label="TF-Agents PPO from scratch")
    m = result["maml"]
    x = np.maximum(m["env_steps"], 1.0)  # 0 steps drawn at 1 on the log axis
    ax.errorbar(x, m["mean_return"], yerr=m["ci95"], color="C0", marker="o", capsize=3,
                label="MAML: 0, 1, ... inner steps")  # fmt: skip
    ax.set_xscale("log")
    title = f"{result['task_distribution']}: {result['tasks']} new tasks"
    save_axes(fig, ax, path, "environment steps on the new task (log)", "mean return", title, 8)
