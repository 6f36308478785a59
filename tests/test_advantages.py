"""Returns, GAE, the linear feature baseline and per-task normalization against independent
references: plain Python loops, TF-Agents' ``value_ops``, and ``numpy.linalg`` solves."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_not_close
from tf_agents.utils import value_ops

from metarl_tf.advantages import (
    compute_advantages,
    discounted_returns,
    generalized_advantages,
    linear_baseline,
    normalize_per_task,
)
from metarl_tf.episodes import EpisodeBatch

GAMMAS = [0.0, 0.5, 0.9, 0.99, 1.0]


def random_episodes(seed, shape=(3, 4), horizon=9):
    """Rewards and values ``[*shape, T]`` with prefix masks; several episodes end early, one has
    length 1 and one is full length. Rewards/values on padding are garbage (nonzero) on purpose:
    the functions must ignore them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, horizon + 1, size=shape)
    lengths.flat[0], lengths.flat[1] = horizon, 1
    mask = (np.arange(horizon) < lengths[..., None]).astype(np.float32)
    rewards = rng.normal(size=(*shape, horizon)).astype(np.float32)
    values = rng.normal(size=(*shape, horizon)).astype(np.float32)
    return rewards, values, mask


def loop_returns(rewards, mask, gamma):
    """``G_t = r_t + gamma G_{t+1}`` inside each episode, 0 on padding (a plain Python loop)."""
    out = np.zeros(rewards.shape, np.float64)
    for idx in np.ndindex(rewards.shape[:-1]):
        g = 0.0
        for t in reversed(range(rewards.shape[-1])):
            if mask[idx][t] == 0:
                g = 0.0
                continue
            g = float(rewards[idx][t]) + gamma * g
            out[idx][t] = g
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    """``A_t = delta_t + gamma lam A_{t+1}``, ``delta_t = r_t + gamma V_{t+1} - V_t``, with
    ``V = 0`` and ``A = 0`` past the last real step (a plain Python loop)."""
    out = np.zeros(rewards.shape, np.float64)
    horizon = rewards.shape[-1]
    for idx in np.ndindex(rewards.shape[:-1]):
        adv = 0.0
        for t in reversed(range(horizon)):
            if mask[idx][t] == 0:
                adv = 0.0
                continue
            real_next = t + 1 < horizon and mask[idx][t + 1] == 1
            next_value = float(values[idx][t + 1]) if real_next else 0.0
            delta = float(rewards[idx][t]) + gamma * next_value - float(values[idx][t])
            adv = delta + gamma * lam * adv
            out[idx][t] = adv
    return out


def numpy_features(observations, mask):
    """rllab's ``LinearFeatureBaseline`` features, built here in numpy."""
    obs = np.clip(observations.astype(np.float64), -10, 10)
    horizon = obs.shape[-2]
    t = np.broadcast_to((np.arange(horizon) / 100.0)[:, None], (*obs.shape[:-1], 1))
    feats = np.concatenate([obs, obs**2, t, t**2, t**3, np.ones_like(t)], axis=-1)
    return feats * mask[..., None]


@pytest.mark.parametrize("gamma", GAMMAS)
def test_discounted_returns_matches_python_loop(gamma, run_mode):
    rewards, _, mask = random_episodes(seed=1)
    fn = run_mode(lambda r, m: discounted_returns(r, m, gamma))
    got = fn(tf.constant(rewards), tf.constant(mask)).numpy()
    assert_close(got, loop_returns(rewards, mask, gamma), ulps=16)
    assert np.all(got[mask == 0] == 0.0)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_generalized_advantages_matches_python_loop(gamma, lam, run_mode):
    rewards, values, mask = random_episodes(seed=2)
    fn = run_mode(lambda r, v, m: generalized_advantages(r, v, m, gamma, lam))
    got = fn(tf.constant(rewards), tf.constant(values), tf.constant(mask)).numpy()
    assert_close(got, loop_gae(rewards, values, mask, gamma, lam), ulps=16)
    assert np.all(got[mask == 0] == 0.0)


