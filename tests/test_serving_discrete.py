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
