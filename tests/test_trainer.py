"""The meta-training loop: no retracing across iterations, deterministic checkpoint/resume, and the
bundle it exports. Uses the session-scoped ``tiny_run`` (the ``tiny`` preset, 4 iterations)."""

import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_not_close

from metarl_tf.bundle import load_bundle
from metarl_tf.config import PRESETS, TrainConfig, get_preset
from metarl_tf.training.run import make_trainer
from metarl_tf.training.trainer import MetaTrainer

VOLATILE = ("time/", "charts/peak_rss_mb")  # wall-clock and memory: differ run to run


def comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}


@pytest.mark.slow
def test_no_retracing_after_the_first_iterations(tiny_run):
    counts_2, counts_4 = tiny_run["counts_2"], tiny_run["counts_4"]
    assert {"trainer._meta_step", "adapter._compiled"} <= set(counts_2), counts_2
    if hasattr(tiny_run["trainer"].sampler, "_act"):  # the sampler's compiled action, if any
        assert "sampler._act" in counts_2
    assert all(c >= 1 for c in counts_2.values()), counts_2
    assert counts_4 == counts_2, f"retraced: after 2 iterations {counts_2}, after 4 {counts_4}"
    assert counts_2["trainer._meta_step"] == 1


@pytest.mark.slow
def test_metrics_are_finite_and_namespaced(tiny_run):
    trainer = tiny_run["trainer"]
    assert trainer.iteration == 4
    assert [m["iteration"] for m in trainer.history] == [1, 2, 3, 4]
    for m in trainer.history:
        assert all(np.isfinite(v) for v in m.values()), m
        for key in ("returns/pre_adaptation", "returns/post_adaptation", "losses/kl"):
            assert key in m
        assert m["losses/kl"] <= trainer.config.max_kl
        c = trainer.config
        assert 0 < m["charts/env_steps"] <= c.env_steps_per_iteration


@pytest.mark.slow
def test_checkpoint_restore_and_continue_equals_uninterrupted_run(tiny_run):
    config = tiny_run["trainer"].config
    resumed = MetaTrainer(config)
    assert resumed.restore_checkpoint(tiny_run["checkpoint"])
    assert resumed.iteration == 2
    for got, expected in zip(resumed.policy.get_parameters(), tiny_run["params_2"], strict=True):
        assert_exact(got, expected)
    continued = [resumed.train_iteration() for _ in range(2)]
    for got, expected in zip(continued, tiny_run["metrics_3_4"], strict=True):
        assert comparable(got) == comparable(expected)
    for got, expected in zip(resumed.policy.get_parameters(), tiny_run["params_4"], strict=True):
        assert_exact(got, expected)


@pytest.mark.slow
def test_init_from_bundle_continues_like_the_uninterrupted_run(tiny_run):
    # TRPO keeps no optimizer state, so a bundle holds all a continuation needs; the checkpoint
    # interval and the iteration target may differ from the bundle's run.
    config = tiny_run["trainer"].config.replace(iterations=9, checkpoint_every=3)
    continued = MetaTrainer(config)
    rows = continued.init_from_bundle(tiny_run["bundle_2"])
    assert continued.iteration == 2 and rows == []  # this bundle was exported without metrics
    assert continued.elapsed > 0
    for got, expected in zip(continued.policy.get_parameters(), tiny_run["params_2"], strict=True):
        assert_exact(got, expected)
    for expected in tiny_run["metrics_3_4"]:
        assert comparable(continued.train_iteration()) == comparable(expected)


@pytest.mark.slow
def test_init_from_bundle_may_change_the_batch_and_records_it(tiny_run, tmp_path):
    config = tiny_run["trainer"].config
    bigger = MetaTrainer(config.replace(meta_batch_size=config.meta_batch_size + 1, iterations=3))
    bigger.init_from_bundle(tiny_run["bundle_2"])
    bigger.train_iteration()
    bigger.save_checkpoint(tmp_path / "ckpt")
    resumed = MetaTrainer(bigger.config)
    assert resumed.restore_checkpoint(tmp_path / "ckpt")  # the lineage survives a resume
    training = load_bundle(resumed.export_bundle(tmp_path / "b")).meta["training"]
    assert training["iterations"] == 3
    (step,) = training["continued_from"]
    assert step["iterations"] == 2
    assert step["changed"] == {"meta_batch_size": config.meta_batch_size, "iterations": 4}


