"""The cached analytic curvature products (``metarl_tf.curvature``) against reverse-over-reverse
autodiff Hessian-vector products, for deeper networks and both activations."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close
from references import hessian_vector_product

from metarl_tf import curvature
from metarl_tf.curvature import GaussianFisher, InnerLossHessian
from metarl_tf.maml import inner_gradients, inner_hvp, policy_gradient_loss
from metarl_tf.outer.trpo import fisher_vector_product
from metarl_tf.policy import gaussian_kl


# obs_dim 2 takes the inner-loss Hessian's first-layer shortcut (a narrow input), 9 the general
# R-backward (test_first_layer_shortcut_is_taken_for_narrow_inputs checks which is which).
@pytest.fixture(
    params=[
        ("tanh", (8, 3), 2),
        ("tanh", (8, 3), 9),
        ("relu", (8, 3), 2),
        ("relu", (8, 3), 9),
        ("tanh", (4,), 2),
        ("tanh", (4,), 9),
    ],
    ids=lambda p: f"{p[0]}-{'x'.join(map(str, p[1]))}-obs{p[2]}",
)
def per_task_setup(request, make_policy, synthetic_batch, to_tensors, two_task_point):
    activation, hidden, obs_dim = request.param
    policy = make_policy(hidden=hidden, activation=activation, obs_dim=obs_dim)
    episodes = to_tensors(synthetic_batch(tasks=2, episodes=2, horizon=5, obs_dim=obs_dim, seed=1))
    return policy, episodes, *two_task_point(policy, episodes, seed=2, scale=0.2)


def test_inner_loss_hessian_matches_autodiff(per_task_setup):
    policy, episodes, params, adv, v = per_task_setup

    def total_loss(p):  # tasks are independent: the Hessian of the sum is block-diagonal
        return tf.reduce_sum(policy_gradient_loss(policy, p, episodes, adv))

    expected = hessian_vector_product(total_loss, params, v)
    assert_close(InnerLossHessian(params, episodes, adv, policy.activation)(v), expected, ulps=64)
    assert_close(inner_hvp(policy, params, episodes, adv, v), expected, ulps=32)


def test_first_layer_shortcut_is_taken_for_narrow_inputs(per_task_setup):
    policy, episodes, params, adv, _ = per_task_setup
    h = InnerLossHessian(params, episodes, adv, policy.activation)
    # obs 2 (3 wide with the constant) must take it and obs 9 must not, whatever the threshold
    assert 3 <= curvature._NARROW_INPUT_MAX < 10
    narrow = episodes.observations.shape[-1] == 2
    assert (h.backward_cache.first is not None) == narrow
    if narrow:  # the tanh cross term of the first hidden layer is cached too; ReLU has none
        assert (h.backward_cache.first.q is not None) == (policy.activation == "tanh")


def test_inner_loss_hessian_gives_the_loss_and_gradient_of_autodiff(per_task_setup):
    # TRPO's inner steps take L and ∇L from the cached passes (maml.adapt's `gradients` hook)
    policy, episodes, params, adv, _ = per_task_setup
    losses, grads = inner_gradients(policy, params, episodes, adv)
    h = InnerLossHessian(params, episodes, adv, policy.activation)
    # a mean of advantage-weighted log-probabilities that nearly cancel, summed in another order
    assert_close(h.loss.numpy(), losses.numpy(), ulps=128)
    assert_close(h.gradient, grads, ulps=32)


def test_gaussian_fisher_matches_autodiff(per_task_setup):
    policy, episodes, params, _, v = per_task_setup
    old_mean, old_log_std = policy.forward(params, episodes.observations)

    def mean_kl(p):
        mean, log_std = policy.forward(p, episodes.observations)
        kl = gaussian_kl(old_mean, old_log_std, mean, log_std)
        m = episodes.mask
        return tf.reduce_mean(tf.reduce_sum(kl * m, [1, 2]) / tf.reduce_sum(m, [1, 2]))

    expected = hessian_vector_product(mean_kl, params, v)
    assert_close(GaussianFisher(params, episodes, policy.activation)(v), expected, ulps=16)
    assert_close(fisher_vector_product(policy, params, episodes, v), expected, ulps=16)


@pytest.mark.parametrize("narrow_max", [0, 2], ids=["streamed", "jacobian"])
def test_gaussian_fisher_gives_the_forward_pass_and_surrogate_gradient(
    per_task_setup, check_fisher_objective, monkeypatch, narrow_max
):
    # with and without the first-layer Jacobian shortcut (a 2-wide output takes it at 2)
    monkeypatch.setattr(curvature, "_NARROW_OUTPUT_MAX", narrow_max)
    policy, episodes, params, adv, v = per_task_setup
    fisher = check_fisher_objective(GaussianFisher, policy, episodes, params, adv, v)
    assert (fisher.first is not None) == (narrow_max == 2)


def test_unknown_activation_has_no_analytic_curvature(synthetic_batch, to_tensors, make_policy):
    policy = make_policy()
    episodes = to_tensors(synthetic_batch())
    params = [tf.constant(np.stack([p, p])) for p in policy.get_parameters()]
    with pytest.raises(ValueError, match="no analytic curvature for activation 'gelu'"):
        GaussianFisher(params, episodes, "gelu")


def outer_product_term(policy, params, episodes, adv, v):
    """``−Σ_n w_n (g_n · v) g_n`` per task, ``g_n = ∇log π(a_n|s_n)`` from a per-sample
    autodiff Jacobian and ``w = mask·Â / Σ mask``: the LVC Hessian's extra term, written out."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        log_prob = policy.log_prob(policy.forward(params, episodes.observations), episodes.actions)
        flat = tf.reshape(log_prob, [-1])
    jac = tape.jacobian(flat, params)  # per parameter: [tasks*E*T, tasks, *shape]
    mask = episodes.mask.numpy()
    w = (mask * adv.numpy() / mask.sum(axis=(1, 2), keepdims=True)).ravel()
    tasks = mask.shape[0]
    task_of = np.repeat(np.arange(tasks), mask[0].size)
    jac = [j.numpy().reshape(len(w), tasks, -1)[np.arange(len(w)), task_of] for j in jac]
    g = np.concatenate(jac, axis=1)  # [samples, n_params] (each sample's own task's block)
    vv = np.concatenate([x.numpy().reshape(tasks, -1) for x in v], axis=1)[task_of]
    term = -(w * np.sum(g * vv, axis=1))[:, None] * g
    per_task = np.stack([term[task_of == t].sum(0) for t in range(tasks)])
    sizes = [int(np.prod(x.shape[1:])) for x in v]
    parts = np.split(per_task, np.cumsum(sizes)[:-1], axis=1)
    return [tf.constant(p.reshape(x.shape), tf.float32) for p, x in zip(parts, v, strict=True)]


