"""The categorical policy (discrete actions): forward pass vs Keras and numpy, log-prob / entropy /
KL vs numpy formulas, inverse-CDF sampling frequencies, the policy factory, the analytic Fisher
and inner-loss Hessian vs reverse-over-reverse autodiff, a TRPO meta-step's KL bound, and the
bundle round trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_within
from references import hessian_vector_product

from metarl_tf import curvature
from metarl_tf.advantages import compute_advantages
from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.client_weights import policy_from_weights, weights_to_json
from metarl_tf.curvature import (
    CategoricalFisher,
    CategoricalInnerLossHessian,
    analytic_curvature_for,
)
from metarl_tf.envs import BernoulliBandit, CartPoleVaried, Navigation2D
from metarl_tf.episodes import EpisodeBatch
from metarl_tf.maml import Adapter, adapt, inner_gradients, inner_hvp, policy_gradient_loss
from metarl_tf.outer import MetaBatch, mean_kl, trpo_meta_step
from metarl_tf.outer.trpo import fisher_vector_product
from metarl_tf.policy import (
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    categorical_entropy,
    categorical_kl,
    categorical_log_prob,
    make_policy,
    numpy_categorical_sample,
    tile_parameters,
)
from metarl_tf.rollout import Sampler


def make_categorical(hidden=(4,), obs_dim=3, k=4, seed=0, activation="tanh"):
    keras.utils.set_random_seed(seed)
    policy = CategoricalMLPPolicy(obs_dim, k, hidden, activation)
    rng = np.random.default_rng(seed)
    policy.set_parameters(
        [rng.normal(0, 0.7, s).astype(np.float32) for s in policy.parameter_shapes]
    )
    return policy


def np_mlp(params, obs, activation="tanh"):
    act = np.tanh if activation == "tanh" else (lambda z: np.maximum(z, 0.0))
    x = np.asarray(obs, np.float64)
    n = len(params) // 2
    for i in range(n):
        x = x @ np.asarray(params[2 * i], np.float64) + np.asarray(params[2 * i + 1], np.float64)
        if i < n - 1:
            x = act(x)
    return x


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def discrete_batch(tasks=2, episodes=2, horizon=5, obs_dim=3, k=4, seed=0):
    """Random episodes with integer (float-encoded) actions and early ends."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, horizon + 1, size=(tasks, episodes))
    lengths[0, 0] = horizon
    mask = (np.arange(horizon) < lengths[..., None]).astype(np.float32)
    obs = rng.uniform(-1, 1, (tasks, episodes, horizon, obs_dim)) * mask[..., None]
    act = rng.integers(0, k, (tasks, episodes, horizon, 1)) * mask[..., None]
    rew = rng.uniform(0, 1, (tasks, episodes, horizon)) * mask
    return EpisodeBatch(*(tf.constant(x, tf.float32) for x in (obs, act, rew, mask)))


# -- the policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_forward_equals_keras_call_and_numpy(activation):
    policy = make_categorical(hidden=(8, 3), activation=activation)
    obs = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    logits = policy.forward(policy.parameters, obs).numpy()
    assert_close(logits, policy(obs).numpy(), ulps=8)
    assert_close(logits, np_mlp(policy.get_parameters(), obs, activation), ulps=8)
    assert logits.shape == (6, 4)


def test_per_task_forward_equals_per_task_calls():
    policy = make_categorical()
    per_task = [make_categorical(seed=s).get_parameters() for s in (1, 2, 3)]
    batched = [tf.constant(np.stack(ps)) for ps in zip(*per_task, strict=True)]
    obs = np.random.default_rng(2).normal(size=(3, 2, 5, 3)).astype(np.float32)
    logits = policy.forward(batched, obs).numpy()
    assert logits.shape == (3, 2, 5, 4)
    for i in range(3):
        assert_close(logits[i], np_mlp(per_task[i], obs[i]), ulps=16)


