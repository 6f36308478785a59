"""Navigation2D dynamics (MAML paper, Sec. 5.3), the task-distribution checker, and the gymnasium
registration."""

import json

import gymnasium
import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_within

import metarl_tf.envs  # noqa: F401  (registers metarl_tf/Navigation2D-v0)
from metarl_tf.envs import (
    Navigation2D,
    TaskDistribution,
    check_task_distribution,
    make_task_distribution,
)


def make_env(goals, horizon=100, episodes=1):
    dist = Navigation2D(horizon=horizon)
    return dist.make_batched_env([{"goal": list(g)} for g in goals], episodes)


def test_starts_at_origin():
    env = make_env([[0.3, -0.2], [-0.1, 0.4]], episodes=2)
    assert env.num_envs == 4
    obs = env.reset()
    assert obs.shape == (4, 2) and obs.dtype == np.float32
    assert_exact(obs, 0.0)


def test_actions_are_clipped_per_axis_and_reward_is_minus_distance_after_the_move():
    goals = np.array([[0.4, 0.4], [-0.3, 0.2], [0.0, -0.45]])
    env = make_env(goals)
    env.reset()
    actions = np.array([[5.0, -0.03], [-0.2, 0.07], [0.0, -100.0]], np.float32)
    ts = env.step(actions)
    expected_pos = np.array([[0.1, -0.03], [-0.1, 0.07], [0.0, -0.1]])
    assert_close(ts.observation, expected_pos, ulps=1)
    expected_reward = -np.sqrt(((expected_pos - goals) ** 2).sum(axis=1))
    assert_close(ts.reward, expected_reward, ulps=8)
    assert not ts.done.any()
    # a second step accumulates from the new position
    ts = env.step(actions)
    assert_close(ts.observation, 2 * expected_pos, ulps=8)
    assert_close(ts.reward, -np.sqrt(((2 * expected_pos - goals) ** 2).sum(axis=1)), ulps=8)


def test_terminates_within_goal_radius_and_freezes_after():
    env = make_env([[0.2, 0.0], [0.2, 0.0], [0.2, 0.0]])
    env.reset()
    # env 0 lands exactly on the goal; env 1 ends 0.009 away (inside 0.01); env 2 ends 0.011 away.
    a = np.array([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0]], np.float32)
    ts = env.step(a)
    assert not ts.done.any()
    ts = env.step(np.array([[0.1, 0.0], [0.091, 0.0], [0.089, 0.0]], np.float32))
    assert_exact(ts.done, [True, True, False])
    assert_close(ts.reward, [0.0, -0.009, -0.011], ulps=64)  # 0.2 - 0.191: cancellation
    # ended sub-envs keep their position and report reward 0
    ts = env.step(np.array([[0.1, 0.1]] * 3, np.float32))
    assert_close(ts.observation[:2], [[0.2, 0.0], [0.191, 0.0]], ulps=8)
    assert_exact(ts.reward[:2], 0.0)
    assert ts.done[:2].all()


@pytest.mark.parametrize("horizon", [100, 7])
def test_truncates_at_horizon(horizon):
    env = make_env([[0.4, 0.4]], horizon=horizon)
    env.reset()
    for t in range(1, horizon + 1):
        ts = env.step(np.zeros((1, 2), np.float32))
        assert bool(ts.done[0]) == (t == horizon), f"done at step {t}"


def test_default_horizon_is_100():
    assert Navigation2D().horizon == 100


def test_reset_restarts_every_episode():
    env = make_env([[0.2, 0.0]])
    env.reset()
    env.step(np.array([[0.1, 0.0]], np.float32))
    env.step(np.array([[0.1, 0.0]], np.float32))
    assert_exact(env.reset(), 0.0)
    ts = env.step(np.array([[0.1, 0.0]], np.float32))
    assert not ts.done[0]
    assert_close(ts.reward, [-0.1], ulps=8)


