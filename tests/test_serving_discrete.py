"""Discrete-action (categorical) bundles over real HTTP: ``/act`` returns integer actions drawn by
the policy's own sampler, ``/adapt`` accepts integer actions and adapts exactly as in-process;
the shipped ``bandit-k5-maml`` and ``cartpole-maml`` are served end to end. Plus the chain of
stored adaptations of a bundle with per-step step sizes."""

from pathlib import Path

import numpy as np
import pytest
from numerics import assert_close, assert_exact

from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.envs import BernoulliBandit
from metarl_tf.policy import make_policy
from serving.client import AdaptationClient
from serving.launch import ServiceProcess
from serving.settings import ServiceSettings, unsupported_bundle_reason

REPO_ROOT = Path(__file__).resolve().parents[1]
K, HORIZON = 3, 4


@pytest.fixture(scope="module")
def bandit_bundle(tmp_path_factory):
    dist = BernoulliBandit(k=K, horizon=HORIZON)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,))
    rng = np.random.default_rng(3)  # logits that differ between arms
    policy.set_parameters(
        [rng.normal(0, 1.0, p.shape).astype(np.float32) for p in policy.parameters]
    )
    path = tmp_path_factory.mktemp("bundles") / "bandit-tiny"
    adaptation = {"steps": 1, "gamma": 0.0, "gae_lambda": 1.0, "baseline": "linear"}
    return save_bundle(path, policy, 0.5, dist, adaptation=adaptation)


@pytest.fixture(scope="module")
def local(bandit_bundle):
    return load_bundle(bandit_bundle)


