"""Inner adaptation (MAML / Meta-SGD) against hand-written references: one SGD step from a
per-task ``GradientTape`` on a loss written here, the second-order meta-gradient against central
finite differences (float64), and the adaptation JVP/VJP against autodiff through ``adapt``."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_fd_close, assert_not_close
from references import central_differences, reference_loss

from metarl_tf.advantages import compute_advantages
from metarl_tf.curvature import InnerLossHessian
from metarl_tf.maml import (
    Adapter,
    adapt,
    adaptation_jvp,
    adaptation_vjp,
    inner_gradients,
    policy_gradient_loss,
)


def task_data(batch, adv, i):
    return batch.observations[i], batch.actions[i], batch.mask[i], adv[i]


def reference_sgd(params, step_sizes, batch, adv, steps):
    """Per task: ``steps`` plain SGD steps ``θ ← θ − α ⊙ ∇L_i(θ)`` with a GradientTape each."""
    adapted, losses = [], []
    for i in range(batch.mask.shape[0]):
        theta = [tf.constant(p) for p in params]
        task_losses = []
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = reference_loss(theta, *task_data(batch, adv, i))
            grads = tape.gradient(loss, theta)
            sizes = step_sizes if isinstance(step_sizes, list) else [step_sizes] * len(theta)
            theta = [p - a * g for p, a, g in zip(theta, sizes, grads, strict=True)]
            task_losses.append(float(loss))
        adapted.append([p.numpy() for p in theta])
        losses.append(task_losses)
    return adapted, np.array(losses).T  # [steps, tasks]


@pytest.fixture
def setup(make_policy, synthetic_batch, to_tensors):
    """A tiny policy (hidden (4,)), 2 tasks x 2 episodes x horizon 4, random advantages; float64
    copies of everything for the derivative checks."""
    policy = make_policy(hidden=(4,))
    inner = synthetic_batch(tasks=2, episodes=2, horizon=4, seed=1, dtype=np.float64)
    outer = synthetic_batch(tasks=2, episodes=2, horizon=4, seed=2, dtype=np.float64)
    rng = np.random.default_rng(3)
    inner_adv = rng.normal(size=inner.mask.shape) * inner.mask
    outer_adv = rng.normal(size=outer.mask.shape) * outer.mask
    theta = [tf.constant(p, tf.float64) for p in policy.get_parameters()]
    alphas = [tf.constant(rng.uniform(0.1, 0.6, p.shape), tf.float64) for p in theta]
    return {
        "policy": policy,
        "inner": to_tensors(inner, tf.float64),
        "outer": to_tensors(outer, tf.float64),
        "inner_adv": tf.constant(inner_adv),
        "outer_adv": tf.constant(outer_adv),
        "theta": theta,
        "alphas": alphas,
    }


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
def test_adapt_equals_hand_written_sgd(setup, steps, meta_sgd, run_mode):
    s = setup
    sizes = s["alphas"] if meta_sgd else 0.5
    fn = run_mode(lambda theta: adapt(s["policy"], theta, sizes, s["inner"], s["inner_adv"], steps))
    result = fn(s["theta"])
    ref_sizes = [a.numpy() for a in s["alphas"]] if meta_sgd else 0.5
    ref_params, ref_losses = reference_sgd(
        [p.numpy() for p in s["theta"]], ref_sizes, s["inner"], s["inner_adv"], steps
    )
    for j, p in enumerate(result.params):
        assert p.shape == (2, *s["theta"][j].shape)
        for i in range(2):
            assert_close(p[i].numpy(), ref_params[i][j], ulps=16)
    assert_close(result.losses.numpy(), ref_losses, ulps=8)
    assert_not_close(ref_params[0][0], ref_params[1][0])  # the tasks adapted differently


def test_adapt_with_per_task_params_steps_from_each_tasks_own_point(setup):
    s = setup
    rng = np.random.default_rng(4)
    per_task = [np.stack([p.numpy(), p.numpy() + rng.normal(0, 0.2, p.shape)]) for p in s["theta"]]
    result = adapt(s["policy"], [tf.constant(p) for p in per_task], 0.5, s["inner"], s["inner_adv"])
    for i in range(2):
        ref, _ = reference_sgd([p[i] for p in per_task], 0.5, s["inner"], s["inner_adv"], 1)
        for j, p in enumerate(result.params):
            assert_close(p[i].numpy(), ref[i][j], ulps=16)


def test_policy_gradient_loss_and_inner_gradients_match_reference(setup):
    s = setup
    params = [tf.stack([p, 1.1 * p]) for p in s["theta"]]
    losses, grads = inner_gradients(s["policy"], params, s["inner"], s["inner_adv"])
    assert_close(
        losses.numpy(),
        policy_gradient_loss(s["policy"], params, s["inner"], s["inner_adv"]).numpy(),
        ulps=8,
    )
    for i in range(2):
        theta_i = [p[i] for p in params]
        with tf.GradientTape() as tape:
            tape.watch(theta_i)
            loss = reference_loss(theta_i, *task_data(s["inner"], s["inner_adv"], i))
        assert_close(losses[i].numpy(), loss.numpy(), ulps=64)
        for g, ref in zip(grads, tape.gradient(loss, theta_i), strict=True):
            assert_close(g[i].numpy(), ref.numpy(), ulps=64)


# -- the meta-gradient ------------------------------------------------------------------------


def outer_objective(s, theta, sizes, steps, first_order=False):
    """``Σ_i L(θ'_i; D'_i)``: the post-adaptation loss on the outer episodes (written here)."""
    result = adapt(s["policy"], theta, sizes, s["inner"], s["inner_adv"], steps, first_order)
    return tf.add_n(
        [
            reference_loss([p[i] for p in result.params], *task_data(s["outer"], s["outer_adv"], i))
            for i in range(2)
        ]
    )


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(setup, steps):
    s = setup
    alpha = 0.5
    with tf.GradientTape() as tape:
        tape.watch(s["theta"])
        loss = outer_objective(s, s["theta"], alpha, steps)
    grads = tape.gradient(loss, s["theta"])
    fd = central_differences(lambda th: outer_objective(s, th, alpha, steps), s["theta"])
    # The loss grows like exp(c·θ) with c ≈ |∇f| / |f| (about 400 after two steps at α = 0.5,
    # which drive log σ down), so its third derivative, and the differences' truncation error,
    # is about c² times the gradient.
    growth = max(np.abs(f).max() for f in fd) / abs(float(loss))
    assert_fd_close(grads, fd, h=1e-6, curvature=max(1.0, growth**2))

    # The first-order gradient is a different vector: Σ_i ∇L(θ'_i) (the adaptation Jacobian
    # replaced by the identity, FOMAML).
    with tf.GradientTape() as tape:
        tape.watch(s["theta"])
        fo_loss = outer_objective(s, s["theta"], alpha, steps, first_order=True)
    fo_grads = tape.gradient(fo_loss, s["theta"])
    assert_close(float(fo_loss), float(loss), ulps=8)
    diff = np.sqrt(sum(np.sum((a - b.numpy()) ** 2) for a, b in zip(fd, fo_grads, strict=True)))
    norm = np.sqrt(sum(np.sum(a**2) for a in fd))
    assert diff > 1e-2 * norm, "second-order terms should matter at alpha = 0.5"
    adapted = adapt(s["policy"], s["theta"], alpha, s["inner"], s["inner_adv"], steps).params
    fomaml = [np.zeros(p.shape) for p in s["theta"]]
    for i in range(2):
        theta_i = [p[i] for p in adapted]
        with tf.GradientTape() as tape:
            tape.watch(theta_i)
            loss_i = reference_loss(theta_i, *task_data(s["outer"], s["outer_adv"], i))
        fomaml = [
            f + g.numpy() for f, g in zip(fomaml, tape.gradient(loss_i, theta_i), strict=True)
        ]
    assert_close(fo_grads, fomaml, ulps=8)


def test_meta_sgd_step_size_gradient_matches_finite_differences(setup):
    s = setup
    with tf.GradientTape() as tape:
        tape.watch(s["theta"] + s["alphas"])
        loss = outer_objective(s, s["theta"], s["alphas"], 1)
    g_theta, g_alpha = tape.gradient(loss, [s["theta"], s["alphas"]])
    fd_alpha = central_differences(lambda al: outer_objective(s, s["theta"], al, 1), s["alphas"])
    assert_fd_close(g_alpha, fd_alpha, h=1e-6)
    fd_theta = central_differences(lambda th: outer_objective(s, th, s["alphas"], 1), s["theta"])
    assert_fd_close(g_theta, fd_theta, h=1e-6)


# -- JVP / VJP of the adaptation map ------------------------------------------------------


def random_like(tensors, seed, lead=()):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=(*lead, *t.shape)), t.dtype) for t in tensors]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_adaptation_jvp_matches_forward_autodiff(setup, steps, meta_sgd, first_order):
    s = setup
    v_theta = random_like(s["theta"], seed=5)
    v_alpha = random_like(s["alphas"], seed=6) if meta_sgd else None
    sizes = s["alphas"] if meta_sgd else 0.4
    primals = s["theta"] + (s["alphas"] if meta_sgd else [])
    tangents = v_theta + (v_alpha or [])
    with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
        result = adapt(
            s["policy"], s["theta"], sizes, s["inner"], s["inner_adv"], steps, first_order
        )
    expected = [acc.jvp(p) for p in result.params]
    got = adaptation_jvp(
        s["policy"], result, sizes, s["inner"], s["inner_adv"], v_theta, v_alpha, first_order
    )
    assert_close(got, expected, ulps=16)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_adaptation_vjp_matches_reverse_autodiff(setup, steps, meta_sgd, first_order):
    s = setup
    sizes = s["alphas"] if meta_sgd else 0.4
    w = random_like(s["theta"], seed=7, lead=(2,))
    with tf.GradientTape() as tape:
        tape.watch(s["theta"] + s["alphas"])
        result = adapt(
            s["policy"], s["theta"], sizes, s["inner"], s["inner_adv"], steps, first_order
        )
    exp_theta, exp_alpha = tape.gradient(
        result.params, [s["theta"], s["alphas"]], output_gradients=w,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )  # fmt: skip
    got_theta, got_alpha = adaptation_vjp(
        s["policy"], result, sizes, s["inner"], s["inner_adv"], w, meta_sgd, first_order
    )
    assert_close(got_theta, exp_theta, ulps=8)
    if meta_sgd:
        assert_close(got_alpha, exp_alpha, ulps=8)
    else:
        assert got_alpha is None


def test_jvp_and_vjp_are_adjoint(setup):
    # <w, J v> = <Jᵀ w, v> for the (θ, α) ↦ θ' map with two inner steps.
    s = setup
    result = adapt(s["policy"], s["theta"], s["alphas"], s["inner"], s["inner_adv"], 2)
    v_theta, v_alpha = random_like(s["theta"], 8), random_like(s["alphas"], 9)
    w = random_like(s["theta"], 10, lead=(2,))
    jv = adaptation_jvp(
        s["policy"], result, s["alphas"], s["inner"], s["inner_adv"], v_theta, v_alpha
    )
    jt_theta, jt_alpha = adaptation_vjp(
        s["policy"], result, s["alphas"], s["inner"], s["inner_adv"], w, with_steps=True
    )
    lhs = sum(float(tf.reduce_sum(a * b)) for a, b in zip(w, jv, strict=True))
    rhs = sum(
        float(tf.reduce_sum(a * b))
        for a, b in zip(jt_theta + jt_alpha, v_theta + v_alpha, strict=True)
    )
    assert_close(lhs, rhs, ulps=256)  # two float64 dot products over every parameter


# -- eager = compiled -------------------------------------------------------------------------


def test_compiled_adaptation_and_meta_gradient_equal_eager(setup):
    s = setup

    def adapted_and_grad(theta, alphas):
        with tf.GradientTape() as tape:
            tape.watch(theta + alphas)
            loss = outer_objective(s, theta, alphas, 2)
        return loss, tape.gradient(loss, theta + alphas)

    eager = adapted_and_grad(s["theta"], s["alphas"])
    compiled = tf.function(adapted_and_grad)(s["theta"], s["alphas"])
    assert_close(float(compiled[0]), float(eager[0]), ulps=8)
    assert_close(compiled[1], eager[1], ulps=8)


def test_adapter_equals_eager_advantages_plus_adapt(make_policy, synthetic_batch, to_tensors):
    policy = make_policy(hidden=(4,))
    episodes = to_tensors(synthetic_batch(tasks=2, episodes=3, horizon=5, seed=11))
    adapter = Adapter(policy, 0.3, gamma=0.95, gae_lambda=0.9)
    params, losses, advantages = adapter(policy.parameters, episodes, 2)
    ref_adv = compute_advantages(episodes, 0.95, 0.9, "linear")
    ref = adapt(policy, policy.parameters, 0.3, episodes, ref_adv, 2)
    assert_close(advantages.numpy(), ref_adv.numpy(), ulps=8)
    assert_close(losses.numpy(), ref.losses.numpy(), ulps=32)
    assert_close(params, ref.params, ulps=8)
    # the meta-parameters themselves are untouched
    for p, p0 in zip(policy.parameters, make_policy(hidden=(4,)).parameters, strict=True):
        assert_exact(p.numpy(), p0.numpy())


def test_adapter_with_curvature_adapts_as_the_plain_adapter(
    make_policy, synthetic_batch, to_tensors
):
    """The trainer's sampling adaptation for second-order TRPO: the same step (gradient from the
    cached passes, not autodiff), plus the carried passes at the point it adapted from."""
    policy = make_policy(hidden=(4,))
    episodes = to_tensors(synthetic_batch(tasks=2, episodes=3, horizon=5, seed=11))
    sizes = [tf.fill(s, 0.2 + 0.1 * b) for b in range(2) for s in policy.parameter_shapes]
    adapter = Adapter(policy, sizes, gamma=0.95, gae_lambda=0.9)  # Meta-SGD, per-step blocks
    tiled = [tf.stack([tf.convert_to_tensor(p)] * 2) for p in policy.parameters]
    for first_step in (0, 1):
        params, losses, advantages = adapter(tiled, episodes, 1, first_step)
        got = adapter.with_curvature(tiled, episodes, InnerLossHessian, first_step)
        assert_exact(got[2].numpy(), advantages.numpy())
        assert_close(got[1].numpy(), losses.numpy(), ulps=64)
        assert_close(got[0], params, ulps=8)
        restored = InnerLossHessian.restore(got[3], activation=policy.activation, lvc=False)
        _, grads = inner_gradients(policy, tiled, episodes, advantages)
        assert_close(restored.gradient, grads, ulps=32)
    # the two step rules differ (0.2 vs 0.3): the steps above were not the same one twice
    assert_not_close(adapter(tiled, episodes, 1, 0)[0][0], adapter(tiled, episodes, 1, 1)[0][0])