def test_gae_with_lambda_one_is_returns_minus_values():
    rewards, values, mask = random_episodes(seed=3)
    adv = generalized_advantages(rewards, values, mask, 0.9, 1.0).numpy()
    expected = (loop_returns(rewards, mask, 0.9) - values) * mask
    assert_close(adv, expected, ulps=16)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_discounted_returns_matches_tf_agents(gamma):
    # TF-Agents is time-major [T, B]; padding is expressed as discount 0 after the episode and
    # zero rewards there (an ended episode bootstraps with value 0).
    rewards, _, mask = random_episodes(seed=4, shape=(6,))
    reference = value_ops.discounted_return(
        rewards=tf.constant((rewards * mask).T),
        discounts=tf.constant((gamma * mask).T),
        time_major=True,
        provide_all_returns=True,
    ).numpy().T * mask  # fmt: skip
    got = discounted_returns(rewards, mask, gamma).numpy()
    assert_close(got, reference, ulps=8)


@pytest.mark.parametrize(("gamma", "lam"), [(0.9, 0.95), (0.99, 1.0), (0.5, 0.0)])
def test_generalized_advantages_matches_tf_agents(gamma, lam):
    rewards, values, mask = random_episodes(seed=5, shape=(6,))
    masked_values = values * mask
    reference = value_ops.generalized_advantage_estimation(
        values=tf.constant(masked_values.T),
        final_value=tf.zeros(mask.shape[0]),
        discounts=tf.constant((gamma * mask).T),
        rewards=tf.constant((rewards * mask).T),
        td_lambda=lam,
        time_major=True,
    ).numpy().T * mask  # fmt: skip
    got = generalized_advantages(rewards, values, mask, gamma, lam).numpy()
    assert_close(got, reference, ulps=32)


def baseline_inputs(seed=6, tasks=3, episodes=3, horizon=12, obs_dim=2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, horizon + 1, size=(tasks, episodes))
    lengths[0, 0] = horizon
    mask = (np.arange(horizon) < lengths[..., None]).astype(np.float32)
    # Some observations beyond the clipping range, so the clip matters.
    obs = rng.normal(0.0, 4.0, size=(tasks, episodes, horizon, obs_dim)).astype(np.float32)
    returns = (rng.normal(size=(tasks, episodes, horizon)) * mask).astype(np.float32)
    return obs, returns, mask


def test_linear_baseline_matches_numpy_ridge_and_lstsq(run_mode):
    obs, returns, mask = baseline_inputs()
    reg = 1e-5
    fn = run_mode(lambda o, g, m: linear_baseline(o, g, m, reg=reg))
    got = fn(tf.constant(obs), tf.constant(returns), tf.constant(mask)).numpy()
    assert got.shape == returns.shape
    assert np.all(got[mask == 0] == 0.0)
    feats = numpy_features(obs, mask)
    for i in range(obs.shape[0]):
        valid = mask[i].reshape(-1) == 1
        x = feats[i].reshape(-1, feats.shape[-1])[valid]
        y = returns[i].reshape(-1)[valid].astype(np.float64)
        w_ridge = np.linalg.solve(x.T @ x + reg * np.eye(x.shape[1]), x.T @ y)
        assert_close(got[i][mask[i] == 1], x @ w_ridge, ulps=8)
        # The same ridge fit as a least-squares problem on the augmented system
        # [X; sqrt(reg) I] w = [y; 0]. (Plain lstsq differs: the t^3 column is tiny, ~1e-3, so
        # the ridge term matters there, as in rllab.)
        x_aug = np.concatenate([x, np.sqrt(reg) * np.eye(x.shape[1])])
        y_aug = np.concatenate([y, np.zeros(x.shape[1])])
        w_lstsq = np.linalg.lstsq(x_aug, y_aug, rcond=None)[0]
        assert_close(got[i][mask[i] == 1], x @ w_lstsq, ulps=8)


