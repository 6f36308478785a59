"""The PPO-clip outer step: the clipped objective against numpy; its first-epoch gradient (r = 1)
against the vanilla surrogate's meta-gradient through the adaptation; a step improves the
surrogate (re-checked independently); eager = compiled; no retracing in the trainer."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_not_close
from references import numpy_log_prob, numpy_mean_kl

from metarl_tf.config import TrainConfig, get_preset
from metarl_tf.maml import adapt
from metarl_tf.outer import MetaBatch, clipped_surrogate_loss, ppo_meta_step, surrogate_loss
from metarl_tf.training.trainer import MetaTrainer


def numpy_clipped_loss(log_prob, old_log_prob, adv, mask, clip):
    """``−mean_i [Σ mask·min(r Â, clip(r) Â) / Σ mask]``, element by element."""
    ratio = np.exp(log_prob - old_log_prob)
    out = np.zeros(mask.shape[0])
    for i in range(mask.shape[0]):
        total = 0.0
        for idx in np.ndindex(*mask.shape[1:]):
            r, a = ratio[i][idx], adv[i][idx]
            total += mask[i][idx] * min(r * a, min(max(r, 1 - clip), 1 + clip) * a)
        out[i] = total / mask[i].sum()
    return -out.mean()


@pytest.fixture
def toy(make_policy, synthetic_batch, to_tensors):
    """Policy hidden (8,), 2 tasks × 2 episodes × horizon 5: two inner batches (for k = 2), one
    outer batch, advantages of both signs."""
    policy = make_policy(hidden=(8,), log_std=-0.5)
    inner = [to_tensors(synthetic_batch(2, 2, 5, seed=s)) for s in (1, 2)]
    outer = to_tensors(synthetic_batch(2, 2, 5, seed=3))
    rng = np.random.default_rng(4)
    inner_adv = [
        tf.constant(rng.normal(size=b.mask.shape) * b.mask.numpy(), tf.float32) for b in inner
    ]
    outer_adv = tf.constant(rng.normal(size=outer.mask.shape) * outer.mask.numpy(), tf.float32)
    return policy, inner, inner_adv, outer, outer_adv


def meta_batch(toy, steps):
    _, inner, inner_adv, outer, outer_adv = toy
    if steps == 1:
        return MetaBatch(inner[0], inner_adv[0], outer, outer_adv)
    return MetaBatch(tuple(inner[:steps]), tuple(inner_adv[:steps]), outer, outer_adv)


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_clipped_surrogate_matches_numpy_reference(toy, run_mode, clip):
    policy, _, _, outer, outer_adv = toy
    theta = policy.get_parameters()
    old = [tf.constant(np.stack([p, p])) for p in theta]
    new = [tf.constant(np.stack([p * 1.25, p * 0.8])) for p in theta]  # ratios well off 1
    old_logp = numpy_log_prob(policy, old, outer)
    new_logp = numpy_log_prob(policy, new, outer)
    mask = outer.mask.numpy()
    ratio = np.exp(new_logp - old_logp)[mask > 0]
    assert np.any(ratio > 1 + clip) and np.any(ratio < 1 - clip)  # the clip is exercised
    loss_fn = run_mode(
        lambda p: clipped_surrogate_loss(
            policy, p, outer, outer_adv, tf.constant(old_logp, tf.float32), clip
        )
    )
    expected = numpy_clipped_loss(new_logp, old_logp, outer_adv.numpy(), mask, clip)
    assert_close(float(loss_fn(new)), expected, ulps=8, scale=1.0, dtype=np.float32)
    # without clipping (ε → large) it would be the TRPO surrogate; with it, it is not
    unclipped = float(
        surrogate_loss(policy, new, outer, outer_adv, tf.constant(old_logp, tf.float32))
    )
    assert abs(unclipped - expected) > 1e-3


def vanilla_meta_gradient(policy, sizes, variables, batch, steps, first_order=False):
    """``∇ surrogate(θ'(θ, α))`` at the current point (r = 1), by a GradientTape through adapt."""
    with tf.GradientTape() as tape:
        result = adapt(
            policy, policy.parameters, sizes, batch.inner_episodes, batch.inner_advantages,
            steps, first_order,
        )  # fmt: skip
        mean, log_std = policy.forward(result.params, batch.outer_episodes.observations)
        from metarl_tf.policy import gaussian_log_prob

        old = tf.stop_gradient(gaussian_log_prob(mean, log_std, batch.outer_episodes.actions))
        loss = surrogate_loss(
            policy, result.params, batch.outer_episodes, batch.outer_advantages, old
        )
    return loss, tape.gradient(loss, variables)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta-sgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_first_epoch_is_the_vanilla_meta_gradient_step(toy, steps, meta_sgd, first_order):
    # With one epoch and plain SGD, the PPO step is θ − lr ∇surrogate (r = 1: nothing clipped).
    policy = toy[0]
    sizes = [tf.Variable(tf.fill(s, 0.3)) for s in policy.parameter_shapes] if meta_sgd else 0.3
    variables = list(policy.parameters) + (sizes if meta_sgd else [])
    batch = meta_batch(toy, steps)
    loss, grads = vanilla_meta_gradient(policy, sizes, variables, batch, steps, first_order)
    before = [v.numpy() for v in variables]
    lr = 0.05
    stats = ppo_meta_step(
        policy, sizes, keras.optimizers.SGD(lr), batch, learn_step_sizes=meta_sgd,
        inner_steps=steps, first_order=first_order, epochs=1, clip=0.2,
    )  # fmt: skip
    assert_close(float(stats["loss_before"]), float(loss), ulps=8, scale=1.0, dtype=np.float32)
    for v, b, g in zip(variables, before, grads, strict=True):
        assert_close(v.numpy(), b - lr * g.numpy(), ulps=8)
    assert any(np.abs(g.numpy()).max() > 1e-4 for g in grads)


def test_clipped_and_vanilla_gradients_agree_at_ratio_one(toy):
    policy, inner, inner_adv, outer, outer_adv = toy
    theta = list(policy.parameters)
    with tf.GradientTape(persistent=True) as tape:
        params = adapt(policy, theta, 0.3, tuple(inner), tuple(inner_adv)).params
        mean, log_std = policy.forward(params, outer.observations)
        from metarl_tf.policy import gaussian_log_prob

        old = tf.stop_gradient(gaussian_log_prob(mean, log_std, outer.actions))
        clipped = clipped_surrogate_loss(policy, params, outer, outer_adv, old, 0.2)
        vanilla = surrogate_loss(policy, params, outer, outer_adv, old)
    for a, b in zip(tape.gradient(clipped, theta), tape.gradient(vanilla, theta), strict=True):
        assert_close(a.numpy(), b.numpy(), ulps=8)
    assert_close(float(clipped), float(vanilla), ulps=8, dtype=np.float32)


@pytest.mark.parametrize(
    ("steps", "meta_sgd"), [(1, False), (2, True)], ids=["maml-1", "metasgd-2"]
)
def test_ppo_step_improves_the_surrogate(toy, steps, meta_sgd):
    policy = toy[0]
    sizes = [tf.Variable(tf.fill(s, 0.3)) for s in policy.parameter_shapes] if meta_sgd else 0.3
    batch = meta_batch(toy, steps)
    frozen = lambda: [tf.constant(s.numpy()) for s in sizes] if meta_sgd else sizes  # noqa: E731
    theta_before = [tf.constant(p) for p in policy.get_parameters()]
    inner, inner_adv = batch.inner_episodes, batch.inner_advantages
    old_params = adapt(policy, theta_before, frozen(), inner, inner_adv, steps).params
    old_logp = numpy_log_prob(policy, old_params, batch.outer_episodes)
    clip = 0.2
    optimizer = keras.optimizers.Adam(3e-4)
    optimizer.build(list(policy.parameters) + (sizes if meta_sgd else []))
    step = tf.function(
        lambda b: ppo_meta_step(
            policy, sizes, optimizer, b, learn_step_sizes=meta_sgd,
            inner_steps=steps, first_order=False, epochs=5, clip=clip,
        )
    )  # fmt: skip
    stats = {k: float(v) for k, v in step(batch).items()}

    # re-check from the updated variables: adapt again, then everything in numpy
    outer, adv = batch.outer_episodes, batch.outer_advantages.numpy()
    mask = outer.mask.numpy()
    new_params = adapt(policy, policy.get_parameters(), frozen(), inner, inner_adv, steps).params
    new_logp = numpy_log_prob(policy, new_params, outer)
    before = numpy_clipped_loss(old_logp, old_logp, adv, mask, clip)
    after = numpy_clipped_loss(new_logp, old_logp, adv, mask, clip)
    assert_close(stats["loss_before"], before, ulps=32, scale=1.0, dtype=np.float32)
    assert_close(stats["loss_after"], after, ulps=16, scale=1.0, dtype=np.float32)
    assert after < before - 1e-3
    kl = numpy_mean_kl(policy, old_params, new_params, outer)
    assert kl > 0
    # the KL is a mean of differences of O(1) log-probabilities: rounding scales with those
    assert_close(stats["kl"], kl, ulps=8, scale=1.0, dtype=np.float32)
    ratio = np.exp(new_logp - old_logp)
    clip_fraction = np.sum((np.abs(ratio - 1) > clip) * mask) / mask.sum()
    assert_close(stats["clip_fraction"], clip_fraction, ulps=8, dtype=np.float32)
    if meta_sgd:
        assert_not_close(
            sizes, [np.full(s.shape, 0.3) for s in sizes], err_msg="step sizes were not updated"
        )


@pytest.mark.slow
def test_ppo_step_eager_equals_compiled(make_policy, toy):
    batch = meta_batch(toy, 2)
    results = []
    for compiled in (False, True):
        policy = make_policy(hidden=(8,), log_std=-0.5)  # the same weights each time
        sizes = [tf.Variable(tf.fill(s, 0.3)) for s in policy.parameter_shapes]
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(list(policy.parameters) + sizes)

        def step(b, policy=policy, sizes=sizes, optimizer=optimizer):
            return ppo_meta_step(
                policy, sizes, optimizer, b, learn_step_sizes=True, inner_steps=2,
                first_order=False, epochs=3, clip=0.2,
            )  # fmt: skip

        stats = (tf.function(step) if compiled else step)(batch)
        results.append(({k: float(v) for k, v in stats.items()}, policy.get_parameters(), sizes))
    (eager, eager_theta, eager_sizes), (comp, comp_theta, comp_sizes) = results
    assert eager.keys() == comp.keys()
    # Three epochs of two second-order inner steps and an Adam update, graph against eager: the
    # rounding of every step feeds the next; the losses and KL are means of O(1) terms.
    for k in eager:
        assert_close(comp[k], eager[k], ulps=256, dtype=np.float32, err_msg=k)
    for a, b in zip(eager_theta, comp_theta, strict=True):
        assert_close(a, b, ulps=16)
    for a, b in zip(eager_sizes, comp_sizes, strict=True):
        assert_close(a, b, ulps=128)


def test_ppo_rejects_bad_settings(toy):
    policy = toy[0]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        ppo_meta_step(
            policy, 0.3, keras.optimizers.SGD(0.1), meta_batch(toy, 1), learn_step_sizes=False,
            inner_steps=1, first_order=False, epochs=0, clip=0.2,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"ppo_clip must be in \(0, 1\)"):
        TrainConfig(outer="ppo", ppo_clip=1.5)
    with pytest.raises(ValueError, match="ppo_epochs must be >= 1"):
        TrainConfig(outer="ppo", ppo_epochs=0)
    assert get_preset("nav2d-ppo").outer == "ppo"


@pytest.mark.slow
def test_trainer_with_ppo_does_not_retrace_and_restores_its_optimizer(tmp_path):
    config = get_preset("tiny").replace(outer="ppo", ppo_epochs=2, outer_learning_rate=1e-2)
    trainer = MetaTrainer(config)
    trainer.train_iteration()
    trainer.save_checkpoint(tmp_path)
    m = [trainer.train_iteration() for _ in range(2)]
    assert trainer._meta_step.experimental_get_tracing_count() == 1
    assert {"losses/loss_before", "losses/loss_after", "losses/kl", "losses/clip_fraction"} <= set(
        m[-1]
    )
    assert all(np.isfinite(v) for v in m[-1].values())
    resumed = MetaTrainer(config)
    assert resumed.restore_checkpoint(tmp_path)
    again = resumed.train_iteration()
    assert again["losses/loss_after"] == m[0]["losses/loss_after"]
    for a, b in zip(
        resumed.policy.get_parameters(), MetaTrainer(config).policy.get_parameters(), strict=True
    ):
        assert not np.array_equal(a, b)  # trained, not the initialization


def test_cli_flags_reach_the_config():
    from metarl_tf.cli import _train_config, build_parser

    args = build_parser().parse_args(
        ["train", "--preset", "nav2d-fo", "--outer", "ppo", "--inner-steps", "2",
         "--ppo-epochs", "3", "--ppo-clip", "0.1", "--outer-learning-rate", "1e-3", "--meta-sgd"]
    )  # fmt: skip
    config = _train_config(args)
    assert (config.outer, config.inner_steps, config.ppo_epochs) == ("ppo", 2, 3)
    assert (config.ppo_clip, config.outer_learning_rate) == (0.1, 1e-3)
    assert config.first_order and config.meta_sgd  # preset + flag combine
    assert config.env_steps_per_iteration == 3 * 20 * 20 * 100
    default = _train_config(build_parser().parse_args(["train", "--preset", "nav2d-2step"]))
    assert (default.outer, default.inner_steps) == ("trpo", 2)


def test_pretrain_with_ppo_is_plain_ppo_on_the_joint_surrogate(toy):
    """``--algo pretrain --outer ppo``: θ' = θ, so one epoch with SGD is θ − lr ∇surrogate(θ)."""
    from metarl_tf.policy import gaussian_log_prob, tile_parameters
    from metarl_tf.training.pretrain import pretrain_step

    policy, _, _, outer, outer_adv = toy
    config = get_preset("tiny").replace(outer="ppo", ppo_epochs=1)
    variables = list(policy.parameters)
    with tf.GradientTape() as tape:
        params = tile_parameters(variables, 2)
        mean, log_std = policy.forward(params, outer.observations)
        old = tf.stop_gradient(gaussian_log_prob(mean, log_std, outer.actions))
        loss = surrogate_loss(policy, params, outer, outer_adv, old)
    grads = tape.gradient(loss, variables)
    before = [v.numpy() for v in variables]
    stats = pretrain_step(policy, outer, outer_adv, config, keras.optimizers.SGD(0.1))
    assert "clip_fraction" in stats
    for v, b, g in zip(variables, before, grads, strict=True):
        assert_close(v.numpy(), b - 0.1 * g.numpy(), ulps=8)
