"""TF-Agents in and out (metarl_tf/agents.py, metarl_tf/envs/tf_agents_env.py): our policies in a
TF-Agents driver on the task distribution's TF-Agents environment, and driver-collected
``Trajectory`` data as the episodes adaptation takes.

The references: the trainer's own sampler and evaluation (returns), the policy's own
``log_prob`` (distributions), and the transitions recorded at the numpy batched environment
underneath the TF-Agents one, cut into episodes by that environment's ``done`` flags (episodes).
"""

from __future__ import annotations

import metarl_tf.agents  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before tf-agents loads)

# isort: split
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_not_close, assert_within
from tf_agents.drivers import dynamic_episode_driver
from tf_agents.environments import batched_py_environment, tf_py_environment
from tf_agents.policies import greedy_policy
from tf_agents.replay_buffers import tf_uniform_replay_buffer
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory

from metarl_tf.agents import MetaRLPolicy, as_tf_agents_policy, episodes_from_trajectories
from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.envs import BernoulliBandit, Navigation2D
from metarl_tf.envs.tf_agents_env import TaskPyEnvironment, tf_agents_environment
from metarl_tf.episodes import pad_episodes
from metarl_tf.policy import make_policy
from metarl_tf.rollout import Sampler

REPO_ROOT = Path(__file__).resolve().parents[1]
ADAPTATION = {"steps": 1, "gamma": 0.99, "gae_lambda": 1.0, "baseline": "linear"}


def _tiny_bundle(path, dist, hidden=(16,), seed=0):
    policy = make_policy(dist.observation_spec, dist.action_spec, hidden, init_log_std=-1.0)
    rng = np.random.default_rng(seed)
    policy.set_parameters([p + rng.normal(0, 0.3, p.shape) for p in policy.get_parameters()])
    return load_bundle(save_bundle(path, policy, 0.1, dist, adaptation=ADAPTATION))


@pytest.fixture(scope="module")
def nav(tmp_path_factory):
    """Nav2D, horizon 12: most sampled actions leave the ±0.1 bounds (σ ≈ 0.37), so raw and
    clipped actions differ."""
    return _tiny_bundle(tmp_path_factory.mktemp("b") / "nav", Navigation2D(horizon=12))


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    return _tiny_bundle(tmp_path_factory.mktemp("b") / "bandit", BernoulliBandit(k=3, horizon=5))


class RecordingEnv:
    """Wraps a numpy batched environment (one sub-env) and records every transition it makes:
    ``(observation before, action, reward, done)``."""

    def __init__(self, env):
        self.env, self.log, self.obs = env, [], None

    def reset(self):
        self.obs = self.env.reset()
        return self.obs

    def step(self, actions):
        step = self.env.step(actions)
        self.log.append((self.obs[0], np.asarray(actions)[0], step.reward[0], bool(step.done[0])))
        self.obs = step.observation
        return step

    def seed(self, seed):
        self.env.seed(seed)

    def episodes(self):
        """The complete episodes, split where the environment said ``done``."""
        out, current = [], []
        for obs, action, reward, done in self.log:
            current.append((obs, action, reward))
            if done:
                o, a, r = (np.array(x, np.float32) for x in zip(*current, strict=True))
                out.append((o, a.reshape(len(r), -1), r))
                current = []
        return out


def collect(bundle, policy, task, parallel, episodes, seed):
    """Runs a ``DynamicEpisodeDriver`` of ``policy`` on ``parallel`` copies of ``task``.

    Returns ``(trajectories [parallel, T], the copies' recorded episodes in copy order)``.
    """
    envs = [TaskPyEnvironment(bundle.task_distribution, task, seed + i) for i in range(parallel)]
    for e in envs:
        e._env = RecordingEnv(e._env)
    env = tf_py_environment.TFPyEnvironment(
        batched_py_environment.BatchedPyEnvironment(envs, multithreading=False)
    )
    buffer = tf_uniform_replay_buffer.TFUniformReplayBuffer(
        policy.trajectory_spec, batch_size=parallel, max_length=1000
    )
    driver = dynamic_episode_driver.DynamicEpisodeDriver(
        env, policy, observers=[buffer.add_batch], num_episodes=episodes
    )
    tf.random.set_seed(seed)
    driver.run()
    recorded = [ep for e in envs for ep in e._env.episodes()]
    return buffer.gather_all(), recorded


