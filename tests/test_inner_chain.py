"""Multi-step inner adaptation on fresh episodes (one batch per inner step): the chain against
single steps composed by hand; the k = 2 meta-gradient against finite differences (float64); the
chain's JVP/VJP against autodiff; TRPO's Gauss-Newton product through two steps against the exact
KL Hessian; k = 1 equal to the single-batch path; the trainer samples k + 1 batches, batch j with
the policy adapted on batches 1..j−1."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact, assert_fd_close, assert_not_close
from references import central_differences, reference_loss, reference_mean_kl

from metarl_tf.config import get_preset
from metarl_tf.curvature import GaussianFisher, InnerLossHessian, analytic_curvature_for
from metarl_tf.maml import adapt, adaptation_jvp, adaptation_vjp, per_step_batches
from metarl_tf.outer import MetaBatch, trpo_meta_step
from metarl_tf.outer.trpo import fisher_vector_product
from metarl_tf.training.trainer import MetaTrainer


def task(batch, adv, i):
    return batch.observations[i], batch.actions[i], batch.mask[i], adv[i]


def hand_written_chain(theta, batches, advs, sizes_per_step, i, shift=None):
    """Task ``i``'s inner steps by hand, step ``j`` on ``batches[j]`` with
    ``sizes_per_step[j]`` (and ``shift`` added to log σ after step 0): ``(θ after each step,
    loss before each step)``."""
    theta, thetas, losses = list(theta), [], []
    for j, (batch, adv) in enumerate(zip(batches, advs, strict=True)):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = reference_loss(theta, *task(batch, adv, i))
        grads = tape.gradient(loss, theta)
        theta = [p - a * g for p, a, g in zip(theta, sizes_per_step[j], grads, strict=True)]
        if j == 0 and shift is not None:
            theta[-1] = theta[-1] + shift
        thetas.append(theta)
        losses.append(loss)
    return thetas, losses


def assert_task_params(got, expected, i):
    for g, e in zip(got, expected, strict=True):
        assert_close(g[i].numpy(), e.numpy(), ulps=64)


@pytest.fixture
def chain(make_policy, synthetic_batch, to_tensors):
    """hidden (4,), 2 tasks × 2 episodes × horizon 4; inner batches D¹, D² and outer D' all
    different; float64."""
    policy = make_policy(hidden=(4,))
    rng = np.random.default_rng(3)
    batches, advs = [], []
    for seed in (1, 2, 5):
        b = synthetic_batch(tasks=2, episodes=2, horizon=4, seed=seed, dtype=np.float64)
        batches.append(to_tensors(b, tf.float64))
        advs.append(tf.constant(rng.normal(size=b.mask.shape) * b.mask))
    return {
        "policy": policy,
        "inner": tuple(batches[:2]),
        "inner_adv": tuple(advs[:2]),
        "outer": batches[2],
        "outer_adv": advs[2],
        "theta": [tf.constant(p, tf.float64) for p in policy.get_parameters()],
        "alphas": [
            tf.constant(rng.uniform(0.1, 0.6, p.shape), tf.float64) for p in policy.get_parameters()
        ],
    }


def test_chain_equals_hand_written_steps_each_on_its_own_batch(chain, run_mode):
    c = chain
    fn = run_mode(lambda th: adapt(c["policy"], th, c["alphas"], c["inner"], c["inner_adv"]))
    result = fn(c["theta"])
    assert result.losses.shape == (2, 2)
    for i in range(2):
        thetas, losses = hand_written_chain(
            c["theta"], c["inner"], c["inner_adv"], [c["alphas"]] * 2, i
        )
        for j in range(2):
            assert_close(result.losses[j, i].numpy(), losses[j].numpy(), ulps=32)
        assert_task_params(result.params, thetas[-1], i)
    # and it is not the old behaviour (both steps on the first batch)
    same = adapt(c["policy"], c["theta"], c["alphas"], c["inner"][0], c["inner_adv"][0], 2)
    assert_not_close(same.params[0], result.params[0])


def test_per_step_batches_checks_lengths(chain):
    c = chain
    episodes, advs = per_step_batches(c["inner"][0], c["inner_adv"][0], 3)
    assert len(episodes) == len(advs) == 3 and episodes[2] is c["inner"][0]
    with pytest.raises(ValueError, match="2 episode batches and 2 advantage tensors for 3 inner"):
        adapt(c["policy"], c["theta"], 0.1, c["inner"], c["inner_adv"], 3)
    with pytest.raises(ValueError, match="one batch and one advantage tensor per step"):
        per_step_batches(c["inner"], c["inner_adv"][:1])


def outer_objective(c, theta, sizes, first_order=False):
    """``Σ_i L(θ²_i; D'_i)`` after two inner steps on D¹ then D² (written with the reference)."""
    params = adapt(c["policy"], theta, sizes, c["inner"], c["inner_adv"], 2, first_order).params
    return tf.add_n(
        [
            reference_loss([p[i] for p in params], *task(c["outer"], c["outer_adv"], i))
            for i in range(2)
        ]
    )


@pytest.mark.parametrize(
    "meta_sgd", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["maml", "meta-sgd"]
)
def test_two_step_meta_gradient_matches_finite_differences(chain, meta_sgd):
    c = chain
    sizes = c["alphas"] if meta_sgd else 0.5
    variables = c["theta"] + (c["alphas"] if meta_sgd else [])
    n = len(c["theta"])

    def objective(values):
        return outer_objective(c, values[:n], values[n:] if meta_sgd else sizes)

    with tf.GradientTape() as tape:
        tape.watch(variables)
        loss = objective(variables)
    grads = tape.gradient(loss, variables)
    fd = central_differences(objective, variables)
    assert_fd_close(grads, fd, h=1e-6)
    # second order matters here: the first-order gradient is another vector
    with tf.GradientTape() as tape:
        tape.watch(variables)
        fo = outer_objective(c, variables[:n], variables[n:] if meta_sgd else sizes, True)
    fo_grads = tape.gradient(fo, variables)
    diff = np.sqrt(sum(np.sum((a.numpy() - b) ** 2) for a, b in zip(fo_grads, fd, strict=True)))
    assert diff > 1e-2 * np.sqrt(sum(np.sum(b**2) for b in fd))


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_chain_jvp_and_vjp_match_autodiff(chain, meta_sgd, first_order):
    c = chain
    sizes = c["alphas"] if meta_sgd else 0.4
    rng = np.random.default_rng(7)
    v_theta = [tf.constant(rng.normal(size=t.shape)) for t in c["theta"]]
    v_alpha = [tf.constant(rng.normal(size=t.shape)) for t in c["alphas"]] if meta_sgd else None
    w = [tf.constant(rng.normal(size=(2, *t.shape))) for t in c["theta"]]
    primals = c["theta"] + (c["alphas"] if meta_sgd else [])
    with (
        tf.autodiff.ForwardAccumulator(primals, v_theta + (v_alpha or [])) as acc,
        tf.GradientTape() as tape,
    ):
        tape.watch(primals)
        result = adapt(c["policy"], c["theta"], sizes, c["inner"], c["inner_adv"], 2, first_order)
    expected_jvp = [acc.jvp(p) for p in result.params]
    expected_vjp = tape.gradient(result.params, primals, output_gradients=w)
    args = (c["policy"], result, sizes, c["inner"], c["inner_adv"])
    got_jvp = adaptation_jvp(*args, v_theta, v_alpha, first_order)
    got_theta, got_alpha = adaptation_vjp(*args, w, meta_sgd, first_order)
    for g, e in zip(got_jvp, expected_jvp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=16)
    for g, e in zip(got_theta + (got_alpha or []), expected_vjp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=16)


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize(
    "analytic", [pytest.param(False, marks=pytest.mark.slow), True], ids=["autodiff", "analytic"]
)
def test_gauss_newton_product_through_two_fresh_batches_equals_exact_kl_hessian(
    make_policy, synthetic_batch, to_tensors, meta_sgd, analytic
):
    policy = make_policy(hidden=(4,))
    rng = np.random.default_rng(3)
    inner = tuple(to_tensors(synthetic_batch(2, 2, 4, seed=s)) for s in (1, 2))
    inner_adv = tuple(
        tf.constant(rng.normal(size=b.mask.shape) * b.mask.numpy(), tf.float32) for b in inner
    )
    outer = to_tensors(synthetic_batch(2, 2, 4, seed=6))
    theta = [tf.constant(p) for p in policy.get_parameters()]
    alphas = [tf.constant(rng.uniform(0.1, 0.6, p.shape), tf.float32) for p in theta]
    sizes = alphas if meta_sgd else 0.4
    variables = theta + (alphas if meta_sgd else [])
    v = [tf.constant(rng.normal(size=x.shape), tf.float32) for x in variables]
    n = len(theta)

    result = adapt(policy, theta, sizes, inner, inner_adv)
    old_mean, old_log_std = policy.forward(result.params, outer.observations)
    with tf.GradientTape() as outer_tape:
        outer_tape.watch(variables)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(variables)
            adapted = adapt(
                policy, variables[:n], variables[n:] if meta_sgd else sizes, inner, inner_adv
            ).params
            kl = reference_mean_kl(policy, adapted, outer, old_mean, old_log_std)
        grad = inner_tape.gradient(kl, variables)
        grad_dot_v = tf.add_n([tf.reduce_sum(g * x) for g, x in zip(grad, v, strict=True)])
    expected = np.concatenate(
        [e.numpy().ravel() for e in outer_tape.gradient(grad_dot_v, variables)]
    )

    if analytic:
        hessians = [
            InnerLossHessian(p, b, a, "tanh")
            for (p, _), b, a in zip(result.trace, inner, inner_adv, strict=True)
        ]
        fisher = GaussianFisher(result.params, outer, "tanh")
    else:
        hessians = None

        def fisher(u):
            return fisher_vector_product(policy, result.params, outer, u)

    args = (policy, result, sizes, inner, inner_adv)
    u = adaptation_jvp(*args, v[:n], v[n:] if meta_sgd else None, False, hessians)
    h_theta, h_alpha = adaptation_vjp(*args, fisher(u), meta_sgd, False, hessians)
    got = np.concatenate([g.numpy().ravel() for g in h_theta + (h_alpha or [])])
    assert_close(got, expected, ulps=32)
    # the same product with both steps on the first batch is a different matrix
    same = adapt(policy, theta, sizes, inner[0], inner_adv[0], 2)
    u0 = adaptation_jvp(
        policy, same, sizes, inner[0], inner_adv[0], v[:n], v[n:] if meta_sgd else None
    )
    h0 = adaptation_vjp(
        policy, same, sizes, inner[0], inner_adv[0],
        fisher_vector_product(policy, same.params, outer, u0), meta_sgd,
    )  # fmt: skip
    other = np.concatenate([g.numpy().ravel() for g in h0[0] + (h0[1] or [])])
    assert np.linalg.norm(other - expected) > 1e-2 * np.linalg.norm(expected)


# -- k = 1 is the single-batch path; the trainer's sampling ------------------------------------


@pytest.mark.slow
def test_trpo_step_with_a_one_batch_chain_equals_the_single_batch_step(
    make_policy, synthetic_batch, to_tensors
):
    rng = np.random.default_rng(0)
    inner = to_tensors(synthetic_batch(2, 2, 5, seed=1))
    outer = to_tensors(synthetic_batch(2, 2, 5, seed=2))
    inner_adv = tf.constant(rng.normal(size=inner.mask.shape) * inner.mask.numpy(), tf.float32)
    outer_adv = tf.constant(rng.normal(size=outer.mask.shape) * outer.mask.numpy(), tf.float32)
    results = []
    for batch in (
        MetaBatch(inner, inner_adv, outer, outer_adv),
        MetaBatch((inner,), (inner_adv,), outer, outer_adv),
    ):
        policy = make_policy(hidden=(8,))
        stats = trpo_meta_step(
            policy, 0.1, batch, learn_step_sizes=False, inner_steps=1, first_order=False,
            max_kl=0.01, cg_iterations=3, cg_damping=1e-5, ls_max_steps=5, ls_backtrack_ratio=0.8,
        )  # fmt: skip
        results.append(({k: float(x) for k, x in stats.items()}, policy.get_parameters()))
    assert results[0][0] == results[1][0]
    assert results[0][0]["accepted"] == 1.0
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert_exact(a, b)


class CountingSampler:
    """Wraps the trainer's sampler; records the weights and seed of every call."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def sample(self, params, tasks, seed):
        self.calls.append(([np.array(p) for p in params], seed))
        return self.sampler.sample(params, tasks, seed)

    def __getattr__(self, name):  # the rest of the sampler's interface (e.g. ``retries``)
        return getattr(self.sampler, name)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_trainer_samples_k_plus_one_batches_each_with_the_policy_adapted_so_far(k):
    config = get_preset("tiny").replace(inner_steps=k)
    trainer = MetaTrainer(config)
    trainer.sampler = counting = CountingSampler(trainer.sampler)
    theta = trainer.policy.get_parameters()
    task_seed, inner_seed, outer_seed = trainer._seeds(0)
    inner_seeds = trainer._inner_seeds(0, inner_seed)
    metrics = trainer.train_iteration()
    assert len(counting.calls) == k + 1
    assert [seed for _, seed in counting.calls] == [*inner_seeds, outer_seed]
    assert len(set(inner_seeds + [outer_seed])) == k + 1
    # the seeds of k = 1 are those the trainer always used: SeedSequence([seed, iteration])
    assert (task_seed, inner_seeds[0], outer_seed) == tuple(
        int(x) for x in np.random.SeedSequence([config.seed, 0]).generate_state(3)
    )
    tasks = trainer.dist.sample_tasks(config.meta_batch_size, task_seed)
    # replay: batch j must have been collected by θ adapted on batches 1..j−1, one step each
    params = [tf.constant(p) for p in theta]
    for j in range(k + 1):
        used, _ = counting.calls[j]
        for a, b in zip(used, params, strict=True):
            assert_close(a, np.array(b), ulps=8)
        if j < k:
            batch = trainer.sampler.sampler.sample(params, tasks, inner_seeds[j])
            params, _, _ = trainer.adapter(params, batch, 1)
    expected_steps = sum(
        int(trainer.sampler.sampler.sample(p, tasks, s).mask.sum()) for p, s in counting.calls
    )
    assert metrics["charts/env_steps"] == expected_steps <= config.env_steps_per_iteration
    assert [key for key in metrics if key.startswith("returns/after_")] == [
        f"returns/after_{j}_inner_steps" for j in range(1, k)
    ]
    assert trainer._meta_step.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_trainer_with_one_inner_step_equals_the_single_batch_iteration():
    """k = 1 through the chain code equals sample → adapt → sample → meta-step written out."""
    config = get_preset("tiny")
    trainer = MetaTrainer(config)
    metrics = trainer.train_iteration()

    ref = MetaTrainer(config)
    task_seed, inner_seed, outer_seed = (
        int(x) for x in np.random.SeedSequence([config.seed, 0]).generate_state(3)
    )
    tasks = ref.dist.sample_tasks(config.meta_batch_size, task_seed)
    inner = ref.sampler.sample(ref.policy.parameters, tasks, inner_seed)
    inner_t = type(inner)(*[tf.constant(x) for x in inner])
    # second-order TRPO: the inner step's cached passes go with the batch to the meta-step
    hessian_cls, _ = analytic_curvature_for(ref.policy)
    adapted, _, inner_adv, carried = ref.adapter.with_curvature(
        ref.policy.parameters, inner_t, hessian_cls
    )
    outer = ref.sampler.sample(adapted, tasks, outer_seed)
    outer_t = type(outer)(*[tf.constant(x) for x in outer])
    outer_adv = ref._outer_advantages(outer_t)
    stats = ref._meta_step(MetaBatch(inner_t, inner_adv, outer_t, outer_adv, (carried,)))
    for key, value in stats.items():
        assert metrics[f"losses/{key}"] == float(value), key
    assert metrics["returns/pre_adaptation"] == float(np.mean(inner.episode_returns))
    assert metrics["returns/post_adaptation"] == float(np.mean(outer.episode_returns))
    for a, b in zip(trainer.policy.get_parameters(), ref.policy.get_parameters(), strict=True):
        assert_exact(a, b)


def two_batch_chain(synthetic_batch, to_tensors):
    """A ``MetaBatch`` with two fresh inner batches and an outer one (2 tasks × 2 episodes ×
    horizon 5, float32), random advantages."""
    rng = np.random.default_rng(0)
    inner = tuple(to_tensors(synthetic_batch(2, 2, 5, seed=s)) for s in (1, 2))
    inner_adv = tuple(
        tf.constant(rng.normal(size=b.mask.shape) * b.mask.numpy(), tf.float32) for b in inner
    )
    outer = to_tensors(synthetic_batch(2, 2, 5, seed=3))
    outer_adv = tf.constant(rng.normal(size=outer.mask.shape) * outer.mask.numpy(), tf.float32)
    return MetaBatch(inner, inner_adv, outer, outer_adv)


@pytest.mark.parametrize(
    "meta_sgd", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["maml", "meta-sgd"]
)
def test_trpo_and_adam_steps_through_two_fresh_batches(
    make_policy, synthetic_batch, to_tensors, meta_sgd
):
    """TRPO through a 2-batch chain: the KL bound and the improvement, re-checked from the updated
    variables; Adam (as plain SGD) through the chain: θ − lr ∇surrogate."""
    import keras

    from metarl_tf.outer import adam_meta_step, mean_kl, surrogate_loss
    from metarl_tf.policy import gaussian_log_prob

    batch = two_batch_chain(synthetic_batch, to_tensors)
    inner, inner_adv, outer, outer_adv = batch[:4]

    def setup():
        policy = make_policy(hidden=(8,))
        sizes = [tf.Variable(tf.fill(s, 0.1)) for s in policy.parameter_shapes] if meta_sgd else 0.1
        return policy, sizes, list(policy.parameters) + (sizes if meta_sgd else [])

    def adapted(policy, sizes):
        frozen = [tf.constant(s.numpy()) for s in sizes] if meta_sgd else sizes
        return adapt(policy, policy.get_parameters(), frozen, inner, inner_adv).params

    policy, sizes, _ = setup()
    old = adapted(policy, sizes)
    old_mean, old_log_std = policy.forward(old, outer.observations)
    old_logp = gaussian_log_prob(old_mean, old_log_std, outer.actions)
    stats = trpo_meta_step(
        policy, sizes, batch, learn_step_sizes=meta_sgd, inner_steps=2, first_order=False,
        max_kl=0.01, cg_iterations=5, cg_damping=1e-5, ls_max_steps=10, ls_backtrack_ratio=0.8,
    )  # fmt: skip
    assert float(stats["accepted"]) == 1.0
    new = adapted(policy, sizes)
    kl = float(mean_kl(policy, new, outer, old_mean, old_log_std))
    assert 0 < kl <= 0.01
    # the KL is a mean of differences of O(1) log-probabilities: rounding scales with those
    assert_close(kl, float(stats["kl"]), ulps=8, scale=1.0, dtype=np.float32)
    loss_after = float(surrogate_loss(policy, new, outer, outer_adv, old_logp))
    assert_close(loss_after, float(stats["loss_after"]), ulps=8, scale=1.0, dtype=np.float32)
    assert loss_after < float(stats["loss_before"])

    policy, sizes, variables = setup()
    with tf.GradientTape() as tape:
        params = adapt(policy, policy.parameters, sizes, inner, inner_adv).params
        mean, log_std = policy.forward(params, outer.observations)
        logp = tf.stop_gradient(gaussian_log_prob(mean, log_std, outer.actions))
        loss = surrogate_loss(policy, params, outer, outer_adv, logp)
    grads = tape.gradient(loss, variables)
    before = [v.numpy() for v in variables]
    adam_meta_step(
        policy, sizes, keras.optimizers.SGD(0.05), batch, learn_step_sizes=meta_sgd,
        inner_steps=2, first_order=False,
    )  # fmt: skip
    for v, b, g in zip(variables, before, grads, strict=True):
        assert_close(v.numpy(), b - 0.05 * g.numpy(), ulps=8)


@pytest.mark.slow
@pytest.mark.parametrize("outer", ["trpo", "ppo"])
def test_two_fresh_inner_batches_with_a_categorical_policy(outer):
    """The chain and both outer steps also run on a discrete task family (bandit, categorical)."""
    config = get_preset("bandit-k5").replace(
        outer=outer, inner_steps=2, meta_batch_size=2, episodes_per_task=2, hidden_sizes=(8,),
        cg_iterations=2, ls_max_steps=3, iterations=3,
    )  # fmt: skip
    trainer = MetaTrainer(config)
    rows = [trainer.train_iteration() for _ in range(3)]
    assert all(np.isfinite(v) for m in rows for v in m.values())
    assert "returns/after_1_inner_steps" in rows[-1]
    assert trainer._meta_step.experimental_get_tracing_count() == 1


# -- the every-step objective (mean of the surrogates after every inner step) ------------------


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
def test_every_step_jvp_and_vjp_with_intermediate_cotangents_match_autodiff(chain, meta_sgd):
    c = chain
    sizes = c["alphas"] if meta_sgd else 0.4
    rng = np.random.default_rng(8)
    v_theta = [tf.constant(rng.normal(size=t.shape)) for t in c["theta"]]
    w1, w2 = ([tf.constant(rng.normal(size=(2, *t.shape))) for t in c["theta"]] for _ in "12")
    primals = c["theta"] + (c["alphas"] if meta_sgd else [])
    with (
        tf.autodiff.ForwardAccumulator(c["theta"], v_theta) as acc,
        tf.GradientTape() as tape,
    ):
        tape.watch(primals)
        result = adapt(c["policy"], c["theta"], sizes, c["inner"], c["inner_adv"], 2)
        theta1 = result.trace[1][0]  # θ_1, the point of the second step
    expected_jvp = [[acc.jvp(p) for p in theta1], [acc.jvp(p) for p in result.params]]
    expected_vjp = tape.gradient(theta1 + result.params, primals, output_gradients=w1 + w2)
    args = (c["policy"], result, sizes, c["inner"], c["inner_adv"])
    got_jvp = adaptation_jvp(*args, v_theta, None, False, None, every_step=True)
    got_theta, got_alpha = adaptation_vjp(*args, w2, meta_sgd, False, None, [w1])
    for level_got, level_exp in zip(got_jvp, expected_jvp, strict=True):
        for g, e in zip(level_got, level_exp, strict=True):
            assert_close(g.numpy(), e.numpy(), ulps=8)
    for g, e in zip(got_theta + (got_alpha or []), expected_vjp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=16)
    with pytest.raises(ValueError, match="1 cotangents expected"):
        adaptation_vjp(*args, w2, meta_sgd, False, None, [w1, w1])


def test_every_step_trpo_step_fills_the_trust_region_of_the_mean_kl_over_steps(
    make_policy, synthetic_batch, to_tensors
):
    """The step TRPO takes lies on the bound of the quadratic model of the *mean over both
    steps'* KL (each θ_j on the batch it collected): ``½ Δᵀ ∇²KL̄ Δ = scale² · max_kl`` with the
    Hessian by autodiff, independently of TRPO's Gauss-Newton products; with the last step's
    objective only the last level's KL has that. The reported loss is the mean surrogate."""
    from metarl_tf.outer import mean_kl, surrogate_loss
    from metarl_tf.policy import gaussian_log_prob

    batch = two_batch_chain(synthetic_batch, to_tensors)
    inner, inner_adv, outer, outer_adv = batch[:4]
    max_kl = 0.01

    def levels(theta):
        result = adapt(policy, theta, 0.1, inner, inner_adv)
        return [(result.trace[1][0], inner[1], inner_adv[1]), (result.params, outer, outer_adv)]

    def quadratic_kl(theta, step, old, weights):
        """½ Δᵀ ∇²KL Δ at θ (KL = 0 with zero gradient there) of the levels' KLs weighted by
        ``weights``."""
        with tf.GradientTape() as outer_tape:
            outer_tape.watch(theta)
            with tf.GradientTape() as inner_tape:
                inner_tape.watch(theta)
                kls = [
                    mean_kl(policy, p, e, *o)
                    for (p, e, _), o in zip(levels(theta), old, strict=True)
                ]
                kl = tf.add_n([w * k for w, k in zip(weights, kls, strict=True)])
            grad = inner_tape.gradient(kl, theta)
            g_dot_step = tf.add_n([tf.reduce_sum(g * d) for g, d in zip(grad, step, strict=True)])
        h_step = outer_tape.gradient(g_dot_step, theta)
        return 0.5 * sum(float(tf.reduce_sum(h * d)) for h, d in zip(h_step, step, strict=True))

    # (every_step_objective, step_weights, the levels' weights)
    for every_step, step_weights, weights in (
        (True, None, [0.5, 0.5]),
        (False, None, [0.0, 1.0]),
        (True, (3.0, 1.0), [0.75, 0.25]),
    ):
        policy = make_policy(hidden=(8,))
        theta = [tf.constant(p) for p in policy.get_parameters()]
        before = levels(theta)
        old = [policy.forward(p, e.observations) for p, e, _ in before]
        old_logp = [
            gaussian_log_prob(*o, e.actions) for o, (_, e, _) in zip(old, before, strict=True)
        ]
        stats = trpo_meta_step(
            policy, 0.1, batch, learn_step_sizes=False, inner_steps=2, first_order=False,
            max_kl=max_kl, cg_iterations=10, cg_damping=0.0, ls_max_steps=10,
            ls_backtrack_ratio=0.8, every_step_objective=every_step, step_weights=step_weights,
        )  # fmt: skip
        assert float(stats["accepted"]) == 1.0
        bound = 0.8 ** (2 * (int(stats["line_search_steps"]) - 1)) * max_kl  # scale² · max_kl
        new = [tf.constant(p) for p in policy.get_parameters()]
        step = [n - t for n, t in zip(new, theta, strict=True)]
        # The step fills the trust region of its own weighted KL and not the other ones'.
        for other in ([0.5, 0.5], [0.0, 1.0], [0.75, 0.25]):
            model = quadratic_kl(theta, step, old, other)
            if other == weights:
                assert_close(model, bound, ulps=64, dtype=np.float32)
            else:
                assert abs(model - bound) > 0.05 * bound
        after = levels(new)
        kls = [float(mean_kl(policy, p, e, *o)) for (p, e, _), o in zip(after, old, strict=True)]
        losses = [
            float(surrogate_loss(policy, p, e, a, lp))
            for (p, e, a), lp in zip(after, old_logp, strict=True)
        ]
        kl, loss = np.dot(weights, kls), np.dot(weights, losses)
        assert kl < max_kl
        assert_close(kl, float(stats["kl"]), ulps=8, scale=1.0, dtype=np.float32)
        assert_close(loss, float(stats["loss_after"]), ulps=8, scale=1.0, dtype=np.float32)
        assert loss < float(stats["loss_before"])


def test_every_step_objective_is_a_trpo_config_option():
    config = get_preset("tiny").replace(inner_steps=2, every_step_objective=True)
    trainer = MetaTrainer(config)
    row = trainer.train_iteration()
    assert np.isfinite(row["returns/post_adaptation"])
    with pytest.raises(ValueError, match="every_step_objective needs outer='trpo'"):
        get_preset("tiny").replace(outer="ppo", every_step_objective=True)


def test_step_weights_are_validated_and_reach_the_trainer_and_the_cli(monkeypatch):
    from metarl_tf.cli import _train_config, build_parser
    from metarl_tf.config import TrainConfig, objective_weights

    assert objective_weights(2) == [0.5, 0.5]
    assert objective_weights(2, (3, 1)) == [0.75, 0.25]
    tiny = get_preset("tiny").replace(inner_steps=2, every_step_objective=True)
    with pytest.raises(ValueError, match="needs every_step_objective"):
        tiny.replace(every_step_objective=False, step_weights=(3.0, 1.0))
    with pytest.raises(ValueError, match="one weight per inner step \\(2\\), got 3"):
        tiny.replace(step_weights=(1.0, 1.0, 1.0))
    for bad in ((1.0, -1.0), (1.0, 0.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="must be positive finite numbers"):
            tiny.replace(step_weights=bad)
    config = tiny.replace(step_weights=(3.0, 1.0))
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert tiny.replace(step_weights=None).to_dict()["step_weights"] == []
    with pytest.raises(ValueError, match="hidden_sizes must be positive widths"):
        tiny.replace(hidden_sizes=(0, 5))
    args = build_parser().parse_args(
        ["train", "--preset", "tiny", "--inner-steps", "2", "--every-step-objective",
         "--step-weights", "3,1"]
    )  # fmt: skip
    assert _train_config(args).step_weights == (3.0, 1.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--step-weights", "3;1"])
    args = build_parser().parse_args(["train", "--hidden-sizes", "100,100", "--activation", "relu"])
    assert _train_config(args).hidden_sizes == (100, 100)
    assert _train_config(args).activation == "relu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--hidden-sizes", "100.5"])
    import metarl_tf.outer.trpo as trpo_module

    seen = []
    meta_gradient = trpo_module.meta_gradient

    def recording(*args, **kwargs):
        seen.append(kwargs["step_weights"])
        return meta_gradient(*args, **kwargs)

    monkeypatch.setattr(trpo_module, "meta_gradient", recording)
    row = MetaTrainer(config).train_iteration()
    assert np.isfinite(row["returns/post_adaptation"]) and seen == [(3.0, 1.0)]


# -- a learned shift of log σ added by the first inner step (TrainConfig.log_std_shift) --------


def test_log_std_shift_is_added_by_the_first_step_only(chain):
    c = chain
    shift = tf.constant([0.3, -0.7], tf.float64)
    result = adapt(c["policy"], c["theta"], c["alphas"], c["inner"], c["inner_adv"],
                   log_std_shift=shift)  # fmt: skip
    for i in range(2):
        thetas, _ = hand_written_chain(
            c["theta"], c["inner"], c["inner_adv"], [c["alphas"]] * 2, i, shift
        )
        assert_task_params(result.params, thetas[-1], i)


def test_jvp_and_vjp_with_a_log_std_shift_match_autodiff(chain):
    c = chain
    rng = np.random.default_rng(9)
    shift = tf.constant([0.3, -0.7], tf.float64)
    v_theta = [tf.constant(rng.normal(size=t.shape)) for t in c["theta"]]
    v_shift = tf.constant(rng.normal(size=2))
    w1, w2 = ([tf.constant(rng.normal(size=(2, *t.shape))) for t in c["theta"]] for _ in "12")
    primals = c["theta"] + c["alphas"] + [shift]
    with (
        tf.autodiff.ForwardAccumulator(c["theta"] + [shift], v_theta + [v_shift]) as acc,
        tf.GradientTape() as tape,
    ):
        tape.watch(primals)
        result = adapt(c["policy"], c["theta"], c["alphas"], c["inner"], c["inner_adv"],
                       log_std_shift=shift)  # fmt: skip
        theta1 = result.trace[1][0]
    expected_jvp = [[acc.jvp(p) for p in theta1], [acc.jvp(p) for p in result.params]]
    expected_vjp = tape.gradient(theta1 + result.params, primals, output_gradients=w1 + w2)
    args = (c["policy"], result, c["alphas"], c["inner"], c["inner_adv"])
    got_jvp = adaptation_jvp(*args, v_theta, None, False, None, every_step=True, v_shift=v_shift)
    got = adaptation_vjp(*args, w2, True, False, None, [w1], with_shift=True)
    for level_got, level_exp in zip(got_jvp, expected_jvp, strict=True):
        for g, e in zip(level_got, level_exp, strict=True):
            assert_close(g.numpy(), e.numpy(), ulps=8)
    for g, e in zip(got[0] + got[1] + [got[2]], expected_vjp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=8)


def test_trpo_learns_the_shift_and_keeps_the_pre_adaptation_log_std(
    make_policy, synthetic_batch, to_tensors
):
    """The step moves θ's network weights and the shift, not the pre-adaptation log σ; it is the
    same with analytic and autodiff curvature; the KL bound holds and the surrogate improves."""
    from metarl_tf.outer import mean_kl, surrogate_loss
    from metarl_tf.policy import gaussian_log_prob

    batch = two_batch_chain(synthetic_batch, to_tensors)
    policy = make_policy(hidden=(8,))
    start = [tf.constant(p) for p in policy.get_parameters()]
    adapted = {}
    for analytic in (True, False):
        policy.set_parameters(start)
        shift = tf.Variable([-0.2, 0.1])

        def outer_level(theta, shift=shift):
            return adapt(policy, theta, 0.1, batch.inner_episodes, batch.inner_advantages,
                         log_std_shift=tf.convert_to_tensor(shift)).params  # fmt: skip

        old = policy.forward(outer_level(start), batch.outer_episodes.observations)
        old_logp = gaussian_log_prob(*old, batch.outer_episodes.actions)
        stats = trpo_meta_step(
            policy, 0.1, batch, learn_step_sizes=False, inner_steps=2, first_order=False,
            max_kl=0.01, cg_iterations=3, cg_damping=1e-5, ls_max_steps=10,
            ls_backtrack_ratio=0.8, analytic_curvature=analytic, log_std_shift=shift,
        )  # fmt: skip
        assert float(stats["accepted"]) == 1.0
        new = policy.get_parameters()
        assert_exact(new[-1], start[-1].numpy())  # pre-adaptation log σ fixed
        assert_not_close(new[0], start[0])
        assert_not_close(shift, [-0.2, 0.1])
        params = outer_level([tf.constant(p) for p in new])
        kl = float(mean_kl(policy, params, batch.outer_episodes, *old))
        loss = float(surrogate_loss(policy, params, batch.outer_episodes,
                                    batch.outer_advantages, old_logp))  # fmt: skip
        assert kl < 0.01
        assert_close(kl, float(stats["kl"]), ulps=8, scale=1.0, dtype=np.float32)
        assert_close(loss, float(stats["loss_after"]), ulps=8, scale=1.0, dtype=np.float32)
        assert loss < float(stats["loss_before"])
        adapted[analytic] = np.concatenate([np.ravel(p) for p in new] + [shift.numpy()])
    assert_close(adapted[True], adapted[False], ulps=8)
    policy.set_parameters(start)


# -- per-step Meta-SGD step sizes (TrainConfig.meta_sgd_per_step) -----------------------------


def test_per_step_step_sizes_use_block_j_for_step_j_and_the_last_block_after(chain):
    c = chain
    rng = np.random.default_rng(4)
    second = [tf.constant(rng.uniform(0.01, 0.2, t.shape)) for t in c["theta"]]
    blocks = c["alphas"] + second
    result = adapt(c["policy"], c["theta"], blocks, c["inner"], c["inner_adv"])
    three = adapt(c["policy"], c["theta"], blocks, (*c["inner"], c["inner"][0]),
                  (*c["inner_adv"], c["inner_adv"][0]))  # fmt: skip
    for i in range(2):
        thetas, _ = hand_written_chain(  # step 3 reuses the last block
            c["theta"], (*c["inner"], c["inner"][0]), (*c["inner_adv"], c["inner_adv"][0]),
            [c["alphas"], second, second], i,
        )  # fmt: skip
        assert_task_params(result.params, thetas[1], i)
        assert_task_params(three.params, thetas[2], i)
    with pytest.raises(ValueError, match="whole per-step blocks"):
        adapt(c["policy"], c["theta"], blocks[:-1], c["inner"], c["inner_adv"])


def test_jvp_and_vjp_with_per_step_step_sizes_match_autodiff(chain):
    c = chain
    rng = np.random.default_rng(6)
    blocks = c["alphas"] + [tf.constant(rng.uniform(0.01, 0.2, t.shape)) for t in c["theta"]]
    v_theta = [tf.constant(rng.normal(size=t.shape)) for t in c["theta"]]
    v_steps = [tf.constant(rng.normal(size=s.shape)) for s in blocks]
    w = [tf.constant(rng.normal(size=(2, *t.shape))) for t in c["theta"]]
    with (
        tf.autodiff.ForwardAccumulator(c["theta"] + blocks, v_theta + v_steps) as acc,
        tf.GradientTape() as tape,
    ):
        tape.watch(c["theta"] + blocks)
        result = adapt(c["policy"], c["theta"], blocks, c["inner"], c["inner_adv"])
    expected_jvp = [acc.jvp(p) for p in result.params]
    expected_vjp = tape.gradient(result.params, c["theta"] + blocks, output_gradients=w)
    args = (c["policy"], result, blocks, c["inner"], c["inner_adv"])
    got_jvp = adaptation_jvp(*args, v_theta, v_steps)
    got_theta, got_steps = adaptation_vjp(*args, w, True)
    for g, e in zip(got_jvp, expected_jvp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=16)
    for g, e in zip(got_theta + got_steps, expected_vjp, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=32)


def test_a_chain_adapted_one_call_per_step_equals_the_whole_chain(chain):
    """``first_step``: the trainer and the evaluator adapt one call per step; with per-step step
    sizes and a log σ shift, step ``j`` must use block ``j`` and add the shift only at step 0."""
    c = chain
    rng = np.random.default_rng(5)
    blocks = c["alphas"] + [tf.constant(rng.uniform(0.01, 0.2, t.shape)) for t in c["theta"]]
    shift = tf.constant([0.3, -0.7], tf.float64)
    whole = adapt(c["policy"], c["theta"], blocks, c["inner"], c["inner_adv"], log_std_shift=shift)
    params = c["theta"]
    for j in range(2):
        params = adapt(c["policy"], params, blocks, c["inner"][j], c["inner_adv"][j],
                       log_std_shift=shift, first_step=j).params  # fmt: skip
    for got, expected in zip(params, whole.params, strict=True):
        assert_close(got.numpy(), expected.numpy(), ulps=8)
    # without first_step the second call would add the shift again and reuse block 0
    again = adapt(c["policy"], whole.trace[1][0], blocks, c["inner"][1], c["inner_adv"][1],
                  log_std_shift=shift).params  # fmt: skip
    assert_not_close(again[-1], whole.params[-1])


def test_adapter_compiles_each_distinct_step_rule_once(make_policy, synthetic_batch, to_tensors):
    """Beyond the last per-step block (and past the shifted first step) every step follows the
    same rule: a long chain of one-step calls compiles no more variants."""
    from metarl_tf.maml import Adapter

    policy = make_policy()
    batch = to_tensors(synthetic_batch(tasks=1, episodes=2, horizon=4, seed=1))
    sizes = [tf.fill(s, 0.1) for s in policy.parameter_shapes * 2]
    adapter = Adapter(policy, sizes, 0.99, log_std_shift=tf.constant([-0.5, -0.5]))
    assert adapter.last_distinct_step == 1
    params = policy.parameters
    for depth in range(6):
        params = [p[0] for p in adapter(params, batch, 1, first_step=depth)[0]]
    assert adapter.tracing_count == 2
    plain = Adapter(policy, 0.1, 0.99)
    for depth in range(3):
        plain(policy.parameters, batch, 1, first_step=depth)
    assert plain.last_distinct_step == 0 and plain.tracing_count == 1