def test_lvc_loss_has_the_plain_loss_value_and_gradient(per_task_setup):
    policy, episodes, params, adv, _ = per_task_setup
    losses, grads = inner_gradients(policy, params, episodes, adv)
    lvc_losses, lvc_grads = inner_gradients(policy, params, episodes, adv, lvc=True)
    assert_close(lvc_losses.numpy(), losses.numpy(), ulps=8)
    assert_close(lvc_grads, grads, ulps=8)
    h = InnerLossHessian(params, episodes, adv, policy.activation, lvc=True)
    # a mean of advantage-weighted log-probabilities that nearly cancel, summed in another order
    assert_close(h.loss.numpy(), losses.numpy(), ulps=128)
    assert_close(h.gradient, grads, ulps=32)


def test_lvc_hessian_is_the_plain_one_plus_the_score_outer_product(per_task_setup):
    policy, episodes, params, adv, v = per_task_setup

    def total_lvc_loss(p):
        return tf.reduce_sum(policy_gradient_loss(policy, p, episodes, adv, lvc=True))

    plain = hessian_vector_product(
        lambda p: tf.reduce_sum(policy_gradient_loss(policy, p, episodes, adv)), params, v
    )
    extra = outer_product_term(policy, params, episodes, adv, v)
    expected = [a + b for a, b in zip(plain, extra, strict=True)]
    # Hessian-vector products: two passes of autodiff against the analytic forms, each a sum
    # over every step of every episode
    assert_close(hessian_vector_product(total_lvc_loss, params, v), expected, ulps=128)
    assert_close(
        InnerLossHessian(params, episodes, adv, policy.activation, lvc=True)(v), expected, ulps=128
    )
    assert_close(inner_hvp(policy, params, episodes, adv, v, lvc=True), expected, ulps=128)
    # the term is not negligible here, so the test tells the two Hessians apart
    flat = np.concatenate([x.numpy().ravel() for x in extra])
    assert np.linalg.norm(flat) > 0.1 * np.linalg.norm(
        np.concatenate([x.numpy().ravel() for x in plain])
    )


