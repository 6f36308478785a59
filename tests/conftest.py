"""Shared fixtures of the core test suite: tiny policies, synthetic episode batches, and the
(expensive, so session-scoped) tiny training run.

Every reference in these tests is computed independently of the code under test (plain Python
loops, numpy, TF-Agents, finite differences, autodiff through the public functions), never by
calling the function being checked.
"""

import os

# The tests use tf-agents as a reference (specs, value functions, drivers); it needs the legacy
# tf.keras, which TensorFlow resolves once, when Keras 3 or tf.keras first loads: set it before
# anything imports them. The package itself sets it only where it imports tf-agents.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# isort: split
import metarl_tf  # noqa: F401  (first: TensorFlow's environment before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close

from metarl_tf.episodes import EpisodeBatch
from metarl_tf.policy import GaussianMLPPolicy


@pytest.fixture(params=["eager", "function"])
def run_mode(request):
    """Runs a function as is, or wrapped in ``tf.function`` (STYLE.md: jitted and not)."""
    if request.param == "eager":
        return lambda fn: fn
    return tf.function


def _make_policy(hidden=(4,), obs_dim=2, act_dim=2, seed=0, activation="tanh", log_std=-0.5):
    """A tiny Gaussian MLP policy with seeded, non-trivial weights (biases and log_std too)."""
    keras.utils.set_random_seed(seed)
    policy = GaussianMLPPolicy(obs_dim, act_dim, hidden, activation, init_log_std=log_std)
    rng = np.random.default_rng(seed)
    policy.set_parameters(
        [
            rng.normal(0.0, 0.5, size=shape).astype(np.float32)
            if name != "log_std"
            else np.full(shape, log_std, np.float32) + rng.normal(0, 0.1, size=shape)
            for shape, name in zip(policy.parameter_shapes, policy.parameter_names, strict=True)
        ]
    )
    return policy


def _prefix_mask(lengths, horizon):
    """``[..., horizon]`` mask that is 1 for the first ``lengths[...]`` steps and 0 after."""
    lengths = np.asarray(lengths)
    return (np.arange(horizon) < lengths[..., None]).astype(np.float32)


def _synthetic_batch(
    tasks=2, episodes=2, horizon=4, obs_dim=2, act_dim=2, seed=0, dtype=np.float32, lengths=None
):
    """A random ``EpisodeBatch`` with episodes that end early (zero padding after the end).

    Observations, actions and rewards are zero on padding, as the sampler produces them.
    """
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(2, horizon + 1, size=(tasks, episodes))
        lengths[0, 0] = horizon  # at least one full-length episode
    mask = _prefix_mask(lengths, horizon)
    obs = rng.uniform(-0.5, 0.5, size=(tasks, episodes, horizon, obs_dim)) * mask[..., None]
    act = rng.normal(0.0, 0.3, size=(tasks, episodes, horizon, act_dim)) * mask[..., None]
    rew = rng.uniform(-1.0, 0.0, size=(tasks, episodes, horizon)) * mask
    return EpisodeBatch(*(np.asarray(x, dtype) for x in (obs, act, rew, mask)))


def _to_tensors(batch, dtype=tf.float32):
    return EpisodeBatch(*[tf.convert_to_tensor(x, dtype) for x in batch])


def _values_of(params):
    return [np.array(p.numpy() if hasattr(p, "numpy") else p) for p in params]


def _check_carried_hessian(hessian_cls, policy, episodes, params, adv, v, lvc):
    """Builds ``hessian_cls`` (an inner-loss Hessian of ``metarl_tf.curvature``) in one
    ``tf.function``, restores its ``carry()`` in another: the loss, gradient and product of ``v``
    must equal those of the Hessian built afresh."""
    fresh = hessian_cls(params, episodes, adv, policy.activation, lvc=lvc)
    carried = tf.function(lambda: hessian_cls(params, episodes, adv, policy.activation).carry())()
    leaves = tf.nest.flatten(carried)
    assert leaves and all(isinstance(x, tf.Tensor) or x is None for x in leaves)
    # tensors only the constructor needs stay behind (they would stay alive until the meta-step)
    assert not {"hidden", "output", "biases"} & set(carried["net"])

    @tf.function
    def restored(carried, v):
        h = hessian_cls.restore(carried, activation=policy.activation, lvc=lvc)
        return h.loss, h.gradient, h(v)

    loss, gradient, product = restored(carried, v)
    assert_close(loss.numpy(), fresh.loss.numpy(), ulps=64)  # a loss that nearly cancels
    for got, expected in zip([*gradient, *product], [*fresh.gradient, *fresh(v)], strict=True):
        assert_close(got.numpy(), expected.numpy(), ulps=64)


def _two_task_point(policy, episodes, seed, scale):
    """Per-task parameters for two tasks (the policy's and a perturbed copy), advantages on the
    episodes' mask, and a direction ``v``: ``(params, adv, v)``, drawn in that order from
    ``seed``."""
    rng = np.random.default_rng(seed)
    params = [
        tf.constant(np.stack([p, p + rng.normal(0, scale, p.shape)]), tf.float32)
        for p in policy.get_parameters()
    ]
    adv = tf.constant(rng.normal(size=episodes.mask.shape) * np.asarray(episodes.mask), tf.float32)
    v = [tf.constant(rng.normal(size=p.shape), tf.float32) for p in params]
    return params, adv, v