def test_parameter_names_shapes_and_config_round_trip():
    policy = make_categorical(hidden=(8, 3), obs_dim=2, k=5)
    assert policy.parameter_names == [
        "hidden_0/kernel",
        "hidden_0/bias",
        "hidden_1/kernel",
        "hidden_1/bias",
        "logits/kernel",
        "logits/bias",
    ]
    assert policy.parameter_shapes == [(2, 8), (8,), (8, 3), (3,), (3, 5), (5,)]
    assert policy.act_dim == 1 and policy.num_actions == 5
    clone = CategoricalMLPPolicy.from_config(policy.get_config())
    clone.set_parameters(policy.get_parameters())
    obs = np.ones((2, 2), np.float32)
    assert_exact(clone(obs).numpy(), policy(obs).numpy())
    with pytest.raises(ValueError, match="expected shape"):
        policy.set_parameters([np.zeros((1, 1))] + policy.get_parameters()[1:])
    with pytest.raises(ValueError, match="num_actions must be >= 2"):
        CategoricalMLPPolicy(2, 1)


def test_log_prob_entropy_kl_match_numpy_formulas():
    rng = np.random.default_rng(3)
    lp, lq = rng.normal(size=(4, 6, 5)) * 2, rng.normal(size=(4, 6, 5))
    actions = rng.integers(0, 5, size=(4, 6, 1))
    log_p, log_q = np_log_softmax(lp), np_log_softmax(lq)
    p = np.exp(log_p)
    got = categorical_log_prob(tf.constant(lp), tf.constant(actions, tf.float64)).numpy()
    assert_close(got, np.take_along_axis(log_p, actions, -1)[..., 0], ulps=8)
    ent = categorical_entropy(tf.constant(lp)).numpy()
    assert_close(ent, -(p * log_p).sum(-1), ulps=8)
    kl = categorical_kl(tf.constant(lp), tf.constant(lq)).numpy()
    assert_close(kl, (p * (log_p - log_q)).sum(-1), ulps=16)
    assert np.all(kl > 0)
    assert_close(categorical_kl(tf.constant(lp), tf.constant(lp)), 0.0, ulps=8, scale=1.0)
    # probabilities sum to one over the actions
    all_a = np.arange(5, dtype=np.float64)[:, None, None, None] * np.ones((5, 4, 6, 1))
    lps = categorical_log_prob(tf.constant(np.broadcast_to(lp, (5, 4, 6, 5))), tf.constant(all_a))
    assert_close(np.exp(lps.numpy()).sum(0), 1.0, ulps=8)


def test_inverse_cdf_sampling_frequencies_and_determinism():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    u = np.random.default_rng(4).random(200_000)
    idx = numpy_categorical_sample(np.broadcast_to(logits, (len(u), 4)), u)
    freq = np.bincount(idx, minlength=4) / len(u)
    assert_within(
        freq, [0.1, 0.2, 0.3, 0.4], atol=5 * np.sqrt(0.25 / len(u)), why="5σ of a frequency"
    )
    # boundaries: u just below/at a CDF step
    assert_exact(
        numpy_categorical_sample(
            np.broadcast_to(logits, (4, 4)), np.array([0.0, 0.0999, 0.3, 0.9999])
        ),
        [0, 0, 2, 3],
    )
    policy = make_categorical()
    obs = np.random.default_rng(5).normal(size=(7, 3)).astype(np.float32)
    greedy = policy.numpy_act(policy.get_parameters(), obs, None, deterministic=True)
    assert_exact(greedy[:, 0], np.argmax(policy(obs).numpy(), -1))
    assert greedy.dtype == np.float32 and greedy.shape == (7, 1)


