"""The Gaussian MLP policy: the functional forward pass vs the Keras model (``__call__`` and
``stateless_call``), batched vs per-task, and the distribution formulas vs numpy closed forms."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_within

from metarl_tf.policy import (
    GaussianMLPPolicy,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_mlp_forward,
    tile_parameters,
)


def numpy_forward(params, obs, activation="tanh"):
    """The MLP in numpy: hidden layers with the activation, a linear mean head."""
    act = np.tanh if activation == "tanh" else (lambda z: np.maximum(z, 0.0))
    *layers, log_std = [np.asarray(p, np.float64) for p in params]
    x = np.asarray(obs, np.float64)
    n = len(layers) // 2
    for i in range(n):
        x = x @ layers[2 * i] + layers[2 * i + 1]
        if i < n - 1:
            x = act(x)
    return x, np.broadcast_to(log_std, x.shape)


def random_params(policy, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.7, size=s).astype(np.float32) for s in policy.parameter_shapes]


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [(4,), (8, 3)])
def test_forward_with_unbatched_params_equals_keras_call(make_policy, activation, hidden, run_mode):
    policy = make_policy(hidden=hidden, obs_dim=3, act_dim=2, activation=activation)
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    mean, log_std = run_mode(lambda p, o: gaussian_mlp_forward(p, o, activation))(
        policy.parameters, tf.constant(obs)
    )
    ref_mean, ref_log_std = policy(obs)
    assert_close(mean.numpy(), ref_mean.numpy(), ulps=8)
    assert_close(log_std.numpy(), ref_log_std.numpy(), ulps=8)
    np_mean, np_log_std = numpy_forward(policy.get_parameters(), obs, activation)
    assert_close(mean.numpy(), np_mean, ulps=8)
    assert_close(log_std.numpy(), np_log_std, ulps=8)


def test_forward_with_given_params_equals_stateless_call(make_policy):
    policy = make_policy(hidden=(8, 3), obs_dim=3, act_dim=2)
    new_params = random_params(policy, seed=5)
    # Keras orders trainable_variables its own way (log_std first here); map by identity.
    position = {id(v): i for i, v in enumerate(policy.parameters)}
    assert sorted(position) == sorted(id(v) for v in policy.trainable_variables)
    trainable = [new_params[position[id(v)]] for v in policy.trainable_variables]
    non_trainable = [v.numpy() for v in policy.non_trainable_variables]
    obs = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    before = policy.get_parameters()

    (ref_mean, ref_log_std), _ = policy.stateless_call(trainable, non_trainable, obs)
    mean, log_std = gaussian_mlp_forward(new_params, obs)
    assert_close(mean.numpy(), np.asarray(ref_mean), ulps=8)
    assert_close(log_std.numpy(), np.asarray(ref_log_std), ulps=8)
    assert_close(mean.numpy(), numpy_forward(new_params, obs)[0], ulps=32)
    # the functional call did not touch the model's variables
    for b, a in zip(before, policy.get_parameters(), strict=True):
        assert_exact(a, b)


@pytest.mark.parametrize("obs_shape", [(6,), (2, 5)], ids=["tasks-N", "tasks-E-T"])
def test_batched_params_equal_per_task_calls(make_policy, obs_shape, run_mode):
    policy = make_policy(hidden=(4,), obs_dim=2, act_dim=3)
    tasks = 3
    per_task = [random_params(policy, seed=10 + i) for i in range(tasks)]
    batched = [np.stack(ps) for ps in zip(*per_task, strict=True)]
    obs = np.random.default_rng(3).normal(size=(tasks, *obs_shape, 2)).astype(np.float32)
    mean, log_std = run_mode(gaussian_mlp_forward)(batched, tf.constant(obs))
    assert mean.shape == (tasks, *obs_shape, 3) and log_std.shape == mean.shape
    for i in range(tasks):
        ref_mean, ref_log_std = gaussian_mlp_forward(per_task[i], obs[i])
        assert_close(mean[i].numpy(), ref_mean.numpy(), ulps=16)
        assert_close(log_std[i].numpy(), ref_log_std.numpy(), ulps=8)
        assert_close(mean[i].numpy(), numpy_forward(per_task[i], obs[i])[0], ulps=8)


def test_tile_parameters_gives_every_task_the_same_policy(make_policy):
    policy = make_policy()
    tiled = tile_parameters(policy.parameters, 3)
    assert [tuple(t.shape) for t in tiled] == [(3, *s) for s in policy.parameter_shapes]
    obs = np.random.default_rng(4).normal(size=(3, 4, 2)).astype(np.float32)
    mean, _ = gaussian_mlp_forward(tiled, obs)
    for i in range(3):
        assert_close(mean[i].numpy(), policy(obs[i])[0].numpy(), ulps=8)


def test_forward_works_in_float64(make_policy):
    policy = make_policy()
    params64 = [tf.constant(p, tf.float64) for p in policy.get_parameters()]
    obs = np.random.default_rng(5).normal(size=(4, 2))
    mean, log_std = gaussian_mlp_forward(params64, tf.constant(obs))
    assert mean.dtype == tf.float64 and log_std.dtype == tf.float64
    assert_close(mean.numpy(), numpy_forward(policy.get_parameters(), obs)[0], ulps=8)


def numpy_mvn_log_density(mean, std, x):
    """log N(x; mean, diag(std^2)) from the matrix form of the multivariate normal density."""
    cov = np.diag(std**2)
    d = x - mean
    _, logdet = np.linalg.slogdet(2 * np.pi * cov)
    return -0.5 * d @ np.linalg.solve(cov, d) - 0.5 * logdet


def test_gaussian_log_prob_matches_density_formula(run_mode):
    rng = np.random.default_rng(6)
    mean = rng.normal(size=(4, 5, 3))
    log_std = rng.normal(0, 0.5, size=(4, 5, 3))
    x = rng.normal(size=(4, 5, 3))
    got = run_mode(gaussian_log_prob)(*(tf.constant(v) for v in (mean, log_std, x))).numpy()
    assert got.shape == (4, 5)
    ref = np.array(
        [
            [numpy_mvn_log_density(mean[i, j], np.exp(log_std[i, j]), x[i, j]) for j in range(5)]
            for i in range(4)
        ]
    )
    assert_close(got, ref, ulps=32)


def numpy_kl(mean_p, std_p, mean_q, std_q):
    """KL(N_p || N_q) for full covariance matrices (here diagonal), the textbook formula."""
    cov_p, cov_q = np.diag(std_p**2), np.diag(std_q**2)
    inv_q = np.linalg.inv(cov_q)
    d = mean_q - mean_p
    k = len(mean_p)
    return 0.5 * (
        np.trace(inv_q @ cov_p)
        + d @ inv_q @ d
        - k
        + np.log(np.linalg.det(cov_q) / np.linalg.det(cov_p))
    )


def test_gaussian_kl_matches_closed_form_and_monte_carlo(run_mode):
    rng = np.random.default_rng(7)
    mp, mq = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    lp, lq = rng.normal(0, 0.4, size=(6, 2)), rng.normal(0, 0.4, size=(6, 2))
    got = run_mode(gaussian_kl)(*(tf.constant(v) for v in (mp, lp, mq, lq))).numpy()
    ref = [numpy_kl(mp[i], np.exp(lp[i]), mq[i], np.exp(lq[i])) for i in range(6)]
    assert_close(got, ref, ulps=16)
    assert np.all(got >= 0)
    # Monte Carlo: E_p[log p(x) - log q(x)] with samples of p, log densities from numpy.
    n = 200_000
    x = mp[0] + np.exp(lp[0]) * rng.standard_normal((n, 2))

    def log_density(m, ls):
        return np.sum(-0.5 * ((x - m) / np.exp(ls)) ** 2 - ls - 0.5 * np.log(2 * np.pi), axis=1)

    samples = log_density(mp[0], lp[0]) - log_density(mq[0], lq[0])
    atol = 5 * samples.std() / np.sqrt(n)
    assert_within(samples.mean(), got[0], atol=atol, why="5 standard errors of a Monte Carlo mean")


def test_gaussian_kl_is_zero_for_identical_distributions():
    m, ls = tf.constant([[0.3, -1.0]]), tf.constant([[-0.5, 0.2]])
    assert_close(gaussian_kl(m, ls, m, ls).numpy(), 0.0, ulps=8, scale=1.0)  # O(1) terms


def test_gaussian_entropy_matches_closed_form_and_monte_carlo():
    rng = np.random.default_rng(8)
    log_std = rng.normal(0, 0.5, size=(3, 2))
    got = gaussian_entropy(tf.constant(log_std)).numpy()
    ref = [0.5 * np.linalg.slogdet(2 * np.pi * np.e * np.diag(np.exp(2 * ls)))[1] for ls in log_std]
    assert_close(got, ref, ulps=8)
    n = 200_000
    x = np.exp(log_std[0]) * rng.standard_normal((n, 2))
    neg_log_p = -gaussian_log_prob(tf.zeros((n, 2), tf.float64), tf.constant(log_std[0]), x)
    neg_log_p = neg_log_p.numpy()
    atol = 5 * neg_log_p.std() / math.sqrt(n)
    assert_within(
        neg_log_p.mean(), got[0], atol=atol, why="5 standard errors of a Monte Carlo mean"
    )


def test_parameter_order_names_and_shapes(make_policy):
    policy = make_policy(hidden=(8, 3), obs_dim=3, act_dim=2)
    assert policy.parameter_names == [
        "hidden_0/kernel",
        "hidden_0/bias",
        "hidden_1/kernel",
        "hidden_1/bias",
        "mean/kernel",
        "mean/bias",
        "log_std",
    ]
    assert policy.parameter_shapes == [(3, 8), (8,), (8, 3), (3,), (3, 2), (2,), (2,)]


def test_set_parameters_checks_shapes(make_policy):
    policy = make_policy()
    values = policy.get_parameters()
    values[1] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"'hidden_0/bias': expected shape \[4\], got \[5\]"):
        policy.set_parameters(values)
    with pytest.raises(ValueError, match="expected 5 parameter arrays"):
        policy.set_parameters(values[:-1])


def test_init_log_std_and_bad_activation():
    policy = GaussianMLPPolicy(2, 3, (4,), init_log_std=-1.25)
    assert_exact(policy.log_std.numpy(), [-1.25] * 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        GaussianMLPPolicy(2, 2, (4,), activation="sigmoid")


def test_config_round_trip(make_policy):
    policy = make_policy(hidden=(8, 3), activation="relu")
    clone = GaussianMLPPolicy.from_config(policy.get_config())
    assert clone.parameter_shapes == policy.parameter_shapes
    assert clone.activation == "relu"
    clone.set_parameters(policy.get_parameters())
    obs = np.ones((2, 2), np.float32)
    assert_close(clone(obs)[0].numpy(), policy(obs)[0].numpy(), ulps=8)
    assert isinstance(clone, keras.Model)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_library_numpy_forward_equals_the_tensorflow_forward(make_policy, activation):
    from metarl_tf.policy import numpy_forward as library_numpy_forward

    policy = make_policy(hidden=(8, 3), obs_dim=2, act_dim=2, activation=activation)
    obs = np.random.default_rng(9).normal(size=(5, 2)).astype(np.float32)
    params = policy.get_parameters()
    mean, log_std = library_numpy_forward(params, obs, activation)
    ref_mean, ref_log_std = gaussian_mlp_forward(params, obs, activation)
    assert_close(mean, ref_mean.numpy(), ulps=16)
    assert_exact(log_std, ref_log_std.numpy())
    # per-task parameters [tasks, *shape] with observations [tasks, N, obs_dim]
    per_task = [random_params(policy, seed=20 + i) for i in range(3)]
    batched = [np.stack(ps) for ps in zip(*per_task, strict=True)]
    obs3 = np.random.default_rng(10).normal(size=(3, 4, 2)).astype(np.float32)
    mean, log_std = library_numpy_forward(batched, obs3, activation)
    assert mean.shape == log_std.shape == (3, 4, 2)
    for i in range(3):
        assert_close(mean[i], numpy_forward(per_task[i], obs3[i], activation)[0], ulps=16)
        assert_close(log_std[i], np.broadcast_to(per_task[i][-1], (4, 2)), ulps=1)