@pytest.fixture
def two_task_point():
    """``two_task_point(policy, episodes, seed, scale) -> (params, adv, v)``."""
    return _two_task_point


def _check_fisher_objective(fisher_cls, policy, episodes, params, adv, v):
    """The TRPO meta-step takes π_old, the surrogate's gradient and the Fisher products from
    ``fisher_cls``'s cached pass: ``distribution`` must equal ``policy.forward``,
    ``surrogate_gradient`` the autodiff gradient of the surrogate ``−mean_i E[π/π_old · Â]`` at
    π = π_old, and the product of ``v`` the autodiff one. Returns the Fisher."""
    from metarl_tf.outer.trpo import fisher_vector_product

    fisher = fisher_cls(params, episodes, policy.activation)
    expected_product = fisher_vector_product(policy, params, episodes, v)
    for g, e in zip(fisher(v), expected_product, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=32)
    forward = policy.forward(params, episodes.observations)
    for got, expected in zip(
        tf.nest.flatten(fisher.distribution(episodes.observations)),
        tf.nest.flatten(forward),
        strict=True,
    ):
        assert got.shape == expected.shape
        assert_close(got.numpy(), expected.numpy(), ulps=16)
    old_log_prob = policy.log_prob(forward, episodes.actions)
    with tf.GradientTape() as tape:
        tape.watch(params)
        log_prob = policy.log_prob(policy.forward(params, episodes.observations), episodes.actions)
        m = episodes.mask
        per_task = tf.reduce_sum(tf.exp(log_prob - old_log_prob) * adv * m, [1, 2])
        surrogate = -tf.reduce_mean(per_task / tf.reduce_sum(m, [1, 2]))
    expected = tape.gradient(surrogate, params)
    got = fisher.surrogate_gradient(episodes, adv)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert_close(g.numpy(), e.numpy(), ulps=64)
    return fisher


@pytest.fixture
def check_fisher_objective():
    """``check_fisher_objective(fisher_cls, policy, episodes, params, adv, v) -> fisher``."""
    return _check_fisher_objective


@pytest.fixture
def check_carried_hessian():
    """``check_carried_hessian(hessian_cls, policy, episodes, params, adv, v, lvc)``."""
    return _check_carried_hessian


@pytest.fixture
def make_policy():
    """Factory: ``make_policy(hidden=(4,), obs_dim=2, act_dim=2, seed=0, ...)``."""
    return _make_policy


@pytest.fixture
def synthetic_batch():
    """Factory: ``synthetic_batch(tasks=2, episodes=2, horizon=4, ..., dtype=np.float32)``."""
    return _synthetic_batch


@pytest.fixture
def prefix_mask():
    return _prefix_mask


@pytest.fixture
def to_tensors():
    return _to_tensors


@pytest.fixture
def policy():
    return _make_policy()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The ``tiny`` preset trained for 4 iterations, with a checkpoint after iteration 2.

    Yields a dict: the trainer, the trace counts after 2 and 4 iterations, the checkpoint
    directory and a bundle exported at it, the parameters at the checkpoint, and the metrics of
    iterations 3 and 4.
    """
    from metarl_tf.config import get_preset
    from metarl_tf.training.trainer import MetaTrainer

    def trace_counts(trainer):
        """Trace count of every ``tf.function`` held by the trainer, its sampler and its adapter
        (e.g. ``trainer._meta_step``, ``sampler._act``, ``adapter._compiled``)."""
        owners = {"trainer": trainer, "sampler": trainer.sampler, "adapter": trainer.adapter}
        return {
            f"{owner}.{name}": value.experimental_get_tracing_count()
            for owner, obj in owners.items()
            for name, value in vars(obj).items()
            if hasattr(value, "experimental_get_tracing_count")
        }

    trainer = MetaTrainer(get_preset("tiny").replace(iterations=4))
    for _ in range(2):
        trainer.train_iteration()
    counts_2 = trace_counts(trainer)
    tmp = tmp_path_factory.mktemp("tiny_run")
    ckpt = trainer.save_checkpoint(tmp / "checkpoint")
    bundle_2 = trainer.export_bundle(tmp / "bundle_2")
    params_2 = _values_of(trainer.policy.parameters)
    later = [trainer.train_iteration() for _ in range(2)]
    return {
        "trainer": trainer,
        "counts_2": counts_2,
        "counts_4": trace_counts(trainer),
        "checkpoint": ckpt,
        "bundle_2": bundle_2,
        "params_2": params_2,
        "params_4": _values_of(trainer.policy.parameters),
        "metrics_3_4": later,
    }


@pytest.fixture(scope="module")
def http(service):
    """An HTTP client of the module's ``service`` fixture (a running service process)."""
    import httpx

    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client