def test_policy_specs_and_distribution_are_the_bundle_policy(nav, bandit):
    for bundle in (nav, bandit):
        dist = bundle.task_distribution
        policy = as_tf_agents_policy(bundle)
        assert isinstance(policy, MetaRLPolicy)
        assert policy.time_step_spec == ts.time_step_spec(dist.observation_spec)
        assert policy.action_spec == dist.action_spec
        obs = np.random.default_rng(0).uniform(-0.5, 1.0, (6, dist.observation_spec.shape[0]))
        step = ts.restart(tf.constant(obs, tf.float32), batch_size=6)
        action = policy.action(step).action
        assert tensor_spec.is_bounded(policy.action_spec)
        assert action.dtype == dist.action_spec.dtype and action.shape[1:] == dist.action_spec.shape
        ours = bundle.policy
        params = ours.get_parameters()
        encoded = tf.reshape(tf.cast(action, tf.float32), [6, ours.act_dim])  # float-encoded
        expected = ours.log_prob(ours.forward(params, tf.constant(obs, tf.float32)), encoded)
        got = policy.distribution(step).action.log_prob(action)
        assert_close(got.numpy(), expected.numpy(), ulps=32)
        greedy = greedy_policy.GreedyPolicy(policy).action(step).action.numpy()  # clips
        mean = ours.numpy_act(params, obs.astype(np.float32), None, deterministic=True)
        low, high = dist.action_spec.minimum, dist.action_spec.maximum
        assert_close(
            greedy.reshape(mean.shape), np.clip(mean, low, high), ulps=128
        )  # TF-Agents' forward


def test_driver_returns_match_our_evaluation(nav):
    """The same policy on the same task: the greedy policy's episode return through the driver
    equals the sampler's deterministic one; sampled returns agree within noise (4 standard
    errors of the difference of two means of 48 episodes)."""
    dist = nav.task_distribution
    task = dist.sample_tasks(1, seed=3)[0]
    params = nav.policy.get_parameters()
    policy = as_tf_agents_policy(nav)
    greedy = greedy_policy.GreedyPolicy(policy)
    traj, recorded = collect(nav, greedy, task, parallel=2, episodes=2, seed=0)
    ours = Sampler(dist, nav.policy, 1).sample(params, [task], seed=0, deterministic=True)
    for _, _, rewards in episodes_from_trajectories(traj):
        assert_close(rewards.sum(), ours.episode_returns[0, 0], ulps=8)
    traj, recorded = collect(nav, policy, task, parallel=8, episodes=48, seed=1)
    driver_returns = np.array([r.sum() for _, _, r in episodes_from_trajectories(traj)])
    sampler_returns = (
        Sampler(dist, nav.policy, 48).sample(params, [task], seed=1).episode_returns[0]
    )
    assert len(driver_returns) >= 48
    diff = driver_returns.mean() - sampler_returns.mean()
    se = np.sqrt(
        driver_returns.var(ddof=1) / len(driver_returns) + sampler_returns.var(ddof=1) / 48
    )
    assert_within(diff, 0.0, atol=4 * se, why="4 standard errors of a difference of means")


