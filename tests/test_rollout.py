"""The batched sampler (shapes, masks, seeding, per-task weights) and ``pad_episodes``."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_not_close, assert_within
from tf_agents.specs import tensor_spec

from metarl_tf.envs import (
    BatchedEnv,
    Navigation2D,
    TaskDistribution,
    TimeStep,
    check_task_distribution,
)
from metarl_tf.episodes import EpisodeBatch, pad_episodes
from metarl_tf.maml import Adapter
from metarl_tf.rollout import Sampler


def constant_action_params(policy, action, log_std=-8.0):
    """Weights of a policy whose mean action is ``action`` everywhere (zero kernels)."""
    values = [np.zeros(s, np.float32) for s in policy.parameter_shapes]
    values[-2] = np.asarray(action, np.float32)  # mean/bias
    values[-1] = np.full(policy.parameter_shapes[-1], log_std, np.float32)
    return values


def test_sampler_shapes_and_env_consistency(make_policy):
    dist = Navigation2D(horizon=6)
    policy = make_policy(hidden=(4,))
    tasks = dist.sample_tasks(2, seed=3)
    batch = Sampler(dist, policy, episodes_per_task=3).sample(policy.parameters, tasks, seed=0)
    assert isinstance(batch, EpisodeBatch)
    assert batch.observations.shape == (2, 3, 6, 2)
    assert batch.actions.shape == (2, 3, 6, 2)
    assert batch.rewards.shape == (2, 3, 6)
    assert batch.mask.shape == (2, 3, 6)
    assert all(x.dtype == np.float32 for x in batch)
    assert_exact(batch.observations[:, :, 0], 0.0)  # start at the origin
    assert np.all(np.diff(batch.mask, axis=-1) <= 0), "mask must be a prefix of ones"
    # Replay the dynamics independently: the reward at t is minus the distance after the move.
    goals = np.array([t["goal"] for t in tasks])[:, None, None, :]
    after = batch.observations + np.clip(batch.actions, -0.1, 0.1)
    expected_reward = -np.linalg.norm(after - goals, axis=-1) * batch.mask
    assert_close(batch.rewards, expected_reward, ulps=8)
    valid_next = batch.mask[..., 1:] == 1
    assert_close(batch.observations[..., 1:, :][valid_next], after[..., :-1, :][valid_next], ulps=8)
    assert batch.num_steps == int(batch.mask.sum())
    assert_close(batch.episode_returns, batch.rewards.sum(-1), ulps=8)


class Countdown(TaskDistribution):
    """A fake task family: task ``{"length": L}``; episode ``e`` of a task ends after ``L + e``
    steps. The observation is ``[t, L]``; the reward of step ``t`` is ``t + 1`` and stays nonzero
    after the end (a careless env), so the sampler itself must zero the padding."""

    name = "countdown"
    horizon = 6

    @property
    def observation_spec(self):
        return tensor_spec.TensorSpec((2,), np.float32)

    @property
    def action_spec(self):
        return tensor_spec.BoundedTensorSpec((1,), np.float32, -1.0, 1.0)

    def sample_tasks(self, n, seed):
        return [{"length": 1 + (seed + i) % self.horizon} for i in range(n)]

    def make_batched_env(self, tasks, episodes_per_task):
        lengths = [t["length"] + e for t in tasks for e in range(episodes_per_task)]
        return CountdownEnv(np.array(lengths))


class CountdownEnv(BatchedEnv):
    def __init__(self, lengths):
        self.lengths, self.num_envs = lengths, len(lengths)

    def _obs(self):
        return np.stack([np.full(self.num_envs, self.t), self.lengths], 1).astype(np.float32)

    def reset(self):
        self.t = 0
        return self._obs()

    def step(self, actions):
        assert actions.shape == (self.num_envs, 1)
        self.t += 1
        reward = np.full(self.num_envs, float(self.t), np.float32)
        return TimeStep(self._obs(), reward, self.t >= self.lengths)


def test_sampler_masks_and_zero_pads_after_each_episode_ends(make_policy):
    dist = Countdown()
    check_task_distribution(dist)
    policy = make_policy(hidden=(4,), obs_dim=2, act_dim=1)
    tasks = [{"length": 1}, {"length": 4}, {"length": 6}]
    batch = Sampler(dist, policy, 3).sample(policy.parameters, tasks, seed=0)
    assert batch.mask.shape == (3, 3, 6)
    for i, task in enumerate(tasks):
        for e in range(3):
            length = min(task["length"] + e, dist.horizon)
            expected_mask = (np.arange(6) < length).astype(np.float32)
            assert_exact(batch.mask[i, e], expected_mask, err_msg=f"{i}, {e}")
            assert_exact(batch.rewards[i, e], (np.arange(6) + 1) * expected_mask)
            assert_exact(batch.observations[i, e, :length, 0], np.arange(length))
    assert_exact(batch.episode_returns[0], [1, 3, 6])


def test_mask_covers_the_terminating_step_and_padding_is_zero(make_policy):
    dist = Navigation2D(horizon=6)
    policy = make_policy(hidden=(4,))
    # Task 0's policy reaches its goal (0.2, 0) on its 2nd step; task 1's policy, with the same
    # goal, walks away and runs to the horizon.
    params = [
        np.stack(pair)
        for pair in zip(
            constant_action_params(policy, [0.1, 0.0]),
            constant_action_params(policy, [-0.1, 0.0]),
            strict=True,
        )
    ]
    tasks = [{"goal": [0.2, 0.0]}, {"goal": [0.2, 0.0]}]
    batch = Sampler(dist, policy, 2).sample(params, tasks, seed=0, deterministic=True)
    assert_exact(batch.mask[0], [[1, 1, 0, 0, 0, 0]] * 2)
    assert_exact(batch.mask[1], np.ones((2, 6)))
    assert_exact(batch.rewards[0, :, 2:], 0.0)
    assert_close(batch.rewards[0, :, :2], [[-0.1, 0.0]] * 2, ulps=8)
    assert_close(batch.rewards[1, 0], -(0.2 + 0.1 * np.arange(1, 7)), ulps=8)
    assert_close(batch.actions[0, :, :2], [[[0.1, 0.0]] * 2] * 2, ulps=1)


def test_per_task_weights_are_used(make_policy):
    dist = Navigation2D(horizon=4)
    policy = make_policy(hidden=(4,))
    directions = [[100.0, 100.0], [-100.0, 100.0], [0.0, -100.0]]
    params = [
        np.stack(group)
        for group in zip(*[constant_action_params(policy, d) for d in directions], strict=True)
    ]
    tasks = [{"goal": [0.45, -0.45]}] * 3
    batch = Sampler(dist, policy, 2).sample(params, tasks, seed=1)  # stochastic, tiny std
    final = batch.observations[:, :, -1]  # after 3 clipped steps of 0.1 per axis
    assert_close(final[0], [[0.3, 0.3]] * 2, ulps=8)
    assert_close(final[1], [[-0.3, 0.3]] * 2, ulps=8)
    assert_within(final[2], [[0.0, -0.3]] * 2, atol=1e-2, why="x: 3 steps of the tiny σ's noise")


def test_shared_weights_equal_tiled_weights(make_policy):
    dist = Navigation2D(horizon=5)
    policy = make_policy(hidden=(4,))
    tasks = dist.sample_tasks(2, seed=0)
    sampler = Sampler(dist, policy, 2)
    shared = sampler.sample(policy.parameters, tasks, seed=4)
    tiled = sampler.sample([np.stack([p, p]) for p in policy.get_parameters()], tasks, seed=4)
    for a, b in zip(shared, tiled, strict=True):
        assert_close(a, b, ulps=8)


def test_same_seed_same_batch_different_seed_different_batch(make_policy):
    dist = Navigation2D(horizon=5)
    policy = make_policy(hidden=(4,))
    tasks = dist.sample_tasks(2, seed=0)
    sampler = Sampler(dist, policy, 2)
    a = sampler.sample(policy.parameters, tasks, seed=11)
    b = Sampler(dist, policy, 2).sample(policy.parameters, tasks, seed=11)
    c = sampler.sample(policy.parameters, tasks, seed=12)
    for x, y in zip(a, b, strict=True):
        assert_exact(x, y)
    assert_not_close(a.actions, c.actions)
    # episodes of one task differ from each other (independent noise per episode)
    assert_not_close(a.actions[0, 0], a.actions[0, 1])


def test_deterministic_sampling_takes_the_mean(make_policy):
    dist = Navigation2D(horizon=3)
    policy = make_policy(hidden=(4,))
    tasks = dist.sample_tasks(2, seed=0)
    batch = Sampler(dist, policy, 2).sample(policy.parameters, tasks, seed=0, deterministic=True)
    mean, _ = policy(batch.observations.reshape(-1, 2))
    assert_close(batch.actions.reshape(-1, 2), mean.numpy(), ulps=8)


def random_episodes(lengths, obs_dim=2, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.uniform(-0.5, 0.5, size=(t, obs_dim)).astype(np.float32),
            rng.normal(0, 0.3, size=(t, act_dim)).astype(np.float32),
            rng.uniform(-1, 0, size=t).astype(np.float32),
        )
        for t in lengths
    ]


def test_pad_episodes_layout():
    episodes = random_episodes([5, 3, 4])
    batch = pad_episodes(episodes, length=7, num_episodes=4)
    assert batch.observations.shape == (1, 4, 7, 2)
    assert batch.rewards.shape == (1, 4, 7)
    assert_exact(batch.mask[0].sum(-1), [5, 3, 4, 0])
    for e, (o, a, r) in enumerate(episodes):
        assert_exact(batch.observations[0, e, : len(r)], o)
        assert_exact(batch.actions[0, e, : len(r)], a)
        assert_exact(batch.rewards[0, e, : len(r)], r)
        assert_exact(batch.observations[0, e, len(r) :], 0.0)
    default = pad_episodes(episodes)
    assert default.mask.shape == (1, 3, 5)


def test_pad_episodes_errors():
    with pytest.raises(ValueError, match="at least one episode"):
        pad_episodes([])
    with pytest.raises(ValueError, match="episode 0 has 5 steps, more than the padded length 4"):
        pad_episodes(random_episodes([5]), length=4)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
def test_adaptation_is_invariant_to_padding(make_policy, steps, meta_sgd):
    policy = make_policy(hidden=(4,))
    if meta_sgd:
        rng = np.random.default_rng(0)
        sizes = [
            tf.constant(rng.uniform(0.05, 0.5, s), tf.float32) for s in policy.parameter_shapes
        ]
    else:
        sizes = 0.3
    adapter = Adapter(policy, sizes, gamma=0.9)
    episodes = random_episodes([5, 3, 4], seed=1)
    tight = adapter(policy.parameters, pad_episodes(episodes), steps)
    loose = adapter(policy.parameters, pad_episodes(episodes, length=9, num_episodes=5), steps)
    for p_tight, p_loose, p0 in zip(tight[0], loose[0], policy.get_parameters(), strict=True):
        assert_close(p_tight, p_loose, ulps=8)
        assert_not_close(p_tight[0], p0)  # it did adapt
    assert_close(tight[1].numpy(), loose[1].numpy(), ulps=128)  # losses that nearly cancel
    assert_close(tight[2].numpy(), loose[2].numpy()[:, :3, :5], ulps=16)
    assert_exact(loose[2].numpy()[:, 3:], 0.0)
    assert_exact(loose[2].numpy()[:, :, 5:], 0.0)