def test_make_policy_picks_the_class_from_the_action_spec():
    bandit = BernoulliBandit(k=7)
    p = make_policy(bandit.observation_spec, bandit.action_spec, (8,))
    assert isinstance(p, CategoricalMLPPolicy) and p.num_actions == 7 and p.obs_dim == 1
    cart = CartPoleVaried()
    p = make_policy(cart.observation_spec, cart.action_spec, (8,), "relu")
    assert isinstance(p, CategoricalMLPPolicy) and p.num_actions == 2 and p.activation == "relu"
    nav = Navigation2D()
    p = make_policy(nav.observation_spec, nav.action_spec, (8,), init_log_std=-1.0)
    assert isinstance(p, GaussianMLPPolicy) and p.act_dim == 2
    assert_close(p.log_std.numpy(), -1.0, ulps=1)
    from tf_agents.specs import tensor_spec

    bad = tensor_spec.BoundedTensorSpec((), np.int32, minimum=1, maximum=3)
    with pytest.raises(ValueError, match="minimum=0"):
        make_policy(nav.observation_spec, bad)


# -- curvature: analytic vs reverse-over-reverse autodiff ----------------------------------------


# obs_dim 3 takes the inner-loss Hessian's first-layer shortcut (metarl_tf.curvature), 9 not.
@pytest.fixture(
    params=[
        ("tanh", (8, 3), 3),
        ("relu", (8, 3), 3),
        ("tanh", (4,), 3),
        ("tanh", (8, 3), 9),
        ("relu", (4,), 9),
    ],
    ids=str,
)
def setup(request, two_task_point):
    activation, hidden, obs_dim = request.param
    policy = make_categorical(hidden=hidden, activation=activation, obs_dim=obs_dim)
    episodes = discrete_batch(seed=1, obs_dim=obs_dim)
    return policy, episodes, *two_task_point(policy, episodes, seed=2, scale=0.3)


def test_categorical_inner_loss_hessian_matches_autodiff(setup):
    policy, episodes, params, adv, v = setup

    def total_loss(p):
        return tf.reduce_sum(policy_gradient_loss(policy, p, episodes, adv))

    expected = hessian_vector_product(total_loss, params, v)
    assert_close(
        CategoricalInnerLossHessian(params, episodes, adv, policy.activation)(v),
        expected,
        ulps=64,
    )
    assert_close(inner_hvp(policy, params, episodes, adv, v), expected, ulps=32)
    # the low-variance-curvature loss: its own autodiff Hessian, which differs from the plain one
    expected_lvc = hessian_vector_product(
        lambda p: tf.reduce_sum(policy_gradient_loss(policy, p, episodes, adv, lvc=True)), params, v
    )
    lvc = CategoricalInnerLossHessian(params, episodes, adv, policy.activation, lvc=True)
    assert_close(lvc(v), expected_lvc, ulps=64)
    diff = np.concatenate(
        [(a - b).numpy().ravel() for a, b in zip(expected_lvc, expected, strict=True)]
    )
    assert np.linalg.norm(diff) > 0.05 * np.linalg.norm(
        np.concatenate([e.numpy().ravel() for e in expected])
    )
    # and the loss and gradient the inner steps of TRPO take from it
    losses, grads = inner_gradients(policy, params, episodes, adv)
    h = CategoricalInnerLossHessian(params, episodes, adv, policy.activation)
    assert_close(h.loss.numpy(), losses.numpy(), ulps=16)
    assert_close(h.gradient, grads, ulps=16)
    # obs 3 took the first-layer shortcut, obs 9 the general R-backward (see the fixture)
    assert (h.backward_cache.first is not None) == (episodes.observations.shape[-1] == 3)


@pytest.mark.parametrize("lvc", [False, True], ids=["plain", "lvc"])
def test_carried_categorical_inner_loss_hessian_restores_in_another_function(
    setup, check_carried_hessian, lvc
):
    check_carried_hessian(CategoricalInnerLossHessian, *setup, lvc=lvc)