@pytest.mark.parametrize("name", ["nav", "bandit"])
def test_adapting_on_driver_data_equals_adapting_on_our_episodes(name, request):
    """Driver-collected trajectories → ``episodes_from_trajectories`` → ``Bundle.adapt``: the
    same episodes (observations, raw actions, rewards, boundaries) as recorded at the numpy
    environment, and the same adapted weights as the bundle's adapter on those episodes in the
    sampler's padded batch layout (padded to the horizon)."""
    bundle = request.getfixturevalue(name)
    dist = bundle.task_distribution
    task = dist.sample_tasks(1, seed=4)[0]
    traj, recorded = collect(bundle, as_tf_agents_policy(bundle), task, 3, episodes=7, seed=2)
    episodes = episodes_from_trajectories(traj)
    ends = int(np.sum(traj.next_step_type.numpy() == ts.StepType.LAST))
    assert len(episodes) == len(recorded) == ends >= 7
    for (o, a, r), (ro, ra, rr) in zip(episodes, recorded, strict=True):
        assert_exact(o, ro)
        assert_exact(a, ra)  # raw samples (the env clips), float-encoded indices
        assert_exact(r, rr)
    if name == "nav":
        assert np.any(np.abs(np.concatenate([a for _, a, _ in episodes])) > 0.1)
    adapted = bundle.adapt(episodes)
    reference = pad_episodes(recorded, length=dist.horizon)  # the sampler's layout
    params, losses, _ = bundle.adapter(bundle.policy.get_parameters(), reference, 1)
    assert adapted.num_episodes == len(recorded)
    assert_close(adapted.inner_losses, losses.numpy()[:, 0], ulps=8)
    for got, expected in zip(adapted.parameters, params, strict=True):
        assert_close(got, expected.numpy()[0], ulps=8)
    assert_not_close(adapted.parameters, bundle.policy.get_parameters())  # it did adapt


def _trajectory(step_types, actions, batch=True):
    """A hand-made trajectory: item t has observation [t, 10 t], reward 100 + t."""
    step_types = np.asarray(step_types, np.int32)
    rows, length = step_types.shape
    next_types = np.concatenate([step_types[:, 1:], np.full((rows, 1), ts.StepType.MID)], 1)
    t = np.broadcast_to(np.arange(length, dtype=np.float32), (rows, length))
    traj = trajectory.Trajectory(
        step_type=step_types, observation=np.stack([t, 10 * t], -1), action=np.asarray(actions),
        policy_info=(), next_step_type=next_types, reward=100 + t,
        discount=np.ones_like(t),
    )  # fmt: skip
    return traj if batch else tf.nest.map_structure(lambda x: x[0], traj)