def test_goals_are_uniform_in_the_square():
    tasks = Navigation2D().sample_tasks(4000, seed=123)
    goals = np.array([t["goal"] for t in tasks])
    assert goals.shape == (4000, 2)
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    # Uniform on [-0.5, 0.5]: mean 0, variance 1/12, a quarter in each quadrant (±5 sigma).
    assert_within(goals.mean(axis=0), 0.0, atol=5 * np.sqrt(1 / 12 / 4000), why="5σ of the mean")
    assert_within(goals.var(axis=0), 1 / 12, atol=0.1 / 12, why="about 5σ of a variance")
    for sx in (-1, 1):
        for sy in (-1, 1):
            frac = np.mean((np.sign(goals[:, 0]) == sx) & (np.sign(goals[:, 1]) == sy))
            assert_within(frac, 0.25, atol=5 * np.sqrt(0.25 * 0.75 / 4000), why="5σ of a fraction")
    # the corners are reached, not just the middle
    assert goals.min() < -0.49 and goals.max() > 0.49


def test_sample_tasks_is_seeded_and_json_serializable():
    dist = Navigation2D()
    a, b, c = dist.sample_tasks(5, seed=7), dist.sample_tasks(5, seed=7), dist.sample_tasks(5, 8)
    assert a == b
    assert a != c
    assert json.loads(json.dumps(a)) == a
    assert all(set(t) == {"goal"} and len(t["goal"]) == 2 for t in a)


def test_make_batched_env_is_task_major():
    dist = Navigation2D(horizon=5)
    tasks = [{"goal": [0.1, 0.0]}, {"goal": [-0.3, 0.3]}]
    env = dist.make_batched_env(tasks, 3)
    env.reset()
    ts = env.step(np.zeros((6, 2), np.float32))
    assert_close(ts.reward[:3], -0.1, ulps=8)
    assert_close(ts.reward[3:], -np.sqrt(0.18), ulps=8)


def test_oracle_variant_appends_the_goal():
    dist = Navigation2D(horizon=5, include_goal=True)
    assert dist.observation_spec.shape == (4,)
    env = dist.make_batched_env([{"goal": [0.3, -0.2]}], 1)
    assert_close(env.reset(), [[0.0, 0.0, 0.3, -0.2]], ulps=1)
    check_task_distribution(dist)


def test_specs_and_registry():
    dist = make_task_distribution("nav2d", horizon=9)
    assert isinstance(dist, Navigation2D) and dist.horizon == 9
    assert dist.observation_spec.shape == (2,)
    assert dist.action_spec.shape == (2,)
    assert_close(dist.action_spec.minimum, -0.1, ulps=1)
    assert_close(dist.action_spec.maximum, 0.1, ulps=1)
    assert Navigation2D(**dist.config()).config() == dist.config()
    with pytest.raises(ValueError, match="unknown task distribution 'nope'.*nav2d"):
        make_task_distribution("nope")


def test_action_scale_maps_normalized_actions_to_velocities():
    # rllab's normalize wrapper of the paper's reference code: velocity = clip(0.1 * a, ±0.1)
    dist = make_task_distribution("nav2d", action_scale=0.1)
    assert_close(dist.action_spec.minimum, -1.0, ulps=1)
    assert_close(dist.action_spec.maximum, 1.0, ulps=1)
    assert dist.config()["action_scale"] == 0.1
    assert Navigation2D(**dist.config()).config() == dist.config()
    assert "action_scale" not in Navigation2D().config()  # older bundles' configs unchanged
    env = dist.make_batched_env([{"goal": [0.4, 0.4]}], 2)
    env.reset()
    ts = env.step(np.array([[0.5, -3.0], [-1.0, 0.2]], np.float32))
    assert_close(ts.observation, [[0.05, -0.1], [-0.1, 0.02]], ulps=1)
    check_task_distribution(dist)
    env = gymnasium.make("metarl_tf/Navigation2D-v0", task={"goal": [0.3, 0.0]}, action_scale=0.1)
    env.reset(seed=0)
    obs, *_ = env.step(np.array([0.5, 2.0], np.float32))
    assert_close(obs, [0.05, 0.1], ulps=1)
    assert env.action_space.high.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="action_scale must be a positive number"):
        Navigation2D(action_scale=0.0)