def test_categorical_fisher_matches_autodiff_kl_hessian(setup):
    policy, episodes, params, _, v = setup
    old = policy.forward(params, episodes.observations)

    def mean_kl_fn(p):  # the KL written out with numpy-style ops, not the library's
        log_old = tf.nn.log_softmax(old)
        log_new = tf.nn.log_softmax(policy.forward(p, episodes.observations))
        kl = tf.reduce_sum(tf.exp(log_old) * (log_old - log_new), -1)
        m = episodes.mask
        return tf.reduce_mean(tf.reduce_sum(kl * m, [1, 2]) / tf.reduce_sum(m, [1, 2]))

    expected = hessian_vector_product(mean_kl_fn, params, v)
    assert_close(CategoricalFisher(params, episodes, policy.activation)(v), expected, ulps=32)
    assert_close(fisher_vector_product(policy, params, episodes, v), expected, ulps=32)
    assert_close(mean_kl(policy, params, episodes, old).numpy(), 0.0, ulps=8, scale=1.0)
    assert analytic_curvature_for(policy) == (CategoricalInnerLossHessian, CategoricalFisher)


@pytest.mark.parametrize("narrow_max", [2, 4], ids=["streamed", "jacobian"])
def test_categorical_fisher_gives_the_forward_pass_and_surrogate_gradient(
    setup, check_fisher_objective, monkeypatch, narrow_max
):
    # with and without the first-layer Jacobian shortcut (4 actions take it at 4)
    monkeypatch.setattr(curvature, "_NARROW_OUTPUT_MAX", narrow_max)
    policy, episodes, params, adv, v = setup
    fisher = check_fisher_objective(CategoricalFisher, policy, episodes, params, adv, v)
    assert (fisher.first is not None) == (narrow_max == 4)


def test_two_action_fisher_takes_the_jacobian_shortcut_by_default(
    check_fisher_objective, two_task_point
):
    # CartPole-like: 2 actions, at the default _NARROW_OUTPUT_MAX; 2 hidden layers, relu
    policy = make_categorical(hidden=(6, 4), k=2, activation="relu", seed=3)
    episodes = discrete_batch(k=2, seed=8)
    params, adv, v = two_task_point(policy, episodes, seed=9, scale=0.3)
    fisher = check_fisher_objective(CategoricalFisher, policy, episodes, params, adv, v)
    assert fisher.first is not None


def test_inner_step_matches_numpy_gradient():
    """One inner step on the categorical loss equals θ − α ∇L with ∇L from numpy (logit-space
    gradient w (p − onehot), backpropagated through a one-hidden-layer tanh MLP by hand)."""
    policy = make_categorical(hidden=(4,))
    episodes = discrete_batch(tasks=1, seed=3)
    adv = tf.constant(np.random.default_rng(6).normal(size=episodes.mask.shape), tf.float32)
    result = adapt(policy, policy.parameters, 0.3, episodes, adv, steps=1)
    k0, b0, k1, b1 = [p.astype(np.float64) for p in policy.get_parameters()]
    x = episodes.observations.numpy()[0].reshape(-1, 3).astype(np.float64)
    a = episodes.actions.numpy()[0].reshape(-1).astype(int)
    m = episodes.mask.numpy()[0].reshape(-1)
    w = m * adv.numpy()[0].reshape(-1) / m.sum()
    h = np.tanh(x @ k0 + b0)
    p = np.exp(np_log_softmax(h @ k1 + b1))
    d_z = w[:, None] * (p - np.eye(4)[a])
    d_h = d_z @ k1.T * (1 - h**2)
    grads = [x.T @ d_h, d_h.sum(0), h.T @ d_z, d_z.sum(0)]
    for got, p0, g in zip(result.params, (k0, b0, k1, b1), grads, strict=True):
        assert_close(got.numpy()[0], p0 - 0.3 * g, ulps=8)


# -- the whole path on a bandit ------------------------------------------------------------------