def test_init_from_bundle_may_change_gae_lambda_and_the_bundle_adapts_with_the_new_one(
    tiny_run, tmp_path
):
    config = tiny_run["trainer"].config.replace(gae_lambda=0.9, iterations=3)
    smoother = MetaTrainer(config)
    smoother.init_from_bundle(tiny_run["bundle_2"])
    smoother.train_iteration()
    bundle = load_bundle(smoother.export_bundle(tmp_path / "b"))
    assert bundle.meta["adaptation"]["gae_lambda"] == 0.9
    (step,) = bundle.meta["training"]["continued_from"]
    assert step["changed"]["gae_lambda"] == tiny_run["trainer"].config.gae_lambda


@pytest.mark.slow
def test_a_bundle_from_before_step_weights_continues_with_them(tiny_run, tmp_path):
    """A bundle whose saved configuration predates ``step_weights`` loads with equal weights and
    continues with a weighted 2-step objective; the change is recorded, and a checkpoint of the
    continuation resumes with the weights."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run["bundle_2"], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["training"]["config"]["step_weights"]
    (old / "meta.json").write_text(json.dumps(meta))
    config = tiny_run["trainer"].config.replace(
        inner_steps=2, every_step_objective=True, step_weights=(3.0, 1.0), iterations=3
    )
    weighted = MetaTrainer(config)
    weighted.init_from_bundle(old)
    weighted.train_iteration()
    weighted.save_checkpoint(tmp_path / "ckpt")
    resumed = MetaTrainer(config)
    assert resumed.restore_checkpoint(tmp_path / "ckpt")
    training = load_bundle(resumed.export_bundle(tmp_path / "b")).meta["training"]
    assert training["config"]["step_weights"] == [3.0, 1.0]
    (step,) = training["continued_from"]
    assert step["changed"]["step_weights"] == []
    assert step["changed"]["inner_steps"] == 1
    with pytest.raises(ValueError, match="another configuration.*step_weights"):
        MetaTrainer(config.replace(step_weights=(1.0, 3.0))).restore_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
def test_init_from_bundle_refuses_another_configuration(tiny_run):
    other = MetaTrainer(tiny_run["trainer"].config.replace(inner_step_size=0.5))
    with pytest.raises(ValueError, match=r"another configuration.*inner_step_size"):
        other.init_from_bundle(tiny_run["bundle_2"])


def test_restore_from_an_empty_directory_returns_false(tmp_path):
    trainer = MetaTrainer(get_preset("tiny"))
    assert trainer.restore_checkpoint(tmp_path / "nothing") is False
    assert trainer.iteration == 0


@pytest.mark.slow
def test_restore_refuses_a_checkpoint_of_another_configuration(tiny_run):
    other = MetaTrainer(tiny_run["trainer"].config.replace(hidden_sizes=(4,)))
    with pytest.raises(ValueError, match="another configuration"):
        other.restore_checkpoint(tiny_run["checkpoint"])


@pytest.mark.slow
def test_meta_sgd_adam_checkpoint_restores_step_sizes_and_optimizer_state(tmp_path):
    config = get_preset("tiny").replace(meta_sgd=True, outer="adam", outer_learning_rate=1e-2)
    first = MetaTrainer(config)
    first.train_iteration()
    first.save_checkpoint(tmp_path)
    expected = comparable(first.train_iteration())
    assert "charts/mean_step_size" in expected
    resumed = MetaTrainer(config)
    assert resumed.restore_checkpoint(tmp_path)
    assert comparable(resumed.train_iteration()) == expected
    for a, b in zip(resumed.step_size_values(), first.step_size_values(), strict=True):
        assert_exact(a, b)
    assert_not_close(
        first.step_size_values(), [np.full(s.shape, 0.1) for s in first.step_size_values()]
    )
    for a, b in zip(resumed.policy.get_parameters(), first.policy.get_parameters(), strict=True):
        assert_exact(a, b)


@pytest.mark.slow
def test_export_bundle_holds_the_trained_parameters(tiny_run, tmp_path):
    trainer = tiny_run["trainer"]
    path = trainer.export_bundle(tmp_path / "tiny-bundle")
    bundle = load_bundle(path)
    for a, b in zip(bundle.policy.get_parameters(), tiny_run["params_4"], strict=True):
        assert_exact(a, b)
    assert bundle.step_sizes == trainer.config.inner_step_size
    assert bundle.meta["training"]["iterations"] == 4
    assert TrainConfig.from_dict(bundle.meta["training"]["config"]) == trainer.config
    assert bundle.adaptation["steps"] == trainer.config.inner_steps


def test_config_validation_and_presets():
    assert get_preset("tiny").hidden_sizes == (8,)
    assert set(PRESETS) >= {"nav2d", "nav2d-metasgd", "nav2d-fo", "tiny"}
    assert TrainConfig.from_dict(get_preset("tiny").to_dict()) == get_preset("tiny")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="outer must be"):
        TrainConfig(outer="sgd")
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        TrainConfig(horizon=0)
    with pytest.raises(ValueError, match=r"gae_lambda must be in \[0, 1\]"):
        TrainConfig(gae_lambda=1.5)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        TrainConfig(gamma=1.01)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"hidden": [4]})
    c = TrainConfig()
    assert c.env_steps_per_iteration == 2 * 20 * 20 * 100


def test_log_std_shift_is_checkpointed_exported_and_applied_by_the_bundle(tmp_path):
    import json

    from metarl_tf.bundle import BundleError
    from metarl_tf.maml import Adapter

    config = get_preset("tiny").replace(log_std_shift=True)
    first = MetaTrainer(config)
    first.train_iteration()
    first.save_checkpoint(tmp_path / "ckpt")
    expected = comparable(first.train_iteration())
    shift = first.log_std_shift.numpy()
    assert np.any(shift != 0.0), "the shift was not learned"
    assert_exact(first.policy.get_parameters()[-1], config.init_log_std)
    resumed = MetaTrainer(config)
    assert resumed.restore_checkpoint(tmp_path / "ckpt")
    assert comparable(resumed.train_iteration()) == expected
    assert_exact(resumed.log_std_shift.numpy(), shift)

    bundle = load_bundle(first.export_bundle(tmp_path / "bundle"))
    assert_exact(bundle.log_std_shift, shift)
    assert bundle.meta["format_version"] == 2  # a version-1 reader would ignore the shift
    batch = first.sampler.sample(
        bundle.policy.parameters, bundle.task_distribution.sample_tasks(2, 0), 1
    )
    with_shift = bundle.make_adapter()(bundle.policy.parameters, batch)[0]
    a = bundle.adaptation
    plain = Adapter(bundle.policy, bundle.step_sizes, a["gamma"], a["gae_lambda"], a["baseline"])
    without = plain(bundle.policy.parameters, batch)[0]
    assert_close((with_shift[-1] - without[-1]).numpy(), np.stack([shift] * 2), ulps=8)
    for p, q in zip(with_shift[:-1], without[:-1], strict=True):
        assert_exact(p.numpy(), q.numpy())

    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    for bad in ([0.0, 0.0, 0.0], [0.0, "x"], [0.0, float("nan")]):
        meta["adaptation"]["log_std_shift"] = bad
        (tmp_path / "bundle" / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match="log_std_shift must be a list of"):
            load_bundle(tmp_path / "bundle")
    for bad in ({"outer": "ppo"}, {"algo": "pretrain"}):
        with pytest.raises(ValueError, match="log_std_shift needs outer='trpo' and algo='maml'"):
            get_preset("tiny").replace(log_std_shift=True, **bad)
    with pytest.raises(ValueError, match="log_std_shift needs a Gaussian policy"):
        MetaTrainer(get_preset("bandit-k5").replace(log_std_shift=True, hidden_sizes=(4,)))


def test_per_step_step_sizes_start_from_shared_ones_and_round_trip_through_a_bundle(tmp_path):
    shared = MetaTrainer(get_preset("tiny").replace(meta_sgd=True))
    shared.train_iteration()
    shared.export_bundle(tmp_path / "shared")
    config = get_preset("tiny").replace(meta_sgd=True, meta_sgd_per_step=True, inner_steps=2)
    trainer = MetaTrainer(config)
    trainer.init_from_bundle(tmp_path / "shared")
    n = len(trainer.policy.parameters)
    values = trainer.step_size_values()
    assert len(values) == 2 * n
    for b in range(2):
        for got, expected in zip(
            values[b * n : (b + 1) * n], shared.step_size_values(), strict=True
        ):
            assert_exact(got, expected)
    trainer.train_iteration()
    values = trainer.step_size_values()
    assert any(not np.array_equal(a, b) for a, b in zip(values[:n], values[n:], strict=True))
    bundle = load_bundle(trainer.export_bundle(tmp_path / "per-step"))
    assert bundle.meta["adaptation"]["step_sizes"]["blocks"] == 2
    assert bundle.meta["format_version"] == 2
    assert load_bundle(tmp_path / "shared").meta["format_version"] == 1
    for got, expected in zip(bundle.step_sizes, values, strict=True):
        assert_exact(got, expected)
    with pytest.raises(ValueError, match="meta_sgd_per_step needs meta_sgd"):
        get_preset("tiny").replace(meta_sgd_per_step=True)


def test_per_step_blocks_from_a_shifted_bundle_start_later_network_steps_smaller(tmp_path):
    """Continuing a bundle with a log σ shift: steps after the first adapt on episodes with
    σ·exp(β), whose network gradients are ~exp(−β) larger, so their network step sizes start
    exp(mean β) times the bundle's; the log σ step size is copied as is."""
    first = MetaTrainer(get_preset("tiny").replace(meta_sgd=True, log_std_shift=True))
    first.train_iteration()
    first.log_std_shift.assign([-1.0, -0.5])
    first.export_bundle(tmp_path / "shifted")
    config = get_preset("tiny").replace(
        meta_sgd=True, log_std_shift=True, meta_sgd_per_step=True, inner_steps=2
    )
    trainer = MetaTrainer(config)
    trainer.init_from_bundle(tmp_path / "shifted")
    n = len(trainer.policy.parameters)
    values, shared = trainer.step_size_values(), first.step_size_values()
    for i in range(n):
        assert_exact(values[i], shared[i])
        factor = np.exp(-0.75) if i < n - 1 else 1.0
        assert_close(values[n + i], shared[i] * factor, ulps=8)