def test_check_task_distribution_accepts_navigation2d():
    check_task_distribution(Navigation2D())


class WrongObservationShape(Navigation2D):
    @property
    def observation_spec(self):
        from tf_agents.specs import tensor_spec

        return tensor_spec.TensorSpec((2, 2), np.float32)


class ObservationSpecDisagreesWithEnv(Navigation2D):
    @property
    def observation_spec(self):
        from tf_agents.specs import tensor_spec

        return tensor_spec.TensorSpec((3,), np.float32)


class NotReproducible(Navigation2D):
    def sample_tasks(self, n, seed):
        return super().sample_tasks(n, seed=None)


class NotSerializable(Navigation2D):
    def sample_tasks(self, n, seed):
        return [{"goal": np.array(t["goal"])} for t in super().sample_tasks(n, seed)]


class NoHorizon(Navigation2D):
    def __init__(self):
        super().__init__()
        self.horizon = 0


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        (WrongObservationShape(), r"observation_spec must be rank 1 \[obs_dim\], got shape"),
        (
            ObservationSpecDisagreesWithEnv(),
            r"reset\(\) returned shape \(6, 2\), expected \(6, 3\)",
        ),
        (NotReproducible(), "sample_tasks is not reproducible"),
        (NotSerializable(), "tasks must be JSON-serializable"),
        (NoHorizon(), "horizon must be a positive int"),
    ],
    ids=["obs-rank", "obs-shape", "reproducible", "json", "horizon"],
)
def test_check_task_distribution_rejects_broken_distributions(dist, message):
    with pytest.raises(ValueError, match=message) as info:
        check_task_distribution(dist)
    assert type(dist).__name__ in str(info.value)
    assert "does not follow the TaskDistribution protocol" in str(info.value)


def test_task_distribution_is_abstract():
    with pytest.raises(TypeError):
        TaskDistribution()


def test_gymnasium_make_single_task():
    env = gymnasium.make("metarl_tf/Navigation2D-v0", task={"goal": [0.3, -0.2]})
    obs, info = env.reset(seed=0)
    assert_exact(obs, [0.0, 0.0])
    assert info["task"] == {"goal": [0.3, -0.2]}
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, _ = env.step(np.array([0.1, -0.1], np.float32))
    assert_close(obs, [0.1, -0.1], ulps=1)
    assert_close(reward, -np.hypot(0.2, 0.1), ulps=8, dtype=np.float32)
    assert not terminated and not truncated
    env.step(np.array([0.1, -0.1], np.float32))
    obs, reward, terminated, truncated, _ = env.step(np.array([0.5, 0.0], np.float32))  # clipped
    assert_close(obs, [0.3, -0.2], ulps=8)
    assert terminated and not truncated
    assert_close(reward, 0.0, ulps=8, scale=0.3, dtype=np.float32)  # at the goal, |pos| 0.3
    env.close()


def test_gymnasium_truncates_at_horizon_and_samples_tasks_without_one():
    env = gymnasium.make("metarl_tf/Navigation2D-v0", horizon=3)
    _, info_a = env.reset(seed=1)
    _, info_b = env.reset(seed=1)
    _, info_c = env.reset(seed=2)
    assert info_a["task"] == info_b["task"] != info_c["task"]
    goal = np.array(info_c["task"]["goal"])
    assert np.all(np.abs(goal) <= 0.5)
    results = [env.step(np.zeros(2, np.float32)) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]  # truncated
    assert not any(r[2] for r in results)  # not terminated
    env.close()