@pytest.mark.parametrize("learn_step_sizes", [False, True], ids=["maml", "meta-sgd"])
def test_trpo_meta_step_on_bandits_respects_the_kl_bound(learn_step_sizes):
    dist = BernoulliBandit(k=3, horizon=4)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,))
    sizes = (
        [tf.Variable(tf.fill(s, 0.5)) for s in policy.parameter_shapes] if learn_step_sizes else 0.5
    )
    tasks = dist.sample_tasks(2, seed=0)
    sampler = Sampler(dist, policy, 3)
    inner = sampler.sample(policy.parameters, tasks, 1)
    assert inner.actions.shape == (2, 3, 4, 1)
    assert set(np.unique(inner.actions)) <= {0.0, 1.0, 2.0}
    adapter = Adapter(policy, sizes, 0.0, 1.0, "linear")
    inner_t = EpisodeBatch(*(tf.constant(x, tf.float32) for x in inner))
    adapted, _, inner_adv = adapter(policy.parameters, inner_t, 1)
    outer = sampler.sample(adapted, tasks, 2)
    outer_t = EpisodeBatch(*(tf.constant(x, tf.float32) for x in outer))
    batch = MetaBatch(inner_t, inner_adv, outer_t, compute_advantages(outer_t, 0.0))
    before = policy.get_parameters()
    old_params = adapt(policy, policy.parameters, sizes, inner_t, inner_adv).params
    old_logits = policy.forward(old_params, outer_t.observations)
    stats = trpo_meta_step(
        policy, sizes, batch, learn_step_sizes=learn_step_sizes, inner_steps=1,
        first_order=False, max_kl=0.01, cg_iterations=5, cg_damping=1e-5,
        ls_max_steps=10, ls_backtrack_ratio=0.8,
    )  # fmt: skip
    assert float(stats["accepted"]) == 1.0
    new_params = adapt(policy, policy.parameters, sizes, inner_t, inner_adv).params
    # the KL of the accepted step, recomputed with numpy from the two policies' logits
    lo = np_log_softmax(old_logits.numpy().astype(np.float64))
    ln = np_log_softmax(policy.forward(new_params, outer_t.observations).numpy().astype(np.float64))
    kl = (np.exp(lo) * (lo - ln)).sum(-1)
    mask = outer.mask
    kl_mean = np.mean((kl * mask).sum((1, 2)) / mask.sum((1, 2)))
    assert 0 < kl_mean < 0.01
    # the KL is a mean of differences of O(1) log-probabilities: rounding scales with those
    assert_close(kl_mean, float(stats["kl"]), ulps=8, scale=1.0, dtype=np.float32)
    assert float(stats["loss_after"]) < float(stats["loss_before"])
    assert any(
        not np.array_equal(a, b) for a, b in zip(before, policy.get_parameters(), strict=True)
    )


def test_sampler_is_seeded_and_actions_follow_the_policy():
    dist = BernoulliBandit(k=3, horizon=50)
    policy = make_policy(dist.observation_spec, dist.action_spec, (4,))
    bias = np.log(np.array([0.6, 0.3, 0.1], np.float32))
    params = [np.zeros_like(p) for p in policy.get_parameters()]
    params[-1] = bias  # logits = bias for every observation
    tasks = dist.sample_tasks(2, seed=1)
    sampler = Sampler(dist, policy, 40)
    a, b = sampler.sample(params, tasks, 3), sampler.sample(params, tasks, 3)
    for x, y in zip(a, b, strict=True):
        assert_exact(x, y)
    c = sampler.sample(params, tasks, 4)
    assert not np.array_equal(a.rewards, c.rewards)
    freq = np.bincount(a.actions.astype(int).ravel(), minlength=3) / a.actions.size
    assert_within(freq, [0.6, 0.3, 0.1], atol=0.03, why="4000 pulls: 5σ is about 0.04")
    greedy = sampler.sample(params, tasks, 3, deterministic=True)
    assert_exact(greedy.actions, 0.0)


