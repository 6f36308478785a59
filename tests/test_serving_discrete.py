"""The service refuses a discrete-action bundle at start-up, with a reason that names the policy
and says what to do (it serves continuous-action bundles only)."""

import pytest

from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.envs import BernoulliBandit
from metarl_tf.policy import make_policy
from serving.launch import ServiceProcess
from serving.settings import ServiceSettings, SettingsError, unsupported_bundle_reason


@pytest.fixture(scope="module")
def bandit_bundle(tmp_path_factory):
    dist = BernoulliBandit(k=3, horizon=4)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,))
    path = tmp_path_factory.mktemp("bundles") / "bandit-tiny"
    adaptation = {"steps": 1, "gamma": 0.0, "gae_lambda": 1.0, "baseline": "linear"}
    return save_bundle(path, policy, 0.1, dist, adaptation=adaptation)


def test_discrete_bundle_is_reported_unsupported(bandit_bundle, tiny_nav_meta):
    reason = unsupported_bundle_reason(load_bundle(bandit_bundle).meta)
    assert "CategoricalMLPPolicy" in reason and "continuous-action" in reason
    assert "make_adapter" in reason
    assert unsupported_bundle_reason(tiny_nav_meta) is None


def test_engine_refuses_a_discrete_bundle(bandit_bundle):
    from serving.engine import AdaptationEngine

    settings = ServiceSettings(bundle=bandit_bundle)
    with pytest.raises(SettingsError, match="serves continuous-action .* bundles only"):
        AdaptationEngine(load_bundle(bandit_bundle), settings)


@pytest.fixture
def tiny_nav_meta(tmp_path, make_policy):
    from metarl_tf.envs import Navigation2D

    path = save_bundle(
        tmp_path / "nav", make_policy(), 0.1, Navigation2D(horizon=5),
        adaptation={"steps": 1, "gamma": 0.99, "gae_lambda": 1.0, "baseline": "linear"},
    )  # fmt: skip
    return load_bundle(path).meta


@pytest.mark.slow
def test_service_start_fails_with_the_reason(bandit_bundle, tmp_path):
    proc = ServiceProcess(bundle=bandit_bundle, ready_timeout=60, log_path=tmp_path / "log")
    with pytest.raises(RuntimeError, match="CategoricalMLPPolicy"):
        proc.start()


def test_adapting_a_stored_policy_continues_its_chain(tmp_path, make_policy):
    """With per-step step sizes and a log σ shift, one step from the meta-initialization and
    then one from the returned id equal the in-process 2-step chain (same episodes): the engine
    passes the parent's depth on (``first_step``). Such a bundle takes one step per batch from
    'meta' (default 1; more is a 422 that says what to do)."""
    import numpy as np

    from metarl_tf.envs import Navigation2D
    from serving.engine import AdaptationEngine
    from serving.validation import RequestError

    policy = make_policy(hidden=(8,))
    rng = np.random.default_rng(0)
    sizes = [rng.uniform(0.01, 0.2, s).astype(np.float32) for s in policy.parameter_shapes * 2]
    path = save_bundle(
        tmp_path / "nav", policy, sizes, Navigation2D(horizon=5),
        adaptation={"steps": 2, "gamma": 0.99, "gae_lambda": 1.0, "baseline": "linear",
                    "log_std_shift": [-0.5, -0.3]},
    )  # fmt: skip
    bundle = load_bundle(path)
    engine = AdaptationEngine(bundle, ServiceSettings(bundle=path))
    assert engine.default_steps == 1
    episodes = [
        (
            rng.normal(size=(5, 2)).astype(np.float32),
            rng.normal(size=(5, 2)).astype(np.float32),
            rng.normal(size=5).astype(np.float32),
        )
        for _ in range(3)
    ]
    first = engine.adapt(episodes, 1)
    second = engine.adapt(episodes, 1, parent=first.policy_id)
    assert engine.store.get(second.policy_id).extra["depth"] == 2
    from metarl_tf.episodes import pad_episodes

    batch = pad_episodes(episodes, length=engine.max_episode_length, num_episodes=4)
    expected = bundle.make_adapter()(bundle.policy.parameters, batch, 2)[0]
    for got, e in zip(second.parameters, expected, strict=True):
        np.testing.assert_allclose(got, e.numpy()[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RequestError, match="steps 1, collect episodes with the returned") as err:
        engine.adapt(episodes, 2)
    assert err.value.status == 422 and err.value.field == "steps"
    engine.adapt(episodes, 2, parent=first.policy_id)  # after the first step, any number