@pytest.mark.parametrize("lvc", [False, True], ids=["plain", "lvc"])
def test_carried_inner_loss_hessian_restores_in_another_function(
    per_task_setup, check_carried_hessian, lvc
):
    # The trainer builds it while adapting for sampling; the TRPO meta-step restores it
    # (MetaBatch.inner_curvature) and must get what building it afresh gives.
    check_carried_hessian(InnerLossHessian, *per_task_setup, lvc=lvc)


def test_products_of_a_policy_without_hidden_layer_match_autodiff(
    make_policy, synthetic_batch, to_tensors, check_fisher_objective, two_task_point
):
    # a linear policy: no first-layer shortcut of either kind applies
    policy = make_policy(hidden=())
    episodes = to_tensors(synthetic_batch(tasks=2, episodes=2, horizon=5, seed=4))
    params, adv, v = two_task_point(policy, episodes, seed=5, scale=0.2)
    fisher = check_fisher_objective(GaussianFisher, policy, episodes, params, adv, v)
    assert fisher.first is None
    h = InnerLossHessian(params, episodes, adv, policy.activation)
    assert h.backward_cache.first is None
    assert_close(h(v), inner_hvp(policy, params, episodes, adv, v), ulps=16)


@pytest.mark.parametrize(
    "activation, hidden, act_dim",
    [("relu", (7, 5, 3), 1), ("tanh", (6, 4), 2), ("relu", (5,), 2)],
    ids=["relu-7x5x3-out1", "tanh-6x4-out2", "relu-5-out2"],
)
def test_fisher_jacobian_shortcut_in_a_function_of_unknown_sizes(
    make_policy, synthetic_batch, to_tensors, two_task_point, activation, hidden, act_dim
):
    # deeper networks (the Jacobian's build loop runs twice for 3 hidden layers), a 1-wide output,
    # and tasks/episodes/steps unknown when traced: the products keep the parameters' shapes
    policy = make_policy(hidden=hidden, activation=activation, act_dim=act_dim, seed=2)
    episodes = to_tensors(synthetic_batch(tasks=2, episodes=3, horizon=5, act_dim=act_dim, seed=6))
    params, _, u = two_task_point(policy, episodes, seed=7, scale=0.2)
    per_task = [tf.TensorSpec([None, *p.shape[1:]], tf.float32) for p in params]
    batch_spec = type(episodes)(
        *[tf.TensorSpec([None, None, None, *x.shape[3:]], tf.float32) for x in episodes]
    )

    @tf.function(input_signature=[per_task, batch_spec, per_task])
    def product(params, episodes, u):
        fisher = GaussianFisher(params, episodes, activation)
        assert fisher.first is not None
        out = fisher(u)
        assert [x.shape[1:] for x in out] == [p.shape[1:] for p in params]
        return out

    assert_close(
        product(params, episodes, u), fisher_vector_product(policy, params, episodes, u), ulps=8
    )