def test_per_step_blocks_continue_as_learned_and_are_not_dropped(tmp_path):
    config = get_preset("tiny").replace(
        meta_sgd=True, log_std_shift=True, meta_sgd_per_step=True, inner_steps=2
    )
    two = MetaTrainer(config)
    for i, s in enumerate(two.step_sizes):
        s.assign(tf_fill_like(s, 0.1 if i < len(two.policy.parameters) else 0.2))
    two.log_std_shift.assign([-1.0, -1.0])
    two.export_bundle(tmp_path / "two")
    three = MetaTrainer(config.replace(inner_steps=3))
    three.init_from_bundle(tmp_path / "two")
    n = len(three.policy.parameters)
    values = three.step_size_values()
    for b, expected in ((0, 0.1), (1, 0.2), (2, 0.2)):  # learned blocks kept, the last reused
        for v in values[b * n : (b + 1) * n]:
            assert_close(v, expected, ulps=1)
    with pytest.raises(ValueError, match="has 2 per-step blocks of step sizes; continue it with"):
        MetaTrainer(config.replace(meta_sgd_per_step=False)).init_from_bundle(tmp_path / "two")
    # the pretrained baseline has no step sizes to learn, per step or not
    make_trainer(config.replace(algo="pretrain", log_std_shift=False))


def tf_fill_like(variable, value):
    import tensorflow as tf

    return tf.fill(variable.shape, value)
