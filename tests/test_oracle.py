"""Oracle task distributions: the task parameters appended to the observation (generic wrapper),
checked against Navigation2D's own ``include_goal`` observation."""

import numpy as np
import pytest
from numerics import assert_exact

from metarl_tf.envs import (
    Navigation2D,
    OracleObservation,
    check_task_distribution,
    make_task_distribution,
    oracle_variant,
)


def test_nav2d_oracle_is_registered_and_follows_the_protocol():
    dist = make_task_distribution("nav2d-oracle", horizon=7)
    check_task_distribution(dist)
    assert dist.name == "nav2d-oracle"
    assert dist.observation_spec.shape == (4,)
    assert dist.action_spec == Navigation2D().action_spec
    assert dist.horizon == 7
    # a bundle stores config(); the registry rebuilds the same variant from it
    again = make_task_distribution(dist.name, **dist.config())
    assert again.horizon == 7 and again.observation_spec.shape == (4,)


def test_oracle_samples_the_base_tasks():
    base, oracle = Navigation2D(), make_task_distribution("nav2d-oracle")
    assert oracle.sample_tasks(5, seed=11) == base.sample_tasks(5, seed=11)


def test_oracle_observations_are_position_then_goal_and_rewards_unchanged():
    tasks = Navigation2D().sample_tasks(3, seed=2)
    episodes = 2
    oracle_env = make_task_distribution("nav2d-oracle", horizon=6).make_batched_env(tasks, episodes)
    reference = Navigation2D(horizon=6, include_goal=True).make_batched_env(tasks, episodes)
    plain = Navigation2D(horizon=6).make_batched_env(tasks, episodes)
    assert_exact(oracle_env.reset(), reference.reset())
    plain.reset()
    goals = np.repeat(np.array([t["goal"] for t in tasks], np.float32), episodes, axis=0)
    rng = np.random.default_rng(0)
    for _ in range(6):
        actions = rng.uniform(-0.2, 0.2, size=(6, 2)).astype(np.float32)
        got, ref, base = oracle_env.step(actions), reference.step(actions), plain.step(actions)
        assert_exact(got.observation, ref.observation)
        assert_exact(got.observation[:, :2], base.observation)
        assert_exact(got.observation[:, 2:], goals)  # task-major order
        assert_exact(got.reward, base.reward)
        assert_exact(got.done, base.done)


def test_one_line_registration_of_another_family():
    """What a HalfCheetahVel-style family (task {"velocity": v}) gets: one extra feature."""

    class Scalar(Navigation2D):
        name = "scalar"

        def sample_tasks(self, n, seed):
            return [
                {**t, "velocity": float(i)} for i, t in enumerate(super().sample_tasks(n, seed))
            ]

    build = oracle_variant("scalar-oracle", Scalar, lambda t: [t["velocity"]])
    dist = build(horizon=5)
    check_task_distribution(dist)
    assert dist.observation_spec.shape == (3,)
    obs = dist.make_batched_env(dist.sample_tasks(2, seed=0), 3).reset()
    assert_exact(obs[:, 2], [0, 0, 0, 1, 1, 1])


def test_task_features_of_varying_length_are_refused():
    dist = OracleObservation(Navigation2D(), lambda t: t["goal"][: 1 + (t["goal"][0] > 0)])
    tasks = [{"goal": [0.3, 0.1]}, {"goal": [-0.3, 0.1]}]
    with pytest.raises(ValueError, match="same number of values"):
        dist.make_batched_env(tasks, 1)