def test_episodes_from_trajectories_respects_boundaries():
    F, M, L = ts.StepType.FIRST, ts.StepType.MID, ts.StepType.LAST  # noqa: N806
    # row 0: a leading partial episode (items 0-1), an episode 2-4 (item 5 is the boundary), a
    # one-step episode 6, boundary 7, an episode cut off by the batch's end 8-9.
    # row 1: an episode 0-2, boundary 3, an episode 4-5, boundary 6, cut off 7-9.
    types = [[M, M, F, M, M, L, F, L, F, M], [F, M, M, L, F, M, L, F, M, M]]
    actions = np.arange(20, dtype=np.int32).reshape(2, 10)
    episodes = episodes_from_trajectories(_trajectory(types, actions))
    spans = [(0, 2, 5), (0, 6, 7), (1, 0, 3), (1, 4, 6)]
    assert len(episodes) == len(spans)
    for (o, a, r), (row, start, end) in zip(episodes, spans, strict=True):
        t = np.arange(start, end, dtype=np.float32)
        assert_exact(o, np.stack([t, 10 * t], -1))
        assert_exact(a, (row * 10 + t)[:, None])  # float-encoded indices
        assert_exact(r, 100 + t)
        assert o.dtype == a.dtype == r.dtype == np.float32
    kept = episodes_from_trajectories(_trajectory(types, actions), keep_incomplete=True)
    assert [len(r) for _, _, r in kept] == [3, 1, 2, 3, 2, 3]
    continuous = np.zeros((2, 10, 3), np.float32)
    assert episodes_from_trajectories(_trajectory(types, continuous))[0][1].shape == (3, 3)
    single = episodes_from_trajectories(_trajectory(types, actions, batch=False))
    assert [len(r) for _, _, r in single] == [3, 1]  # row 0 alone, [T]
    flat = _trajectory(types, actions)._replace(observation=np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        episodes_from_trajectories(flat)


def test_tf_agents_environment_steps_the_task_distribution(nav):
    dist = nav.task_distribution
    task = dist.sample_tasks(1, seed=5)[0]
    env = tf_agents_environment(dist, task, parallel=2)
    assert env.batch_size == 2
    assert env.action_spec() == dist.action_spec
    assert env.time_step_spec().observation == dist.observation_spec
    step = env.reset()
    batched = dist.make_batched_env([task], 2)
    obs = batched.reset()
    assert_exact(step.observation.numpy(), obs)
    for t in range(dist.horizon):
        action = np.full((2, 2), 0.5 * (-1) ** t, np.float32)  # out of bounds: the env clips
        step, expected = env.step(tf.constant(action)), batched.step(action)
        assert_exact(step.observation.numpy(), expected.observation)
        assert_exact(step.reward.numpy(), expected.reward)
    assert np.all(step.step_type.numpy() == ts.StepType.LAST)
    assert np.all(step.discount.numpy() == 1.0)  # the horizon truncates


@pytest.mark.slow
def test_shipped_bundle_in_a_driver_matches_our_evaluation():
    """saved_models/nav2d-maml (horizon 100) in a TF-Agents driver: mean return of 24 sampled
    episodes within noise of the sampler's 24 on the same task."""
    bundle = load_bundle(REPO_ROOT / "saved_models" / "nav2d-maml")
    dist = bundle.task_distribution
    task = dist.sample_tasks(1, seed=6)[0]
    traj, _ = collect(bundle, as_tf_agents_policy(bundle), task, parallel=8, episodes=24, seed=3)
    driver_returns = np.array([r.sum() for _, _, r in episodes_from_trajectories(traj)])
    params = bundle.policy.get_parameters()
    sampler_returns = (
        Sampler(dist, bundle.policy, 24).sample(params, [task], seed=3).episode_returns[0]
    )
    diff = driver_returns.mean() - sampler_returns.mean()
    se = np.sqrt(
        driver_returns.var(ddof=1) / len(driver_returns) + sampler_returns.var(ddof=1) / 24
    )
    assert_within(diff, 0.0, atol=4 * se, why="4 standard errors of a difference of means")


@pytest.mark.slow
def test_works_when_tf_keras_is_already_keras_3(tmp_path):
    """The TF-Agents side builds no Keras layer: in a process where ``tf.keras`` resolved to
    Keras 3 before tf-agents loaded (TF_USE_LEGACY_KERAS unset), a driver still runs with our
    policy and its data still adapts."""
    import os
    import subprocess
    import sys

    script = """
import os
os.environ.pop("TF_USE_LEGACY_KERAS", None)
import tensorflow as tf
assert tf.keras.layers.Dense.__module__.startswith("keras."), tf.keras.layers.Dense.__module__
from metarl_tf.agents import as_tf_agents_policy, episodes_from_trajectories
from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.envs import Navigation2D
from metarl_tf.envs.tf_agents_env import tf_agents_environment
from metarl_tf.policy import make_policy
from tf_agents.drivers import dynamic_episode_driver
from tf_agents.replay_buffers import tf_uniform_replay_buffer
dist = Navigation2D(horizon=6)
policy = make_policy(dist.observation_spec, dist.action_spec, (8,))
bundle = load_bundle(save_bundle(sys.argv[1], policy, 0.1, dist, adaptation={
    "steps": 1, "gamma": 0.99, "gae_lambda": 1.0, "baseline": "linear"}))
tfa = as_tf_agents_policy(bundle)
env = tf_agents_environment(dist, dist.sample_tasks(1, 0)[0], parallel=2)
buffer = tf_uniform_replay_buffer.TFUniformReplayBuffer(tfa.trajectory_spec, 2, 100)
dynamic_episode_driver.DynamicEpisodeDriver(env, tfa, [buffer.add_batch], num_episodes=2).run()
adapted = bundle.adapt(episodes_from_trajectories(buffer.gather_all()))
assert tf.keras.layers.Dense.__module__.startswith("keras.")
print("ok", adapted.num_episodes)
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    out = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, str(tmp_path / "b")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0 and "ok " in out.stdout, out.stdout + out.stderr
