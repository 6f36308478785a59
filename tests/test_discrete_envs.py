"""The discrete task families: Bernoulli bandits (reward frequencies, seeding, horizon) and
CartPole with varied physics (step for step against gymnasium's CartPole-v1 with the same
parameters), their registries, gymnasium views and ``check_task_distribution``."""

import json

import gymnasium
import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_within

import metarl_tf.envs  # noqa: F401  (registers the gymnasium ids)
from metarl_tf.envs import (
    BernoulliBandit,
    CartPoleVaried,
    check_task_distribution,
    make_task_distribution,
)
from metarl_tf.envs.cartpole import CartPoleBatch

# -- bandits -------------------------------------------------------------------------------------


def test_bandit_rewards_follow_the_arm_means():
    dist = BernoulliBandit(k=3, horizon=2000)
    tasks = [{"means": [0.1, 0.5, 0.9]}, {"means": [0.7, 0.0, 1.0]}]
    env = dist.make_batched_env(tasks, 2)
    assert env.num_envs == 4
    assert_exact(env.reset(), np.ones((4, 1), np.float32))
    for arm in range(3):
        env.seed(arm)
        env.reset()
        rewards = np.array([env.step(np.full(4, arm)).reward for _ in range(2000)])
        assert set(np.unique(rewards)) <= {0.0, 1.0}
        freq = rewards.mean(axis=0)
        expected = np.repeat([t["means"][arm] for t in tasks], 2)
        assert_within(freq, expected, atol=5 * np.sqrt(0.25 / 2000), why="5σ of a frequency")


