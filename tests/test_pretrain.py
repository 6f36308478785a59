"""``train --algo pretrain``: the joint TRPO step re-checked independently (numpy surrogate and
KL, plain autodiff gradient of the shared policy), and a tiny run that writes a loadable bundle."""

import json

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close

from metarl_tf.advantages import compute_advantages
from metarl_tf.bundle import load_bundle
from metarl_tf.cli import main
from metarl_tf.config import get_preset
from metarl_tf.outer import MetaBatch, make_meta_step
from metarl_tf.policy import numpy_forward
from metarl_tf.training.pretrain import PretrainTrainer, default_bundle_path, pretrain_step


def np_log_prob(mean, log_std, actions):
    z = (actions - mean) / np.exp(log_std)
    return np.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)


def np_kl(m0, s0, m1, s1):
    """KL(N(m0, e^s0) || N(m1, e^s1)) summed over the action axis."""
    return np.sum(s1 - s0 + (np.exp(2 * s0) + (m0 - m1) ** 2) / (2 * np.exp(2 * s1)) - 0.5, -1)


@pytest.fixture
def toy(make_policy, synthetic_batch, to_tensors):
    policy = make_policy(hidden=(4,), seed=3)
    batch = to_tensors(synthetic_batch(tasks=3, episodes=2, horizon=6, seed=4))
    adv = compute_advantages(batch, 0.99, 1.0, "linear")
    return policy, batch, adv


def masked_task_mean(x, mask):
    return np.mean(np.sum(x * mask, axis=(1, 2)) / np.sum(mask, axis=(1, 2)))


def forward_np(params, obs):
    flat = obs.reshape(-1, obs.shape[-1])
    mean, log_std = numpy_forward([np.asarray(p, np.float64) for p in params], flat)
    return mean.reshape(*obs.shape[:-1], -1), np.asarray(log_std).reshape(*obs.shape[:-1], -1)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_pretrain_step_improves_the_joint_surrogate_within_the_kl_bound(toy, mode):
    policy, batch, adv = toy
    config = get_preset("tiny").replace(max_kl=0.01, cg_iterations=10, ls_max_steps=15)
    before = [np.array(p.numpy(), np.float64) for p in policy.parameters]
    step = lambda: pretrain_step(policy, batch, adv, config)  # noqa: E731
    stats = (tf.function(step) if mode == "function" else step)()
    after = [np.array(p.numpy(), np.float64) for p in policy.parameters]

    obs, act = np.asarray(batch.observations, np.float64), np.asarray(batch.actions, np.float64)
    mask, a = np.asarray(batch.mask, np.float64), np.asarray(adv, np.float64)
    m0, s0 = forward_np(before, obs)
    m1, s1 = forward_np(after, obs)
    ratio = np.exp(np_log_prob(m1, s1, act) - np_log_prob(m0, s0, act))
    surrogate_before = -masked_task_mean(a, mask)  # ratio 1
    surrogate_after = -masked_task_mean(ratio * a, mask)
    kl = masked_task_mean(np_kl(m0, s0, m1, s1), mask)

    assert float(stats["accepted"]) == 1.0
    assert any(np.abs(x - y).max() > 1e-6 for x, y in zip(before, after, strict=True))
    assert surrogate_after < surrogate_before - 1e-6
    assert kl <= config.max_kl * (1 + 1e-4)
    assert_close(float(stats["loss_before"]), surrogate_before, ulps=8, scale=1.0, dtype=np.float32)
    assert_close(float(stats["loss_after"]), surrogate_after, ulps=8, scale=1.0, dtype=np.float32)
    # the KL is a mean of differences of O(1) log-probabilities: rounding scales with those
    assert_close(float(stats["kl"]), kl, ulps=8, scale=1.0, dtype=np.float32)


def test_pretrain_gradient_is_the_plain_gradient_of_the_joint_surrogate(toy):
    """The zero-step-size meta-step must differentiate the shared policy's own surrogate."""
    policy, batch, adv = toy
    config = get_preset("tiny")
    g = make_meta_step(config, policy, 0.0, joint=True).meta_gradient(
        MetaBatch(batch, adv, batch, adv)
    )
    params = [tf.identity(p) for p in policy.parameters]
    with tf.GradientTape() as tape:
        tape.watch(params)
        mean, log_std = policy.forward(params, tf.reshape(batch.observations, [-1, 2]))
        mean = tf.reshape(mean, batch.actions.shape)
        log_std = tf.reshape(log_std, batch.actions.shape)
        z = (batch.actions - mean) * tf.exp(-log_std)
        log_prob = tf.reduce_sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), -1)
        ratio = tf.exp(log_prob - tf.stop_gradient(log_prob))
        per_task = tf.reduce_sum(ratio * adv * batch.mask, [1, 2]) / tf.reduce_sum(
            batch.mask, [1, 2]
        )
        loss = -tf.reduce_mean(per_task)
    grads = tape.gradient(loss, params)
    norm = np.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
    assert norm > 1e-4
    got = np.sqrt(sum(float(tf.reduce_sum(x * x)) for x in g.gradient))
    assert_close(got, norm, ulps=8, dtype=np.float32)


def test_pretrain_trainer_switches_meta_sgd_off_and_selects_on_the_joint_return():
    trainer = PretrainTrainer(get_preset("tiny").replace(meta_sgd=True))
    assert trainer.config.algo == "pretrain" and not trainer.config.meta_sgd
    assert trainer.selection_metric == "returns/pre_adaptation"
    assert isinstance(trainer.step_size_values(), float)


def test_default_bundle_paths_follow_the_evaluate_convention():
    assert str(default_bundle_path(get_preset("nav2d-pretrain"))) == "saved_models/nav2d-pretrained"
    assert str(default_bundle_path(get_preset("nav2d-oracle"))) == "saved_models/nav2d-oracle"


@pytest.mark.slow
def test_tiny_pretrain_run_writes_a_loadable_bundle_and_resumes(tmp_path):
    out, run = tmp_path / "pre", tmp_path / "run"
    args = ["train", "--preset", "tiny", "--algo", "pretrain", "--out", str(out),
            "--run-dir", str(run), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    bundle = load_bundle(out)
    assert bundle.meta["training"]["algo"] == "pretrain"
    assert bundle.meta["training"]["config"]["algo"] == "pretrain"
    assert bundle.meta["adaptation"]["meta_sgd"] is False
    assert bundle.step_sizes == get_preset("tiny").inner_step_size
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["losses/kl"] <= get_preset("tiny").max_kl
        assert m["charts/env_steps"] > 0 and m["charts/monitor_env_steps"] > 0
        assert all(np.isfinite(v) for v in m.values())
    assert (run / "checkpoint" / "checkpoint.npz").is_file()
    assert main([*args, "--resume", "--iterations", "3"]) == 0
    assert load_bundle(out).meta["training"]["iterations"] == 3