@pytest.fixture(scope="module")
def service(bandit_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "bandit.log"
    with ServiceProcess(bundle=bandit_bundle, env={"METARL_MAX_EPISODES": "4"}, log_path=log) as s:
        yield s


def bandit_episodes(n: int, seed: int) -> list[dict]:
    """Integer actions, rewards in {0, 1}; the bandit's observation is a constant [1]."""
    rng = np.random.default_rng(seed)
    return [
        {
            "observations": [[0.0]] * HORIZON,
            "actions": rng.integers(0, K, HORIZON).tolist(),
            "rewards": rng.integers(0, 2, HORIZON).astype(float).tolist(),
        }
        for _ in range(n)
    ]


def as_tuples(episodes: list[dict]) -> list[tuple]:
    """The in-process form: a categorical action is its index as a float, ``[T, 1]``."""
    return [
        (
            np.asarray(e["observations"], np.float32),
            np.asarray(e["actions"], np.float32)[:, None],
            np.asarray(e["rewards"], np.float32),
        )
        for e in episodes
    ]


def test_which_bundles_the_service_serves(local):
    assert unsupported_bundle_reason(local.meta) is None
    gaussian = {"policy": {"class": "GaussianMLPPolicy"}, "action_spec": {"shape": [2]}}
    assert unsupported_bundle_reason(gaussian) is None
    matrix = {"policy": {"class": "GaussianMLPPolicy"}, "action_spec": {"shape": [2, 2]}}
    assert "vector action spec" in unsupported_bundle_reason(matrix)
    vector = {"policy": {"class": "CategoricalMLPPolicy"}, "action_spec": {"shape": [2]}}
    assert "scalar integer" in unsupported_bundle_reason(vector)


def test_metadata_says_discrete(http):
    meta = http.post("/metadata", json={}).json()
    assert meta["actions"] == {"kind": "discrete", "num_actions": K}


def test_act_is_the_policy_sampler_in_integers(http, local):
    obs = np.zeros((64, 1), np.float32)
    mean = http.post("/act", json={"observations": obs.tolist(), "deterministic": True}).json()
    logits = local.policy(obs).numpy()
    assert mean["actions"] == np.argmax(logits, axis=-1).tolist() == mean["raw_actions"]
    body = {"observations": obs.tolist(), "seed": 11}
    a, b = http.post("/act", json=body).json(), http.post("/act", json=body).json()
    assert a == b and all(isinstance(x, int) and 0 <= x < K for x in a["actions"])
    # the trainer's sampler with the same numbers: policy.sample_noise, then policy.numpy_act
    params = local.policy.get_parameters()
    noise = local.policy.sample_noise(np.random.default_rng(11), (64,))
    expected = local.policy.numpy_act(params, obs, noise)[:, 0].astype(int)
    assert a["actions"] == expected.tolist()
    assert len(set(a["actions"])) > 1  # samples, not the mode


def test_adapt_takes_integer_actions_and_equals_in_process(http, local):
    episodes = bandit_episodes(3, seed=1)
    r = http.post("/adapt", json={"episodes": episodes, "return_weights": True})
    assert r.status_code == 200, r.text
    got = r.json()
    expected = local.adapt(as_tuples(episodes), steps=1)
    for name, value in got["weights"].items():
        i = local.policy.parameter_names.index(name)
        # the same compiled inner step; padding to the bucket reorders a few float32 sums
        assert_close(np.asarray(value, np.float32), expected.parameters[i], ulps=256)
    act = http.post("/act", json={"observations": [[0.0]], "policy_id": got["policy_id"]})
    assert act.status_code == 200 and act.json()["actions"][0] in range(K)
    further = {"episodes": bandit_episodes(2, seed=2), "parent": got["policy_id"]}
    assert http.post("/adapt", json=further).status_code == 200
    query = {"episodes": episodes, "query_observations": [[0.0]]}
    assert http.post("/adapt", json=query).json()["query_actions"][0] in range(K)


@pytest.mark.parametrize(
    "actions, field",
    [
        ([0, 1, 2, K], "episodes[0].actions[3]"),  # not an action of the bundle
        ([0, 1, -1, 0], "episodes[0].actions[2]"),
        ([0, 1, 2], "episodes[0].actions"),  # one action short
        ([[0.0], [1.0], [2.0], [0.0]], "episodes[0].actions"),  # the continuous form
        ([0, 1, 1.5, 0], "episodes[0].actions[2]"),  # not an integer (pydantic, strict)
        ([0, 1, True, 0], "episodes[0].actions[2]"),
    ],
)
def test_bad_discrete_actions_are_400_naming_the_field(http, actions, field):
    episode = {**bandit_episodes(1, seed=0)[0], "actions": actions}
    r = http.post("/adapt", json={"episodes": [episode]})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()


def test_client_round_trip_with_packed_integer_actions(service, local):
    episodes = as_tuples(bandit_episodes(2, seed=5))
    flat = [(o, a[:, 0], r) for o, a, r in episodes]  # [T] indices, sent packed as float32
    with AdaptationClient(service.url) as client:
        adapted = client.adapt(flat, return_weights=True)
        actions = client.act(adapted, np.zeros((5, 1)), seed=1)
    assert actions.dtype == np.int64 and actions.shape == (5,)
    expected = local.adapt(episodes, steps=1)
    for name, value in adapted.weights.items():
        i = local.policy.parameter_names.index(name)
        assert_close(value, expected.parameters[i], ulps=256)


# -- the shipped discrete bundles -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bandit-k5-maml", "cartpole-maml"])
def test_shipped_discrete_bundle_served_end_to_end(name, tmp_path):
    """Episodes of a new task collected through /act in the task's environment, /adapt on them
    (equal to the in-process adaptation), and the adapted policy's actions by id."""
    path = REPO_ROOT / "saved_models" / name
    if not (path / "meta.json").is_file():
        pytest.skip(f"{path} not found")
    bundle = load_bundle(path)
    dist = bundle.task_distribution
    env_vars = {"METARL_MAX_EPISODES": "8"}
    with (
        ServiceProcess(bundle=path, env=env_vars, log_path=tmp_path / "log") as service,
        AdaptationClient(service.url) as client,
    ):
        task = dist.sample_tasks(1, seed=123)[0]
        n = 8
        env = dist.make_batched_env([task], n)
        obs = env.reset()
        buffers = [([], [], []) for _ in range(n)]
        active = np.ones(n, bool)
        for t in range(dist.horizon):
            actions = client.act("meta", obs, seed=t)
            assert actions.dtype == np.int64 and actions.shape == (n,)
            step = env.step(actions.astype(np.int32))
            for i in np.flatnonzero(active):
                buffers[i][0].append(obs[i])
                buffers[i][1].append(actions[i])
                buffers[i][2].append(step.reward[i])
            active &= ~np.asarray(step.done, bool)
            obs = step.observation
            if not active.any():
                break
        episodes = [(np.array(o), np.array(a), np.array(r)) for o, a, r in buffers]
        adapted = client.adapt(episodes, return_weights=True)
        local = bundle.adapt(
            [(o, a.astype(np.float32)[:, None], r) for o, a, r in episodes], steps=adapted.steps
        )
        for name_, value in adapted.weights.items():
            i = bundle.policy.parameter_names.index(name_)
            assert_close(value, local.parameters[i], ulps=512)
        after = client.act(adapted, obs, deterministic=True)
        assert after.dtype == np.int64 and set(after.tolist()) <= set(
            range(dist.action_spec.maximum + 1)
        )


# -- a chain of stored adaptations ---------------------------------------------------------------


def test_adapting_a_stored_policy_continues_its_chain(tmp_path, make_policy):
    """With per-step step sizes and a log σ shift, one step from the meta-initialization and
    then one from the returned id equal the in-process 2-step chain (same episodes): the engine
    passes the parent's depth on (``first_step``). Such a bundle takes one step per batch from
    'meta' (default 1; more is a 422 that says what to do)."""
    from metarl_tf.envs import Navigation2D
    from metarl_tf.episodes import pad_episodes
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
    batch = pad_episodes(episodes, length=engine.max_episode_length, num_episodes=4)
    expected = bundle.make_adapter()(bundle.policy.parameters, batch, 2)[0]
    for got, e in zip(second.parameters, expected, strict=True):
        # two compiled steps in one call against two calls of one step: the same operations
        assert_close(got, e.numpy()[0], ulps=256)
    with pytest.raises(RequestError, match="steps 1, collect episodes with the returned") as err:
        engine.adapt(episodes, 2)
    assert err.value.status == 422 and err.value.field == "steps"
    engine.adapt(episodes, 2, parent=first.policy_id)  # after the first step, any number
    assert_exact(np.asarray(engine.store.get(first.policy_id).extra["depth"]), np.asarray(1))
