"""The TRPO outer step: conjugate gradient vs ``numpy.linalg.solve``; the Gauss-Newton product
``Jᵀ F J v`` vs the exact Hessian-vector product of the mean KL through the adaptation; and a full
meta-step on sampled Nav2D data, with its KL bound and improvement re-checked independently."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_not_close, assert_within
from references import numpy_log_prob, numpy_mean_kl, reference_mean_kl

from metarl_tf.advantages import compute_advantages
from metarl_tf.config import get_preset
from metarl_tf.curvature import GaussianFisher, InnerLossHessian
from metarl_tf.envs import Navigation2D
from metarl_tf.maml import Adapter, adapt, adaptation_jvp, adaptation_vjp
from metarl_tf.outer import MetaBatch, conjugate_gradient, mean_kl, surrogate_loss, trpo_meta_step
from metarl_tf.outer.trpo import fisher_vector_product
from metarl_tf.rollout import Sampler
from metarl_tf.training.trainer import MetaTrainer


def random_spd(n, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    return m @ m.T + 0.5 * np.eye(n), rng.normal(size=n)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_conjugate_gradient_solves_spd_system(mode):
    a, b = random_spd(7, seed=0)
    a_t = tf.constant(a)

    def matvec(parts):  # vectors are lists of tensors: here shapes [3] and [2, 2]
        flat = tf.concat([parts[0], tf.reshape(parts[1], [-1])], 0)
        out = tf.linalg.matvec(a_t, flat)
        return [out[:3], tf.reshape(out[3:], [2, 2])]

    def solve(b0, b1):
        return conjugate_gradient(matvec, [b0, b1], iterations=20, tolerance=1e-20)

    fn = tf.function(solve) if mode == "function" else solve
    x = fn(tf.constant(b[:3]), tf.constant(b[3:].reshape(2, 2)))
    got = np.concatenate([x[0].numpy(), x[1].numpy().ravel()])
    # CG's rounding is amplified by the condition number of A (about 20 here)
    assert_close(got, np.linalg.solve(a, b), ulps=128)


def counting_matvec(a):
    """``(matvec of the matrix a on one-tensor vectors, list that grows by one per call)``."""
    a_t, calls = tf.constant(a), []

    def matvec(parts):
        calls.append(1)
        return [tf.linalg.matvec(a_t, parts[0])]

    return matvec, calls


def test_conjugate_gradient_stops_at_tolerance_and_respects_iterations():
    a, b = random_spd(5, seed=1)
    matvec, calls = counting_matvec(a)

    # exact after at most n = 5 iterations in exact arithmetic; the tolerance stops it there
    x = conjugate_gradient(matvec, [tf.constant(b)], iterations=50, tolerance=1e-16)
    # CG's rounding is amplified by the condition number of A (about 20 here)
    assert_close(x[0].numpy(), np.linalg.solve(a, b), ulps=256)
    assert len(calls) <= 7
    # one iteration: the steepest-descent step (bᵀb / bᵀAb) b
    x1 = conjugate_gradient(matvec, [tf.constant(b)], iterations=1)
    assert_close(x1[0].numpy(), (b @ b) / (b @ a @ b) * b, ulps=8)


@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_conjugate_gradient_quadratic_form_equals_explicit_product(iterations):
    # TRPO's step length uses xᵀAx; CG returns it from its residual instead of one more product.
    a, b = random_spd(7, seed=2)
    matvec, calls = counting_matvec(a)

    x, quad = conjugate_gradient(
        matvec, [tf.constant(b)], iterations=iterations, tolerance=0.0, return_quadratic=True
    )
    x = x[0].numpy()
    assert_close(quad.numpy(), x @ a @ x, ulps=16)
    assert len(calls) == iterations  # no extra product for the quadratic form
    # float32, as in training: still within float rounding of the explicit product
    x32, quad32 = conjugate_gradient(
        lambda p: [tf.linalg.matvec(tf.constant(a, tf.float32), p[0])],
        [tf.constant(b, tf.float32)],
        iterations=iterations,
        return_quadratic=True,
    )
    x32 = x32[0].numpy().astype(np.float64)
    assert_close(quad32.numpy(), x32 @ a @ x32, ulps=32)


# -- the trust-region curvature ---------------------------------------------------------------


@pytest.fixture
def curvature_setup(make_policy, synthetic_batch, to_tensors):
    policy = make_policy(hidden=(4,))
    inner = to_tensors(synthetic_batch(tasks=2, episodes=2, horizon=4, seed=1))
    outer = to_tensors(synthetic_batch(tasks=2, episodes=2, horizon=4, seed=2))
    rng = np.random.default_rng(3)
    inner_adv = tf.constant(rng.normal(size=inner.mask.shape) * inner.mask.numpy(), tf.float32)
    theta = [tf.constant(p) for p in policy.get_parameters()]
    alphas = [tf.constant(rng.uniform(0.1, 0.6, p.shape), tf.float32) for p in theta]
    return policy, inner, outer, inner_adv, theta, alphas


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize("analytic", [False, True], ids=["autodiff", "analytic"])
def test_gauss_newton_product_equals_exact_kl_hessian_through_adaptation(
    curvature_setup, steps, meta_sgd, analytic
):
    policy, inner, outer, inner_adv, theta, alphas = curvature_setup
    sizes = alphas if meta_sgd else 0.4
    variables = theta + (alphas if meta_sgd else [])
    rng = np.random.default_rng(4)
    v = [tf.constant(rng.normal(size=x.shape), tf.float32) for x in variables]

    result = adapt(policy, theta, sizes, inner, inner_adv, steps)
    old_mean, old_log_std = policy.forward(result.params, outer.observations)

    def kl_through_adaptation(values):
        th, al = values[: len(theta)], values[len(theta) :]
        adapted = adapt(policy, th, al if meta_sgd else sizes, inner, inner_adv, steps).params
        return reference_mean_kl(policy, adapted, outer, old_mean, old_log_std)

    # exact Hessian-vector product, reverse over reverse, at the point where old = new
    with tf.GradientTape() as outer_tape:
        outer_tape.watch(variables)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(variables)
            kl = kl_through_adaptation(variables)
        grad = inner_tape.gradient(kl, variables)
        grad_dot_v = tf.add_n([tf.reduce_sum(g * x) for g, x in zip(grad, v, strict=True)])
    expected = outer_tape.gradient(grad_dot_v, variables)
    # at θ_old the KL and its gradient vanish: what remains is rounding of O(1) terms, summed
    # over every step of the batch for the gradient
    assert_close(kl, 0.0, ulps=8, scale=1.0)
    assert_close(grad, [tf.zeros_like(g) for g in grad], ulps=256, scale=1.0)

    if analytic:
        hessians = [InnerLossHessian(p, inner, inner_adv, "tanh") for p, _ in result.trace]
        fisher = GaussianFisher(result.params, outer, "tanh")
    else:
        hessians = None

        def fisher(u):
            return fisher_vector_product(policy, result.params, outer, u)

    v_theta, v_alpha = v[: len(theta)], (v[len(theta) :] if meta_sgd else None)
    u = adaptation_jvp(policy, result, sizes, inner, inner_adv, v_theta, v_alpha, False, hessians)
    h_theta, h_alpha = adaptation_vjp(
        policy, result, sizes, inner, inner_adv, fisher(u), meta_sgd, False, hessians
    )
    got = h_theta + (h_alpha or [])
    assert_close(got, expected, ulps=32)
    flat_got = np.concatenate([g.numpy().ravel() for g in got])
    # and it is positive semi-definite along v (a Fisher): vᵀ H v >= 0
    assert float(flat_got @ np.concatenate([x.numpy().ravel() for x in v])) >= 0


def test_fisher_vector_product_equals_kl_hessian_at_fixed_params(curvature_setup):
    policy, _, outer, _, theta, _ = curvature_setup
    rng = np.random.default_rng(5)
    params = [tf.constant(np.stack([p.numpy(), p.numpy() * 0.9])) for p in theta]
    u = [tf.constant(rng.normal(size=p.shape), tf.float32) for p in params]
    old_mean, old_log_std = policy.forward(params, outer.observations)
    with tf.GradientTape() as t2:
        t2.watch(params)
        with tf.GradientTape() as t1:
            t1.watch(params)
            kl = reference_mean_kl(policy, params, outer, old_mean, old_log_std)
        g = t1.gradient(kl, params)
        gu = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, u, strict=True)])
    expected = t2.gradient(gu, params)
    for got in (
        fisher_vector_product(policy, params, outer, u),
        GaussianFisher(params, outer, "tanh")(u),
    ):
        for a, b in zip(got, expected, strict=True):
            assert_close(a.numpy(), b.numpy(), ulps=16)


def test_mean_kl_and_surrogate_match_reference(curvature_setup):
    policy, _, outer, _, theta, _ = curvature_setup
    params = [tf.stack([p, p * 0.9]) for p in theta]
    other = [tf.stack([p * 1.1, p]) for p in theta]
    old_mean, old_log_std = policy.forward(params, outer.observations)
    assert_close(
        mean_kl(policy, other, outer, old_mean, old_log_std).numpy(),
        reference_mean_kl(policy, other, outer, old_mean, old_log_std).numpy(),
        ulps=8,
    )
    rng = np.random.default_rng(6)
    adv = tf.constant(rng.normal(size=outer.mask.shape) * outer.mask.numpy(), tf.float32)
    old_logp = numpy_log_prob(policy, params, outer)
    expected = numpy_surrogate(numpy_log_prob(policy, other, outer), old_logp, adv.numpy(), outer)
    got = surrogate_loss(policy, other, outer, adv, tf.constant(old_logp, tf.float32))
    assert_close(got.numpy(), expected, ulps=16)


# -- the full meta-step -----------------------------------------------------------------------


def numpy_surrogate(log_prob, old_log_prob, adv, episodes):
    m = np.asarray(episodes.mask, np.float64)
    per_task = np.sum(np.exp(log_prob - old_log_prob) * adv * m, (1, 2)) / m.sum((1, 2))
    return -per_task.mean()


def sampled_meta_batch(policy, sizes, seed=0):
    """Real Nav2D data, as the trainer builds it: 2 tasks x 2 episodes x horizon 6."""
    dist = Navigation2D(horizon=6)
    tasks = dist.sample_tasks(2, seed=seed)
    sampler = Sampler(dist, policy, 2)
    gamma = 0.99
    inner = sampler.sample(policy.parameters, tasks, seed=seed + 1)
    adapted, _, inner_adv = Adapter(policy, sizes, gamma)(policy.parameters, inner, 1)
    outer = sampler.sample(adapted, tasks, seed=seed + 2)
    to_t = lambda b: type(b)(*[tf.constant(x, tf.float32) for x in b])  # noqa: E731
    inner, outer = to_t(inner), to_t(outer)
    return MetaBatch(inner, inner_adv, outer, compute_advantages(outer, gamma))


@pytest.mark.slow
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
def test_trpo_meta_step_respects_kl_bound_and_improves_surrogate(make_policy, meta_sgd):
    policy = make_policy(hidden=(8,), log_std=-0.3)
    sizes = [tf.Variable(tf.fill(s, 0.1)) for s in policy.parameter_shapes] if meta_sgd else 0.1
    batch = sampled_meta_batch(policy, sizes)
    max_kl = 0.01
    theta_before = [tf.constant(p) for p in policy.get_parameters()]
    alphas_before = [tf.constant(s.numpy()) for s in sizes] if meta_sgd else sizes
    old_params = adapt(
        policy, theta_before, alphas_before, batch.inner_episodes, batch.inner_advantages
    ).params
    old_logp = numpy_log_prob(policy, old_params, batch.outer_episodes)

    step = tf.function(
        lambda b: trpo_meta_step(
            policy, sizes, b, learn_step_sizes=meta_sgd, inner_steps=1, first_order=False,
            max_kl=max_kl, cg_iterations=10, cg_damping=1e-5, ls_max_steps=15,
            ls_backtrack_ratio=0.8,
        )
    )  # fmt: skip
    stats = {k: float(v) for k, v in step(batch).items()}

    adv = batch.outer_advantages.numpy()
    # before the step the ratio is 1: the surrogate is minus the mean advantage
    expected = numpy_surrogate(old_logp, old_logp, adv, batch.outer_episodes)
    # a mean of normalized advantages: O(1) terms that cancel, so rounding scales with 1
    assert_close(stats["loss_before"], expected, ulps=16, scale=1.0, dtype=np.float32)
    assert stats["accepted"] == 1.0
    assert 0.0 < stats["kl"] <= max_kl
    assert stats["loss_after"] < stats["loss_before"]
    assert stats["line_search_steps"] >= 1

    # Recompute from the updated variables: adapt again, then KL and surrogate in numpy.
    new_sizes = [tf.constant(s.numpy()) for s in sizes] if meta_sgd else sizes
    new_params = adapt(
        policy, policy.get_parameters(), new_sizes, batch.inner_episodes, batch.inner_advantages
    ).params
    kl = numpy_mean_kl(policy, old_params, new_params, batch.outer_episodes)
    assert kl <= max_kl
    # the KL is a mean of differences of O(1) log-probabilities: rounding scales with those
    assert_close(kl, stats["kl"], ulps=16, scale=1.0, dtype=np.float32)
    new_logp = numpy_log_prob(policy, new_params, batch.outer_episodes)
    loss_after = numpy_surrogate(new_logp, old_logp, adv, batch.outer_episodes)
    # the surrogate is a mean of O(1) advantage-weighted ratios that nearly cancel
    assert_close(loss_after, stats["loss_after"], ulps=16, scale=1.0, dtype=np.float32)
    assert loss_after < stats["loss_before"]
    assert_not_close(policy.get_parameters(), theta_before)
    if meta_sgd:
        assert_not_close(
            sizes, [np.full(s.shape, 0.1) for s in sizes], err_msg="step sizes were not updated"
        )

    # The step s is the natural-gradient step scaled to the trust region: ½ sᵀ H s = max_kl for
    # the full step (H the exact KL Hessian through the adaptation), times the line search's
    # shrink factor squared; and H s is parallel to −∇(surrogate through the adaptation).
    variables = theta_before + (alphas_before if meta_sgd else [])
    after = [tf.constant(p) for p in policy.get_parameters()] + (new_sizes if meta_sgd else [])
    step_vec = [a - b for a, b in zip(after, variables, strict=True)]
    old_mean, old_log_std = policy.forward(old_params, batch.outer_episodes.observations)

    def through_adaptation(values):
        th, al = values[: len(theta_before)], values[len(theta_before) :]
        return adapt(
            policy, th, al if meta_sgd else sizes, batch.inner_episodes, batch.inner_advantages
        ).params

    with tf.GradientTape() as outer_tape:
        outer_tape.watch(variables)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(variables)
            adapted = through_adaptation(variables)
            kl0 = reference_mean_kl(policy, adapted, batch.outer_episodes, old_mean, old_log_std)
        kl_grad = inner_tape.gradient(kl0, variables)
        grad_dot_s = tf.add_n(
            [tf.reduce_sum(g * x) for g, x in zip(kl_grad, step_vec, strict=True)]
        )
    h_s = np.concatenate([h.numpy().ravel() for h in outer_tape.gradient(grad_dot_s, variables)])
    with tf.GradientTape() as tape:
        tape.watch(variables)
        surrogate = surrogate_loss(
            policy, through_adaptation(variables), batch.outer_episodes, batch.outer_advantages,
            tf.constant(old_logp, tf.float32),
        )  # fmt: skip
    loss_grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(surrogate, variables)])
    s_flat = np.concatenate([x.numpy().ravel() for x in step_vec])
    shrink = 0.8 ** (stats["line_search_steps"] - 1)
    quadratic_kl = 0.5 * s_flat @ h_s + 0.5 * 1e-5 * s_flat @ s_flat  # with CG's damping
    why = "CG stops after a few iterations; s is a float32 difference of parameters"
    assert_within(quadratic_kl, shrink**2 * max_kl, atol=2e-2 * shrink**2 * max_kl, why=why)
    cosine = -(h_s @ loss_grad) / np.linalg.norm(h_s) / np.linalg.norm(loss_grad)
    assert cosine > 0.99


@pytest.mark.slow
def test_trpo_meta_step_without_an_acceptable_step_keeps_the_parameters(make_policy):
    policy = make_policy(hidden=(8,))
    batch = sampled_meta_batch(policy, 0.1, seed=3)
    before = policy.get_parameters()
    stats = trpo_meta_step(
        policy, 0.1, batch, learn_step_sizes=False, inner_steps=1, first_order=False,
        max_kl=0.01, cg_iterations=3, cg_damping=1e-5, ls_max_steps=0, ls_backtrack_ratio=0.5,
    )  # fmt: skip
    assert float(stats["accepted"]) == 0.0
    assert float(stats["kl"]) == 0.0
    assert float(stats["loss_after"]) == float(stats["loss_before"])
    for a, b in zip(policy.get_parameters(), before, strict=True):
        assert_exact(a, b)


def test_trpo_lvc_step_is_the_same_with_analytic_and_autodiff_curvature(make_policy):
    """``lvc=True``: the cached analytic products and plain autodiff through the LVC inner loss
    give the same update, and it differs from the plain MAML update (the term is used). Three CG
    iterations: on this tiny, ill-conditioned problem ten amplify float32 round-off to ~0.5%."""
    policy = make_policy(hidden=(8,), log_std=-0.3)
    batch = sampled_meta_batch(policy, 0.1)
    start = [tf.constant(p) for p in policy.get_parameters()]

    def update(lvc, analytic):
        policy.set_parameters(start)
        stats = trpo_meta_step(
            policy, 0.1, batch, learn_step_sizes=False, inner_steps=1, first_order=False,
            max_kl=0.01, cg_iterations=3, cg_damping=1e-5, ls_max_steps=15,
            ls_backtrack_ratio=0.8, analytic_curvature=analytic, lvc=lvc,
        )  # fmt: skip
        assert float(stats["accepted"]) == 1.0
        return np.concatenate(
            [(p - s.numpy()).ravel() for p, s in zip(policy.get_parameters(), start, strict=True)]
        )

    analytic, autodiff, plain = update(True, True), update(True, False), update(False, True)
    assert_close(analytic, autodiff, ulps=64)
    assert np.linalg.norm(analytic - plain) > 1e-2 * np.linalg.norm(plain)
    policy.set_parameters(start)


def test_lvc_is_a_second_order_trpo_config_option():
    config = get_preset("tiny").replace(lvc=True, inner_steps=2, every_step_objective=True)
    row = MetaTrainer(config).train_iteration()
    assert np.isfinite(row["returns/post_adaptation"])
    for bad in ({"outer": "ppo"}, {"first_order": True}):
        with pytest.raises(ValueError, match="lvc changes the second-order terms"):
            get_preset("tiny").replace(lvc=True, **bad)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny", {"hidden_sizes": (8, 3)}),
        ("tiny", {"hidden_sizes": (8, 3), "activation": "relu", "meta_sgd": True}),
        ("tiny", {"inner_steps": 2, "every_step_objective": True, "meta_sgd": True}),
        ("bandit-k5", {"hidden_sizes": (8,), "meta_batch_size": 2, "episodes_per_task": 2}),
    ],
    ids=["tanh-2-layers", "relu-meta-sgd", "every-step", "categorical"],
)
def test_trpo_step_is_the_same_with_analytic_and_autodiff_curvature(preset, overrides):
    """The cached passes (the inner steps' loss and gradient, the surrogate's gradient at θ' from
    the Fisher's forward pass, the Hessian and Fisher products) give the update autodiff does,
    whether the inner steps' passes are carried from the sampling adaptation (the trainer's
    batch) or computed in the step. Three CG iterations, as above: more amplify float32
    round-off on these tiny problems."""
    config = get_preset(preset).replace(**overrides)
    trainer = MetaTrainer(config)
    tasks = trainer.dist.sample_tasks(config.meta_batch_size, 5)
    batch, _ = trainer.sample_meta_batch(tasks, list(range(1, config.inner_steps + 1)), 9)
    assert len(batch.inner_curvature) == config.inner_steps
    variables = trainer._meta_variables
    start = [tf.constant(v.numpy()) for v in variables]

    def update(analytic, batch=batch):
        for v, s in zip(variables, start, strict=True):
            v.assign(s)
        stats = trpo_meta_step(
            trainer.policy, trainer.step_sizes, batch, learn_step_sizes=config.meta_sgd,
            inner_steps=config.inner_steps, first_order=False, max_kl=0.01, cg_iterations=3,
            cg_damping=1e-5, ls_max_steps=15, ls_backtrack_ratio=0.8,
            analytic_curvature=analytic, every_step_objective=config.every_step_objective,
        )  # fmt: skip
        moved = zip(variables, start, strict=True)
        step = np.concatenate([(v.numpy() - s.numpy()).ravel() for v, s in moved])
        return step, {k: float(x) for k, x in stats.items()}

    (analytic, stats_a), (autodiff, stats_b) = update(True), update(False)
    not_carried, stats_c = update(True, batch._replace(inner_curvature=None))
    assert stats_a["accepted"] == stats_b["accepted"] == stats_c["accepted"] == 1.0
    assert np.linalg.norm(analytic) > 0
    # a CG solve on Fisher products and a line search on top of the two curvature routes
    assert_close(analytic, autodiff, ulps=128)
    assert_close(analytic, not_carried, ulps=16)
    for key in ("loss_before", "loss_after", "kl", "inner_loss"):
        # the losses and the KL (~1e-2) are means of O(1) terms that nearly cancel: 1024 ulps of
        # their value is a few ulps of the terms
        assert_close(stats_a[key], stats_b[key], ulps=1024, dtype=np.float32, err_msg=key)
        assert_close(stats_a[key], stats_c[key], ulps=64, dtype=np.float32, err_msg=key)


def test_trainer_carries_the_inner_curvature_only_to_second_order_trpo():
    """Second-order TRPO gets the inner steps' cached passes with its batch (one per step);
    first order, PPO and Adam need none and get none. A wrong count is refused."""
    batches = {}
    for name, overrides in [
        ("second order", {"inner_steps": 2}),
        ("first order", {"first_order": True}),
        ("ppo", {"outer": "ppo"}),
        ("adam", {"outer": "adam"}),
    ]:
        config = get_preset("tiny").replace(**overrides)
        trainer = MetaTrainer(config)
        tasks = trainer.dist.sample_tasks(config.meta_batch_size, 5)
        seeds = list(range(1, config.inner_steps + 1))
        batches[name] = (trainer, trainer.sample_meta_batch(tasks, seeds, 9)[0])
    for name in ("first order", "ppo", "adam"):
        assert batches[name][1].inner_curvature is None, name
    trainer, batch = batches["second order"]
    assert len(batch.inner_curvature) == 2
    kwargs = dict(
        learn_step_sizes=False, inner_steps=2, first_order=False, max_kl=0.01, cg_iterations=1,
        cg_damping=1e-5, ls_max_steps=1, ls_backtrack_ratio=0.8,
    )  # fmt: skip
    short = batch._replace(inner_curvature=batch.inner_curvature[:1])
    with pytest.raises(ValueError, match=r"2 \(one per inner step\) expected, got 1"):
        trpo_meta_step(trainer.policy, trainer.step_sizes, short, **kwargs)
    # passes cached at other parameters (a batch sampled before an update) are refused
    kernel = trainer.policy.parameters[0]
    kernel.assign(kernel + 0.01)
    with pytest.raises(tf.errors.InvalidArgumentError, match="computed at other parameters"):
        trpo_meta_step(trainer.policy, trainer.step_sizes, batch, **kwargs)