def test_linear_baseline_is_fitted_per_task():
    obs, returns, mask = baseline_inputs(seed=7)
    got = linear_baseline(obs, returns, mask).numpy()
    # Changing task 1's targets must not change task 0's or task 2's baseline.
    changed = returns.copy()
    changed[1] += 5.0 * mask[1]
    got2 = linear_baseline(obs, changed, mask).numpy()
    assert_exact(got2[0], got[0])
    assert_exact(got2[2], got[2])
    assert_not_close(got2[1], got[1])


def test_linear_baseline_ignores_padding_content():
    obs, returns, mask = baseline_inputs(seed=8)
    noisy_obs = obs + 100.0 * (1 - mask)[..., None]
    noisy_returns = returns + 100.0 * (1 - mask)
    assert_close(
        linear_baseline(noisy_obs, noisy_returns, mask).numpy(),
        linear_baseline(obs, returns, mask).numpy(),
        ulps=8,
    )


def test_normalize_per_task_gives_masked_zero_mean_unit_std(run_mode):
    rng = np.random.default_rng(9)
    _, _, mask = random_episodes(seed=9, shape=(3, 4))
    adv = (rng.normal(size=mask.shape) * np.array([1.0, 10.0, 0.1])[:, None, None] + 3.0).astype(
        np.float32
    )
    got = run_mode(normalize_per_task)(tf.constant(adv), tf.constant(mask)).numpy()
    assert np.all(got[mask == 0] == 0.0)
    for i in range(mask.shape[0]):
        valid = got[i][mask[i] == 1]
        # float32 mean and std over the batch; the std's rounding is divided by a std < 1
        assert_close(valid.mean(), 0.0, ulps=128, scale=np.abs(valid).max())
        assert_close(valid.std(), 1.0, ulps=128)  # population std, as in the docstring
        ref = adv[i][mask[i] == 1]
        assert_close(valid, (ref - ref.mean()) / ref.std(), ulps=128)


def test_compute_advantages_composes_the_pieces():
    obs, _, mask = baseline_inputs(seed=10, obs_dim=2)
    rng = np.random.default_rng(10)
    rewards = (rng.normal(size=mask.shape) * mask).astype(np.float32)
    batch = EpisodeBatch(obs, np.zeros((*mask.shape, 2), np.float32), rewards, mask)
    gamma = 0.9
    got = compute_advantages(batch, gamma, baseline="linear").numpy()
    returns = loop_returns(rewards, mask, gamma)
    feats = numpy_features(obs, mask)
    expected = np.zeros_like(returns)
    for i in range(mask.shape[0]):
        x = feats[i].reshape(-1, feats.shape[-1])
        y = returns[i].reshape(-1)
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
        a = (returns[i] - (x @ w).reshape(returns[i].shape)) * mask[i]
        v = a[mask[i] == 1]
        expected[i] = (a - v.mean()) / v.std() * mask[i]
    assert_close(got, expected, ulps=16)
    no_baseline = compute_advantages(batch, gamma, baseline="none", normalize=False).numpy()
    assert_close(no_baseline, returns, ulps=16)
    with pytest.raises(ValueError, match="baseline"):
        compute_advantages(batch, gamma, baseline="quadratic")


def test_rank_and_shape_checks_raise_value_error():
    with pytest.raises(ValueError, match="time axis"):
        discounted_returns(tf.constant(1.0), tf.constant(1.0), 0.9)
    with pytest.raises(ValueError, match="mask shape"):
        discounted_returns(tf.zeros([2, 5]), tf.ones([2, 4]), 0.9)
    with pytest.raises(ValueError, match="mask shape"):
        generalized_advantages(tf.zeros([2, 5]), tf.zeros([2, 5]), tf.ones([5]), 0.9, 0.95)


def test_shape_checks_also_fire_under_tf_function():
    fn = tf.function(lambda r, m: discounted_returns(r, m, 0.9))
    with pytest.raises(ValueError, match="mask shape"):
        fn(tf.zeros([2, 5]), tf.ones([2, 4]))