def test_bundle_round_trip_gives_identical_action_probabilities(tmp_path):
    dist = CartPoleVaried(horizon=6)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,))
    rng = np.random.default_rng(7)
    policy.set_parameters(
        [rng.normal(0, 0.5, s).astype(np.float32) for s in policy.parameter_shapes]
    )
    sizes = [rng.uniform(0.01, 0.2, s).astype(np.float32) for s in policy.parameter_shapes]
    path = save_bundle(
        tmp_path / "cartpole-maml", policy, sizes, dist,
        adaptation={"steps": 1, "gamma": 0.99, "gae_lambda": 1.0, "baseline": "linear"},
    )  # fmt: skip
    bundle = load_bundle(path)
    assert isinstance(bundle.policy, CategoricalMLPPolicy)
    assert bundle.meta["policy"]["config"]["num_actions"] == 2
    assert bundle.meta["action_spec"] == {"shape": [], "dtype": "int32", "minimum": 0, "maximum": 1}
    obs = rng.normal(size=(9, 4)).astype(np.float32)
    assert_exact(tf.nn.softmax(bundle.policy(obs)).numpy(), tf.nn.softmax(policy(obs)).numpy())
    tasks = dist.sample_tasks(2, seed=0)
    a = Sampler(bundle.task_distribution, bundle.policy, 2).sample(
        bundle.policy.parameters, tasks, 5
    )
    b = Sampler(dist, policy, 2).sample(policy.parameters, tasks, 5)
    assert_exact(a.actions, b.actions)
    adapted, _, _ = bundle.make_adapter()(bundle.policy.parameters, a, 1)
    ref = adapt(policy, policy.parameters, [tf.constant(s) for s in sizes],
                EpisodeBatch(*(tf.constant(x, tf.float32) for x in b)),
                compute_advantages(EpisodeBatch(*(tf.constant(x, tf.float32) for x in b)), 0.99)).params  # fmt: skip
    assert_close([x.numpy() for x in adapted], [x.numpy() for x in ref], ulps=8)
    # named weights (the service's JSON form) rebuild the same categorical policy
    local = policy_from_weights(
        weights_to_json(policy.get_parameters(), policy.parameter_names),
        bundle.meta["policy"]["config"],
    )
    assert_exact(local(obs).numpy(), policy(obs).numpy())


def test_tile_parameters_categorical():
    policy = make_categorical()
    tiled = tile_parameters(policy.parameters, 2)
    obs = np.ones((2, 3, 3), np.float32)
    logits = policy.forward(tiled, obs).numpy()
    assert_close(logits[0], logits[1], ulps=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "outer", "meta_sgd"),
    [("bandit", "trpo", False), ("bandit", "adam", True), ("cartpole", "trpo", True)],
)
def test_trainer_checkpoint_bundle_and_evaluation_on_discrete_tasks(
    task, outer, meta_sgd, tmp_path
):
    from metarl_tf.config import get_preset
    from metarl_tf.evaluation.report import evaluate
    from metarl_tf.training.trainer import MetaTrainer

    config = get_preset("tiny").replace(
        task_distribution=task, outer=outer, meta_sgd=meta_sgd, horizon=6, iterations=2
    )
    trainer = MetaTrainer(config)
    assert isinstance(trainer.policy, CategoricalMLPPolicy)
    metrics = [trainer.train_iteration() for _ in range(2)]
    assert all(np.isfinite(m["returns/post_adaptation"]) for m in metrics)
    trainer.save_checkpoint(tmp_path / "ckpt")
    clone = MetaTrainer(config)
    assert clone.restore_checkpoint(tmp_path / "ckpt")
    for a, b in zip(clone.policy.get_parameters(), trainer.policy.get_parameters(), strict=True):
        assert_exact(a, b)
    bundle = load_bundle(trainer.export_bundle(tmp_path / f"{task}-maml"))
    assert bundle.learned_step_sizes == meta_sgd
    result = evaluate(bundle, n_tasks=2, episodes=2, steps=1, seed=0)
    assert len(result["methods"]["maml"]["mean_return"]) == 2