def test_bandit_is_seeded_ends_at_horizon_and_checks_actions():
    dist = BernoulliBandit(k=4, horizon=3)
    tasks = dist.sample_tasks(2, seed=0)

    def run(seed):
        env = dist.make_batched_env(tasks, 5)
        env.seed(seed)
        env.reset()
        steps = [env.step(np.arange(10) % 4) for _ in range(3)]
        assert [bool(s.done.all()) for s in steps] == [False, False, True]
        return np.array([s.reward for s in steps])

    assert_exact(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
    env = dist.make_batched_env(tasks, 1)
    with pytest.raises(ValueError, match=r"must be in \[0, 3\]"):
        env.step(np.array([0, 4]))
    with pytest.raises(ValueError, match="must be integers"):
        env.step(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="expected 2 discrete actions"):
        env.step(np.array([0, 1, 2]))
    env.step(np.array([[1.0], [3.0]], np.float32))  # float-encoded [N, 1] indices are accepted


def test_bandit_tasks_are_uniform_means():
    tasks = BernoulliBandit(k=5).sample_tasks(2000, seed=3)
    means = np.array([t["means"] for t in tasks])
    assert means.shape == (2000, 5) and means.min() >= 0 and means.max() <= 1
    assert_within(
        means.mean(), 0.5, atol=5 * np.sqrt(1 / 12 / 10_000), why="5σ of the mean of U(0, 1)"
    )
    assert_within(means.var(), 1 / 12, atol=0.05 / 12, why="about 5σ of a variance of 10,000 draws")
    # E[max of 5 uniforms] = 5/6: the oracle's expected return per pull
    assert_within(means.max(1).mean(), 5 / 6, atol=0.01, why="about 5σ of a mean of 2000")
    assert_close(
        BernoulliBandit.oracle_return({"means": [0.2, 0.7]}, 10), 7.0, ulps=8, dtype=np.float32
    )
    assert_close(
        BernoulliBandit.random_return({"means": [0.2, 0.7]}, 10), 4.5, ulps=8, dtype=np.float32
    )


# -- cartpole ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_matches_gymnasium_step_for_step(seed):
    task = CartPoleVaried().sample_tasks(3, seed=seed)[seed]
    gym_env = gymnasium.make("CartPole-v1").unwrapped
    gym_env.length, gym_env.masspole, gym_env.masscart = (
        task["length"],
        task["masspole"],
        task["masscart"],
    )
    gym_env.total_mass = gym_env.masspole + gym_env.masscart
    gym_env.polemass_length = gym_env.masspole * gym_env.length
    gym_obs, _ = gym_env.reset(seed=seed)
    batch = CartPoleVaried(horizon=500).make_batched_env([task], 1)
    batch.reset()
    batch.state = np.array(gym_env.state, np.float64)[None]  # same start state
    rng = np.random.default_rng(seed)
    steps = 0
    while True:
        action = int(rng.integers(2)) if steps % 3 else 1  # mostly random, drift to one side
        gym_obs, gym_reward, terminated, truncated, _ = gym_env.step(action)
        ts = batch.step(np.array([action]))
        steps += 1
        assert_close(batch.state[0], gym_env.state, ulps=8)
        assert_exact(ts.observation[0], gym_obs)
        assert ts.reward[0] == gym_reward
        assert bool(ts.done[0]) == terminated == bool(batch.terminated[0])
        if terminated:
            break
        assert steps < 500
    assert steps > 3  # the episode ran a while
    # after the end: frozen, reward 0
    frozen = batch.state.copy()
    ts = batch.step(np.array([0]))
    assert ts.reward[0] == 0.0 and ts.done[0]
    assert_exact(batch.state, frozen)
    gym_env.close()


def test_cartpole_physics_differ_per_sub_env_and_horizon_truncates():
    dist = CartPoleVaried(horizon=4)
    tasks = [
        {"length": 0.25, "masspole": 0.1, "masscart": 1.0},
        {"length": 1.0, "masspole": 0.2, "masscart": 2.0},
    ]
    env = dist.make_batched_env(tasks, 1)
    env.reset()
    env.state[:] = [0.0, 0.0, 0.05, 0.0]  # same tilted start
    ts = env.step(np.array([0, 0]))
    # the shorter pole falls faster: larger angular acceleration
    assert env.state[0, 3] > env.state[1, 3] > 0
    for _ in range(3):
        ts = env.step(np.array([1, 1]))
    assert ts.done.all() and not env.terminated.any()  # truncated by the horizon, not failed


def test_cartpole_start_states_are_seeded_uniform():
    env = CartPoleBatch(np.full(500, 0.5), np.full(500, 0.1), np.ones(500), horizon=10)
    env.seed(5)
    a = env.reset()
    env.seed(5)
    assert_exact(env.reset(), a)
    assert np.abs(a).max() <= 0.05 and a.dtype == np.float32
    assert np.abs(a).max() > 0.045
    tasks = CartPoleVaried().sample_tasks(1000, seed=0)
    for key, default in (("length", 0.5), ("masspole", 0.1), ("masscart", 1.0)):
        values = np.array([t[key] for t in tasks]) / default
        assert 0.5 <= values.min() < 0.52 and 1.98 < values.max() <= 2.0
        assert_within(values.mean(), 1.25, atol=0.05, why="about 4σ of a mean of 1000")


# -- registries and protocol -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bandit", "cartpole", "nav2d"])
def test_check_task_distribution_passes(name):
    dist = make_task_distribution(name)
    check_task_distribution(dist)
    assert type(dist)(**dist.config()).config() == dist.config()
    tasks = dist.sample_tasks(3, seed=1)
    assert json.loads(json.dumps(tasks)) == tasks


def test_registry_and_specs():
    bandit = make_task_distribution("bandit", k=7, horizon=4)
    assert bandit.config() == {"k": 7, "horizon": 4}
    spec = bandit.action_spec
    assert spec.shape == () and spec.dtype.is_integer
    assert int(spec.minimum) == 0 and int(spec.maximum) == 6
    assert bandit.observation_spec.shape == (1,)
    cart = make_task_distribution("cartpole")
    assert cart.horizon == 200 and cart.observation_spec.shape == (4,)
    assert int(cart.action_spec.maximum) == 1
    with pytest.raises(ValueError, match="k >= 2"):
        BernoulliBandit(k=1)


class DiscreteSpecFromOne(BernoulliBandit):
    @property
    def action_spec(self):
        from tf_agents.specs import tensor_spec

        return tensor_spec.BoundedTensorSpec((), np.int32, minimum=1, maximum=5)


def test_check_task_distribution_rejects_a_discrete_spec_not_starting_at_zero():
    with pytest.raises(ValueError, match="discrete action_spec must be a scalar"):
        check_task_distribution(DiscreteSpecFromOne())


def test_gymnasium_bandit():
    env = gymnasium.make("metarl_tf/BernoulliBandit-v0", task={"means": [0.0, 1.0, 0.0]})
    obs, info = env.reset(seed=0)
    assert_exact(obs, [1.0])
    assert env.action_space.n == 3 and info["task"]["means"] == [0.0, 1.0, 0.0]
    results = [env.step(1) for _ in range(10)]
    assert [r[1] for r in results] == [1.0] * 10
    assert [r[3] for r in results] == [False] * 9 + [True]  # truncated at the horizon
    assert env.step(0)[1] == 0.0
    env.close()
    env = gymnasium.make("metarl_tf/BernoulliBandit-v0", k=4)
    _, a = env.reset(seed=3)
    _, b = env.reset(seed=3)
    assert a == b and len(a["task"]["means"]) == 4


def test_gymnasium_cartpole():
    task = {"length": 0.8, "masspole": 0.15, "masscart": 0.7}
    env = gymnasium.make("metarl_tf/CartPoleVaried-v0", task=task, horizon=500)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["task"] == task
    total, terminated, truncated = 0.0, False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, _ = env.step(1)  # always push right: falls soon
        total += reward
    assert terminated and not truncated and 3 < total < 100
    env.close()
    env = gymnasium.make("metarl_tf/CartPoleVaried-v0", horizon=5)
    env.reset(seed=1)
    out = [env.step(i % 2) for i in range(5)]
    assert [o[3] for o in out] == [False] * 4 + [True]
    env.close()
