"""The adaptation service over real HTTP (loopback), plus its store, client and weights helpers.

One service process on a tiny Meta-SGD bundle (built here in a temporary directory, horizon 20)
serves most tests; the improvement test starts a second one on the shipped bundle
``saved_models/nav2d-maml`` when it exists (skipped otherwise).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_close, assert_exact

from metarl_tf.client_weights import WeightsError, parameters_from_weights, policy_from_weights
from serving.client import AdaptationClient, ServiceError, ServiceUnavailable, pack_array
from serving.launch import ServiceProcess, free_port
from serving.settings import ServiceSettings, SettingsError
from serving.store import PolicyNotFound, PolicyStore

REPO_ROOT = Path(__file__).resolve().parents[1]
# The improvement test needs a trained bundle: the shipped one, or METARL_TEST_TRAINED_BUNDLE.
SHIPPED_BUNDLE = Path(
    os.environ.get("METARL_TEST_TRAINED_BUNDLE") or REPO_ROOT / "saved_models" / "nav2d-maml"
)
HORIZON = 20
LIMITS = {
    "METARL_MAX_EPISODES": "8",
    "METARL_MAX_STEPS": "3",
    "METARL_MAX_OBSERVATIONS": "64",
    "METARL_STORE_SIZE": "6",
    "METARL_STORE_TTL_S": "600",
    "METARL_MAX_BODY_BYTES": "200000",
    "METARL_WARMUP_STEPS": "1,2",
}
STATUSES: list[tuple[str, int]] = []  # every (path, status) this module saw; none may be 5xx


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small Nav2D bundle with learned (Meta-SGD) step sizes: every per-parameter step size
    differs, so a service that ignored them would not match the in-process ``adapt``."""
    from metarl_tf.bundle import save_bundle
    from metarl_tf.envs import Navigation2D
    from metarl_tf.policy import GaussianMLPPolicy

    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(32, 32), init_log_std=-1.0)
    rng = np.random.default_rng(0)
    step_sizes = [
        rng.uniform(0.05, 0.2, size=s).astype(np.float32) for s in policy.parameter_shapes
    ]
    path = tmp_path_factory.mktemp("bundles") / "tiny-metasgd"
    save_bundle(
        path,
        policy,
        step_sizes,
        Navigation2D(horizon=HORIZON),
        adaptation=dict(steps=1, gamma=0.99, gae_lambda=1.0, baseline="linear"),
    )
    return path


@pytest.fixture(scope="module")
def service(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "service.log"
    with ServiceProcess(bundle=tiny_bundle, env=LIMITS, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(service):
    with AdaptationClient(service.url) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_bundle):
    """The same bundle loaded in this process (the reference computations)."""
    from metarl_tf.bundle import load_bundle

    return load_bundle(tiny_bundle)


def post(http, path, body=None, raw: bytes | None = None):
    """POSTs JSON (or raw bytes) and records the status."""
    if raw is not None:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body if body is not None else {})
    STATUSES.append((path, r.status_code))
    return r


def nav_episodes(n: int, seed: int, goal=(0.3, -0.2), lengths=None):
    """``n`` real Nav2D episodes (random Gaussian actions) with varying lengths, as lists."""
    from metarl_tf.envs import Navigation2D

    rng = np.random.default_rng(seed)
    env = Navigation2D(horizon=HORIZON).make_batched_env([{"goal": list(goal)}], n)
    obs = env.reset()
    o, a, r = [], [], []
    for _ in range(HORIZON):
        act = rng.normal(0.0, 0.3, size=(n, 2)).astype(np.float32)
        step = env.step(act)
        o.append(obs)
        a.append(act)
        r.append(step.reward)
        obs = step.observation
    o, a, r = np.stack(o, 1), np.stack(a, 1), np.stack(r, 1)  # [n, T, ...]
    lengths = lengths or [int(x) for x in rng.integers(5, HORIZON + 1, size=n)]
    return [
        {
            "observations": o[i, : lengths[i]].tolist(),
            "actions": a[i, : lengths[i]].tolist(),
            "rewards": r[i, : lengths[i]].tolist(),
        }
        for i in range(n)
    ]


def local_adapt(bundle, params, episodes, steps):
    """In-process reference: the bundle's own compiled Adapter on UNPADDED episodes."""
    from metarl_tf.episodes import pad_episodes

    triples = [
        (np.array(e["observations"]), np.array(e["actions"]), np.array(e["rewards"]))
        for e in episodes
    ]
    adapted, losses, _ = bundle.make_adapter()(params, pad_episodes(triples), steps)
    return [p.numpy()[0] for p in adapted], losses.numpy()[:, 0]


def weights_list(bundle, weights: dict) -> list[np.ndarray]:
    return [np.asarray(weights[n], np.float32) for n in bundle.policy.parameter_names]


# -- start-up, health, metadata ------------------------------------------------------------------


def test_readyz_turns_ready_only_after_warmup(service, http):
    probes = service.startup_probes
    first_ready = next(i for i, (_, _, ready) in enumerate(probes) if ready == 200)
    # While compiling, the process was alive but not ready.
    assert any(live == 200 and ready == 503 for _, live, ready in probes[:first_ready]), probes
    meta = post(http, "/metadata").json()
    assert meta["ready"] and meta["warmup"]["done"] and meta["warmup"]["error"] is None
    buckets = meta["episode_buckets"]
    assert buckets == [1, 2, 4, 6, 8]
    assert sorted(map(tuple, meta["warmup"]["compiled"])) == [
        (b, s) for b in buckets for s in (1, 2)
    ]
    # Requests of every bucket and warmed step count trigger no further compilation.
    traces = meta["warmup"]["tracing_count"]
    for n, steps in [(1, 1), (2, 2), (3, 1), (5, 2), (7, 1), (8, 2)]:
        r = post(http, "/adapt", {"episodes": nav_episodes(n, seed=n), "steps": steps})
        assert r.status_code == 200, r.text
    assert post(http, "/metadata").json()["warmup"]["tracing_count"] == traces


def test_health_metrics_and_openapi(http):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request_total" in metrics.text
    spec = http.get("/docs.json").json()
    assert {"/adapt", "/act", "/metadata"} <= set(spec["paths"])
    text = json.dumps(spec)
    assert "raw_actions" in text and "query_observations" in text


def test_metadata_reports_bundle_specs_and_limits(http, local, tiny_bundle):
    meta = post(http, "/metadata").json()
    assert meta["name"] == tiny_bundle.name and meta["version"]
    assert meta["task_distribution"]["name"] == "nav2d"
    assert meta["observation_spec"]["shape"] == [2]
    assert_close(meta["action_spec"]["maximum"], [0.1, 0.1], ulps=8, dtype=np.float32)
    assert meta["policy"]["parameter_names"] == local.policy.parameter_names
    assert meta["adaptation"]["learned_step_sizes"] is True
    assert meta["adaptation"]["default_steps"] == 1
    assert meta["adaptation"]["gamma"] == 0.99 and meta["adaptation"]["baseline"] == "linear"
    assert meta["limits"] == {
        "max_episodes": 8,
        "max_episode_length": HORIZON,
        "max_steps": 3,
        "max_observations": 64,
        "max_body_bytes": 200000,
    }
    assert meta["store"]["max_size"] == 6 and meta["store"]["ttl_s"] == 600


# -- /act ----------------------------------------------------------------------------------------


def test_act_meta_equals_keras_forward_and_is_clipped(http, local):
    obs = np.random.default_rng(1).uniform(-0.5, 0.5, size=(7, 2)).astype(np.float32)
    r = post(
        http, "/act", {"policy_id": "meta", "observations": obs.tolist(), "deterministic": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    mean, _ = local.policy(obs)
    assert_close(body["raw_actions"], mean.numpy(), ulps=32, dtype=np.float32)
    assert_close(body["actions"], np.clip(mean.numpy(), -0.1, 0.1), ulps=32, dtype=np.float32)


def test_act_samples_are_seeded_gaussian_and_within_bounds(http, local):
    obs = np.zeros((5, 2), np.float32)
    body = {"observations": obs.tolist(), "seed": 123}
    a, b = post(http, "/act", body).json(), post(http, "/act", body).json()
    c = post(http, "/act", {**body, "seed": 124}).json()
    assert a == b and a["raw_actions"] != c["raw_actions"]
    mean, log_std = (x.numpy() for x in local.policy(obs))
    noise = local.policy.sample_noise(np.random.default_rng(123), (5,))  # the trainer's sampler
    assert_close(a["raw_actions"], mean + np.exp(log_std) * noise, ulps=8)
    actions = np.array(a["actions"])
    assert np.all(actions >= -0.1 - 1e-7) and np.all(actions <= 0.1 + 1e-7)
    assert_close(actions, np.clip(a["raw_actions"], -0.1, 0.1), ulps=1, dtype=np.float32)


def test_act_with_inline_weights_equals_numpy_and_keras(http, local):
    from metarl_tf.policy import gaussian_mlp_forward

    rng = np.random.default_rng(2)
    params = [rng.normal(0, 0.5, size=s).astype(np.float32) for s in local.policy.parameter_shapes]
    weights = dict(zip(local.policy.parameter_names, [p.tolist() for p in params], strict=True))
    obs = rng.uniform(-1, 1, size=(9, 2)).astype(np.float32)
    r = post(
        http, "/act", {"weights": weights, "observations": obs.tolist(), "deterministic": True}
    )
    assert r.status_code == 200, r.text
    assert r.json()["policy_id"] is None
    mean, _ = gaussian_mlp_forward(params, obs)
    assert_close(r.json()["raw_actions"], mean.numpy(), ulps=32, dtype=np.float32)


# -- /adapt --------------------------------------------------------------------------------------


def test_adapt_over_http_equals_in_process_adapt(http, local):
    episodes = nav_episodes(6, seed=10)
    r = post(http, "/adapt", {"episodes": episodes, "return_weights": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == 1 and body["parent"] == "meta" and body["num_episodes"] == 6
    assert body["num_transitions"] == sum(len(e["rewards"]) for e in episodes)
    expected, losses = local_adapt(local, local.policy.parameters, episodes, 1)
    got = weights_list(local, body["weights"])
    assert_close(got, expected, ulps=8, dtype=np.float32)
    assert_close(body["inner_losses"], losses, ulps=16, dtype=np.float32)
    # The step actually moved the weights (so the comparison above is not vacuous).
    assert (
        max(
            float(np.max(np.abs(g - p)))
            for g, p in zip(got, local.policy.get_parameters(), strict=True)
        )
        > 1e-4
    )


def test_adapt_from_parent_with_several_steps_equals_in_process(http, local):
    first, second = nav_episodes(4, seed=20), nav_episodes(7, seed=21)
    p1 = post(http, "/adapt", {"episodes": first, "return_weights": True}).json()
    r = post(
        http,
        "/adapt",
        {"episodes": second, "parent": p1["policy_id"], "steps": 3, "return_weights": True},
    )
    assert r.status_code == 200, r.text
    p2 = r.json()
    assert p2["parent"] == p1["policy_id"] and p2["steps"] == 3 and len(p2["inner_losses"]) == 3
    w1, _ = local_adapt(local, local.policy.parameters, first, 1)
    w2, losses = local_adapt(local, w1, second, 3)
    got = weights_list(local, p2["weights"])
    assert_close(got, w2, ulps=8, dtype=np.float32)
    assert_close(p2["inner_losses"], losses, ulps=64, dtype=np.float32)


def test_adapt_then_act_by_id_by_weights_and_query(http):
    episodes = nav_episodes(5, seed=30)
    query = [[0.0, 0.0], [0.2, -0.1]]
    body = post(
        http,
        "/adapt",
        {"episodes": episodes, "query_observations": query, "return_weights": True},
    ).json()
    by_id = post(
        http, "/act", {"policy_id": body["policy_id"], "observations": query, "deterministic": True}
    ).json()
    by_weights = post(
        http, "/act", {"weights": body["weights"], "observations": query, "deterministic": True}
    ).json()
    assert_close(by_id["actions"], body["query_actions"], ulps=1, dtype=np.float32)
    assert_close(by_weights["actions"], by_id["actions"], ulps=8, dtype=np.float32)
    meta = post(http, "/act", {"observations": query, "deterministic": True}).json()
    assert meta["policy_id"] == "meta" and meta["actions"] != by_id["actions"]


def test_adapt_accepts_edge_sized_input(http):
    one_step = [{"observations": [[0.0, 0.0]], "actions": [[0.05, 0.0]], "rewards": [-0.3]}]
    r = post(http, "/adapt", {"episodes": one_step})
    assert r.status_code == 200, r.text
    zeros = nav_episodes(3, seed=31)
    for e in zeros:
        e["rewards"] = [0.0] * len(e["rewards"])
    r = post(http, "/adapt", {"episodes": zeros})
    assert r.status_code == 200, r.text
    r = post(
        http, "/adapt", {"episodes": nav_episodes(8, seed=32, lengths=[HORIZON] * 8), "steps": 3}
    )
    assert r.status_code == 200, r.text
    # A step count that was not warmed up compiles once and works.
    assert len(r.json()["inner_losses"]) == 3


def test_store_evicts_least_recently_used_with_a_reason(http):
    episodes = nav_episodes(2, seed=40)
    ids = [post(http, "/adapt", {"episodes": episodes}).json()["policy_id"] for _ in range(7)]
    r = post(http, "/act", {"policy_id": ids[0], "observations": [[0, 0]]})
    assert r.status_code == 404
    assert r.json()["field"] == "policy_id" and "evicted" in r.json()["error"]
    assert post(http, "/act", {"policy_id": ids[-1], "observations": [[0, 0]]}).status_code == 200
    r = post(http, "/adapt", {"episodes": episodes, "parent": ids[0]})
    assert r.status_code == 404 and r.json()["field"] == "parent"


# -- validation: every bad input is a 4xx naming the field ---------------------------------------


def _episode(t=5, obs_dim=2, act_dim=2):
    return {
        "observations": [[0.1 * i] + [0.0] * (obs_dim - 1) for i in range(t)],
        "actions": [[0.05] * act_dim for _ in range(t)],
        "rewards": [-0.5] * t,
    }


def _with(path, value):
    """A valid /adapt body with ``episodes[0]``'s ``path`` replaced."""
    ep = _episode()
    ep[path[0]] = value
    return {"episodes": [_episode(), ep] if len(path) > 1 else [ep]}


def _ragged(key, row, width):
    ep = _episode()
    ep[key] = [list(r) for r in ep[key]]
    ep[key][row] = [0.0] * width
    return {"episodes": [ep]}


def _weights(local_names_shapes, **changes):
    names, shapes = local_names_shapes
    w = {n: np.zeros(s).tolist() for n, s in zip(names, shapes, strict=True)}
    for k, v in changes.items():
        k = k.replace("__", "/")
        if v is None:
            w.pop(k)
        else:
            w[k] = v
    return w


NAMES_SHAPES = (
    [
        "hidden_0/kernel",
        "hidden_0/bias",
        "hidden_1/kernel",
        "hidden_1/bias",
        "mean/kernel",
        "mean/bias",
        "log_std",
    ],
    [(2, 32), (32,), (32, 32), (32,), (32, 2), (2,), (2,)],
)
NAN_OBS = b'{"episodes": [{"observations": [[0, 0], [0, NaN]], "actions": [[0, 0], [0, 0]], "rewards": [0, 0]}]}'
INF_REW = b'{"episodes": [{"observations": [[0, 0], [0, 0]], "actions": [[0, 0], [0, 0]], "rewards": [0, Infinity]}]}'
HUGE_ACT = b'{"episodes": [{"observations": [[0, 0], [0, 0]], "actions": [[0, 0], [1e999, 0]], "rewards": [0, 0]}]}'

BAD_REQUESTS = [
    # (id, path, body (dict) or raw bytes, status, field)
    ("adapt-missing-episodes", "/adapt", {}, 400, "episodes"),
    ("adapt-empty-episodes", "/adapt", {"episodes": []}, 400, "episodes"),
    ("adapt-too-many-episodes", "/adapt", {"episodes": [_episode()] * 9}, 413, "episodes"),
    (
        "adapt-episode-too-long",
        "/adapt",
        {"episodes": [_episode(t=HORIZON + 1)]},
        413,
        "episodes[0].observations",
    ),
    (
        "adapt-empty-episode",
        "/adapt",
        {"episodes": [{"observations": [], "actions": [], "rewards": []}]},
        400,
        "episodes[0].observations",
    ),
    (
        "adapt-obs-wrong-dim",
        "/adapt",
        {"episodes": [_episode(), _episode(obs_dim=3)]},
        400,
        "episodes[1].observations[0]",
    ),
    (
        "adapt-obs-ragged",
        "/adapt",
        _ragged("observations", 3, 1),
        400,
        "episodes[0].observations[3]",
    ),
    (
        "adapt-act-wrong-dim",
        "/adapt",
        {"episodes": [_episode(act_dim=1)]},
        400,
        "episodes[0].actions[0]",
    ),
    ("adapt-act-ragged", "/adapt", _ragged("actions", 2, 3), 400, "episodes[0].actions[2]"),
    (
        "adapt-act-length",
        "/adapt",
        _with(["actions"], _episode(t=4)["actions"]),
        400,
        "episodes[0].actions",
    ),
    ("adapt-rew-length", "/adapt", _with(["rewards"], [0.0] * 6), 400, "episodes[0].rewards"),
    ("adapt-rew-nested", "/adapt", _with(["rewards"], [[0.0]] * 5), 400, "episodes[0].rewards[0]"),
    ("adapt-rew-string", "/adapt", _with(["rewards"], ["a"] * 5), 400, "episodes[0].rewards[0]"),
    (
        "adapt-missing-rewards",
        "/adapt",
        {"episodes": [{"observations": [[0, 0]], "actions": [[0, 0]]}]},
        400,
        "episodes[0].rewards",
    ),
    (
        "adapt-unknown-episode-field",
        "/adapt",
        {"episodes": [{**_episode(), "dones": [0] * 5}]},
        400,
        "episodes[0].dones",
    ),
    ("adapt-nan", "/adapt", NAN_OBS, 400, "episodes[0].observations[1][1]"),
    ("adapt-inf", "/adapt", INF_REW, 400, "episodes[0].rewards[1]"),
    ("adapt-overflow", "/adapt", HUGE_ACT, 400, "episodes[0].actions[1][0]"),
    ("adapt-steps-zero", "/adapt", {"episodes": [_episode()], "steps": 0}, 400, "steps"),
    ("adapt-steps-too-many", "/adapt", {"episodes": [_episode()], "steps": 4}, 400, "steps"),
    ("adapt-steps-float", "/adapt", {"episodes": [_episode()], "steps": 1.5}, 400, "steps"),
    ("adapt-steps-string", "/adapt", {"episodes": [_episode()], "steps": "two"}, 400, "steps"),
    (
        "adapt-unknown-parent",
        "/adapt",
        {"episodes": [_episode()], "parent": "pol-nope"},
        404,
        "parent",
    ),
    (
        "adapt-query-wrong-dim",
        "/adapt",
        {"episodes": [_episode()], "query_observations": [[1, 2, 3]]},
        400,
        "query_observations[0]",
    ),
    (
        "adapt-query-too-many",
        "/adapt",
        {"episodes": [_episode()], "query_observations": [[0, 0]] * 65},
        413,
        "query_observations",
    ),
    (
        "adapt-return-weights-junk",
        "/adapt",
        {"episodes": [_episode()], "return_weights": "maybe"},
        400,
        "return_weights",
    ),
    ("adapt-unknown-field", "/adapt", {"episodes": [_episode()], "step": 1}, 400, "step"),
    ("adapt-malformed-json", "/adapt", b'{"episodes": [', 400, "body"),
    ("adapt-body-not-object", "/adapt", b"[1, 2]", 400, "body"),
    ("adapt-body-too-large", "/adapt", b'{"episodes": []}' + b" " * 200_001, 413, "body"),
    ("act-missing-observations", "/act", {"policy_id": "meta"}, 400, "observations"),
    ("act-empty-observations", "/act", {"observations": []}, 400, "observations"),
    ("act-obs-wrong-dim", "/act", {"observations": [[0.0, 0.0], [1.0]]}, 400, "observations[1]"),
    ("act-obs-scalar-rows", "/act", {"observations": [1.0, 2.0]}, 400, "observations[0]"),
    ("act-too-many-observations", "/act", {"observations": [[0, 0]] * 65}, 413, "observations"),
    ("act-nan", "/act", b'{"observations": [[NaN, 0]]}', 400, "observations[0][0]"),
    (
        "act-unknown-policy",
        "/act",
        {"policy_id": "pol-0123", "observations": [[0, 0]]},
        404,
        "policy_id",
    ),
    (
        "act-id-and-weights",
        "/act",
        {"policy_id": "meta", "weights": _weights(NAMES_SHAPES), "observations": [[0, 0]]},
        400,
        "weights",
    ),
    (
        "act-weights-missing",
        "/act",
        {"weights": _weights(NAMES_SHAPES, log_std=None), "observations": [[0, 0]]},
        400,
        "weights.log_std",
    ),
    (
        "act-weights-shape",
        "/act",
        {
            "weights": _weights(NAMES_SHAPES, hidden_0__kernel=[[0.0] * 32] * 3),
            "observations": [[0, 0]],
        },
        400,
        "weights.hidden_0/kernel",
    ),
    (
        "act-weights-unknown",
        "/act",
        {"weights": _weights(NAMES_SHAPES, bogus=[1.0]), "observations": [[0, 0]]},
        400,
        "weights.bogus",
    ),
    (
        "act-weights-ragged",
        "/act",
        {
            "weights": _weights(NAMES_SHAPES, mean__kernel=[[0.0, 0.0]] * 31 + [[0.0]]),
            "observations": [[0, 0]],
        },
        400,
        "weights.mean/kernel",
    ),
    (
        "act-weights-string",
        "/act",
        {"weights": _weights(NAMES_SHAPES, mean__bias=["a", "b"]), "observations": [[0, 0]]},
        400,
        "weights.mean/bias",
    ),
    (
        "act-weights-not-object",
        "/act",
        {"weights": [1, 2], "observations": [[0, 0]]},
        400,
        "weights",
    ),
    ("act-seed-negative", "/act", {"observations": [[0, 0]], "seed": -1}, 400, "seed"),
    ("act-seed-huge", "/act", {"observations": [[0, 0]], "seed": 2**70}, 400, "seed"),
    (
        "act-deterministic-junk",
        "/act",
        {"observations": [[0, 0]], "deterministic": "perhaps"},
        400,
        "deterministic",
    ),
]


@pytest.mark.parametrize(
    "path,body,status,field", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_4xx_naming_the_field(http, path, body, status, field):
    r = post(http, path, raw=body) if isinstance(body, bytes) else post(http, path, body)
    assert r.status_code == status, r.text
    data = r.json()
    assert data["field"] == field, data
    assert data["error"] and data["expected"], data


def _packed_episode(t=5, **changes):
    """``_episode`` with every array packed (base64 float32), then ``changes`` applied."""
    ep = {k: pack_array(v) for k, v in _episode(t).items()}
    for key, value in changes.items():
        name, _, part = key.partition("__")
        ep[name] = {**ep[name], part: value} if part else value
    return {"episodes": [ep]}


PACKED_BAD = [
    ("bad-base64", dict(observations__data="not base64!"), 400, "episodes[0].observations.data"),
    (
        "byte-count",
        dict(actions__data=pack_array(np.zeros((4, 2)))["data"]),
        400,
        "episodes[0].actions.data",
    ),
    (
        "width",
        dict(observations=pack_array(np.zeros((5, 3)))),
        400,
        "episodes[0].observations.shape",
    ),
    ("rank", dict(rewards=pack_array(np.zeros((5, 1)))), 400, "episodes[0].rewards.shape"),
    ("dtype", dict(observations__dtype="int8"), 400, "episodes[0].observations.dtype"),
    ("extra-key", dict(observations__order="F"), 400, "episodes[0].observations"),
    ("nan", dict(actions=pack_array(np.full((5, 2), np.nan))), 400, "episodes[0].actions[0][0]"),
    ("rows", dict(actions=pack_array(np.zeros((4, 2)))), 400, "episodes[0].actions"),
    ("reward-count", dict(rewards=pack_array(np.zeros(6))), 400, "episodes[0].rewards"),
    (
        "too-long",
        dict(
            observations=pack_array(np.zeros((HORIZON + 1, 2))),
            actions=pack_array(np.zeros((HORIZON + 1, 2))),
            rewards=pack_array(np.zeros(HORIZON + 1)),
        ),
        413,
        "episodes[0].observations",
    ),
    (
        "empty",
        dict(
            observations=pack_array(np.zeros((0, 2))),
            actions=pack_array(np.zeros((0, 2))),
            rewards=pack_array(np.zeros(0)),
        ),
        400,
        "episodes[0].observations",
    ),
]


@pytest.mark.parametrize(
    "changes,status,field", [c[1:] for c in PACKED_BAD], ids=[c[0] for c in PACKED_BAD]
)
def test_bad_packed_array_is_4xx_naming_the_field(http, changes, status, field):
    r = post(http, "/adapt", _packed_episode(**changes))
    assert r.status_code == status, r.text
    data = r.json()
    assert data["field"].startswith(field), data
    assert data["error"] and data["expected"], data


def test_packed_episodes_adapt_exactly_like_json_lists(http, local):
    episodes = nav_episodes(5, seed=11)
    packed = [{k: pack_array(np.asarray(v, np.float32)) for k, v in e.items()} for e in episodes]
    # float64 bytes are accepted too, and rounded to float32 like JSON numbers.
    packed[0]["rewards"] = {
        "data": base64.b64encode(np.asarray(episodes[0]["rewards"], "<f8").tobytes()).decode(),
        "shape": [len(episodes[0]["rewards"])],
        "dtype": "float64",
    }
    got = {}
    for name, eps in (("lists", episodes), ("packed", packed)):
        r = post(http, "/adapt", {"episodes": eps, "return_weights": True})
        assert r.status_code == 200, r.text
        got[name] = r.json()
    assert got["lists"]["weights"] == got["packed"]["weights"]
    assert got["lists"]["inner_losses"] == got["packed"]["inner_losses"]
    expected, _ = local_adapt(local, local.policy.parameters, episodes, 1)
    w = weights_list(local, got["packed"]["weights"])
    assert_close(w, expected, ulps=8, dtype=np.float32)


def test_weights_nan_is_refused(http):
    # NaN cannot be written by json.dumps(allow_nan=False); send it raw.
    w = _weights(NAMES_SHAPES)
    raw = json.dumps({"weights": w, "observations": [[0, 0]]}).replace(
        '"log_std": [0.0, 0.0]', '"log_std": [0.0, NaN]'
    )
    r = post(http, "/act", raw=raw.encode())
    assert r.status_code == 400 and r.json()["field"] == "weights.log_std", r.text


def test_any_content_type_is_read_as_json(http):
    r = http.post(
        "/act",
        content=b'{"observations": [[0, 0]]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    STATUSES.append(("/act", r.status_code))
    assert r.status_code == 200, r.text


def test_fuzzed_requests_never_get_a_5xx(http):
    rng = np.random.default_rng(7)
    junk = [None, True, -1, 0, 1e308, "x", [], {}, [[]], [[None]], [1, [2]], {"a": 1}, "NaN"]
    valid = {
        "/adapt": {
            "episodes": nav_episodes(2, seed=50),
            "steps": 1,
            "query_observations": [[0, 0]],
        },
        "/act": {"observations": [[0.1, 0.2]], "deterministic": False, "seed": 3},
    }
    for i in range(120):
        path = ["/adapt", "/act"][i % 2]
        body = json.loads(json.dumps(valid[path]))
        # Replace a random node of the body tree with junk.
        parent, key = body, None
        while True:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            if not keys:
                break
            key = keys[int(rng.integers(len(keys)))]
            child = parent[key]
            if not isinstance(child, (dict, list)) or not child or rng.random() < 0.3:
                break
            parent, key = child, None
        if key is not None:
            parent[key] = junk[int(rng.integers(len(junk)))]
        raw = json.dumps(body)
        if rng.random() < 0.15:
            raw = raw[: int(rng.integers(len(raw)))]
        r = post(http, path, raw=raw.encode())
        assert r.status_code < 500, (raw[:300], r.text)


# -- store ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_store_lru_and_ttl_with_reasons():
    clock = FakeClock()
    store = PolicyStore(max_size=2, ttl_s=10, clock=clock)
    a, b = store.add([1], "meta", 1), store.add([2], "meta", 1)
    clock.now = 5
    assert store.get(a.policy_id).parameters == [1]  # a is now the most recently used
    c = store.add([3], "meta", 1)  # evicts b
    with pytest.raises(PolicyNotFound, match="evicted"):
        store.get(b.policy_id)
    clock.now = 14.9
    assert store.get(c.policy_id).parameters == [3]
    clock.now = 15.0  # a unused for 10 s
    with pytest.raises(PolicyNotFound, match="expired"):
        store.get(a.policy_id)
    with pytest.raises(PolicyNotFound, match="unknown"):
        store.get("pol-never")
    assert store.stats()["size"] == 1 and store.evictions == 1 and store.expirations == 1


def test_settings_from_env_names_a_bad_variable(monkeypatch):
    monkeypatch.setenv("METARL_MAX_EPISODES", "many")
    with pytest.raises(SettingsError, match="METARL_MAX_EPISODES"):
        ServiceSettings.from_env()
    monkeypatch.setenv("METARL_MAX_EPISODES", "16")
    monkeypatch.setenv("METARL_STORE_TTL_S", "0")
    with pytest.raises(SettingsError, match="METARL_STORE_TTL_S"):
        ServiceSettings.from_env()
    monkeypatch.setenv("METARL_STORE_TTL_S", "30")
    monkeypatch.setenv("METARL_WARMUP_STEPS", "1,3")
    s = ServiceSettings.from_env()
    assert s.max_episodes == 16 and s.store_ttl_s == 30 and s.warmup_steps == (1, 3)


def test_missing_bundle_fails_fast_with_the_reason(tmp_path):
    proc = ServiceProcess(bundle=tmp_path / "nope", ready_timeout=60, log_path=tmp_path / "log")
    with pytest.raises(RuntimeError, match="not a bundle directory"):
        proc.start()


# -- client and weights helpers ------------------------------------------------------------------


def test_client_round_trip_and_errors(client, local):
    meta = client.metadata()
    obs = np.zeros((3, 2), np.float32)
    assert client.act("meta", obs).shape == (3, 2)
    assert client.act("meta", obs[0], deterministic=True).shape == (2,)
    episodes = [
        (np.array(e["observations"]), np.array(e["actions"]), np.array(e["rewards"]))
        for e in nav_episodes(3, seed=60)
    ]
    result = client.adapt(episodes, return_weights=True, query_observations=obs)
    assert set(result.weights) == set(meta["policy"]["parameter_names"])
    assert_close(client.act(result, obs, deterministic=True), result.query_actions, ulps=1)
    assert_close(client.act(result.weights, obs, deterministic=True), result.query_actions, ulps=8)
    with pytest.raises(ServiceError) as err:
        client.act("pol-unknown", obs)
    assert err.value.status_code == 404 and err.value.field == "policy_id"
    assert "unknown policy id" in str(err.value)
    with pytest.raises(ServiceError) as err:
        client.adapt(episodes, steps=99)
    assert (
        err.value.status_code == 400
        and err.value.field == "steps"
        and "1 to 3" in err.value.expected
    )


def test_client_packed_and_json_encodings_give_the_same_adaptation(client, service):
    episodes = [
        (np.array(e["observations"]), np.array(e["actions"]), np.array(e["rewards"]))
        for e in nav_episodes(4, seed=61)
    ]
    assert client.packed  # the default
    with AdaptationClient(service.url, packed=False) as plain:
        a = plain.adapt(episodes, return_weights=True)
    b = client.adapt(episodes, return_weights=True)
    assert a.inner_losses == b.inner_losses
    for name in a.weights:
        assert_exact(a.weights[name], b.weights[name])


def test_client_raises_service_unavailable_without_a_server():
    with AdaptationClient(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        assert not c.readyz()
        with pytest.raises(ServiceUnavailable):
            c.metadata()


def test_client_imports_no_tensorflow(service):
    code = f"""
import sys
sys.modules["tensorflow"] = None  # any TensorFlow import now fails
import numpy as np
from serving.client import AdaptationClient
with AdaptationClient({service.url!r}) as c:
    obs = np.zeros((2, 2))
    episode = (obs, np.zeros((2, 2)), np.zeros(2))
    r = c.adapt([episode])
    print(c.act(r.policy_id, obs).shape)
assert "keras" not in sys.modules
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 2)"


def test_policy_from_weights_reproduces_the_service(client, local):
    meta = client.metadata()
    result = client.adapt(nav_episodes(4, seed=70), return_weights=True)
    policy = policy_from_weights(result.weights, meta["policy"]["config"])
    obs = np.random.default_rng(3).uniform(-0.5, 0.5, size=(6, 2)).astype(np.float32)
    mean, _ = policy(obs)
    served = client.act_full(result.policy_id, obs, deterministic=True).raw_actions
    assert_close(mean.numpy(), served, ulps=16, dtype=np.float32)


def test_parameters_from_weights_names_the_problem():
    names, shapes = ["a", "b"], [(2,), (1, 2)]
    with pytest.raises(WeightsError) as err:
        parameters_from_weights({"a": [1, 2], "b": [[1, 2, 3]]}, names, shapes)
    assert err.value.name == "b" and "[1, 2]" in err.value.expected
    with pytest.raises(WeightsError, match="missing"):
        parameters_from_weights({"a": [1, 2]}, names, shapes)
    arrays = parameters_from_weights({"a": [1, 2], "b": [[3, 4]]}, names, shapes)
    assert [a.dtype for a in arrays] == [np.float32, np.float32]


# -- demo ----------------------------------------------------------------------------------------


def test_demo_runs_against_a_running_service(service, tmp_path):
    env = {**os.environ, "DEMO_JSON": str(tmp_path / "demo.json")}
    cmd = [
        sys.executable,
        "examples/demo.py",
        "--url",
        service.url,
        "--tasks",
        "2",
        "--episodes",
        "3",
        "--plot",
        str(tmp_path / "demo.png"),
    ]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"mean return after 0\.\.2 steps: (\S+\s+){2}\S+", out.stdout), out.stdout
    result = json.loads((tmp_path / "demo.json").read_text())
    assert len(result["mean_return"]) == 3
    assert (tmp_path / "demo.png").stat().st_size > 10_000


# -- the shipped bundle: adaptation improves the task's return -----------------------------------


@pytest.fixture(scope="module")
def shipped_service(tmp_path_factory):
    if not (SHIPPED_BUNDLE / "meta.json").is_file():
        pytest.skip(
            f"{SHIPPED_BUNDLE} not found (train it: python -m metarl_tf train --preset nav2d)"
        )
    log = tmp_path_factory.mktemp("logs") / "shipped.log"
    env = {"METARL_MAX_EPISODES": "20"}  # fewer padded sizes to compile: a faster start
    with ServiceProcess(bundle=SHIPPED_BUNDLE, env=env, log_path=log) as proc:
        yield proc


@pytest.mark.slow
def test_adaptation_improves_return_on_new_tasks(shipped_service):
    """Paired over 8 unseen tasks: the 1-step return beats the 0-step one by a margin (mean
    gain > 5 and its 95% lower confidence bound > 0), not on one lucky seed."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    from demo import collect

    from metarl_tf.envs import make_task_distribution

    with AdaptationClient(shipped_service.url) as c:
        meta = c.metadata()
        td = meta["task_distribution"]
        dist = make_task_distribution(td["name"], **td["config"])
        tasks = dist.sample_tasks(8, seed=20_000)
        rng = np.random.default_rng(0)
        gains = []
        for task in tasks:
            episodes, before = collect(c, dist, task, "meta", 20, 2, rng)
            adapted = c.adapt(episodes)
            _, after = collect(c, dist, task, adapted.policy_id, 20, 2, rng)
            gains.append(after.mean() - before.mean())
    gains = np.array(gains)
    lower = gains.mean() - 1.96 * gains.std(ddof=1) / np.sqrt(len(gains))
    assert gains.mean() > 5 and lower > 0, gains


# -- last: nothing in this module got a 5xx -------------------------------------------------------


def test_no_request_got_a_5xx(http):
    assert STATUSES and all(s < 500 for _, s in STATUSES), [x for x in STATUSES if x[1] >= 500]
    # The server's own count, which also covers the client's requests.
    metrics = http.get("/metrics").text
    errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("bentoml_service_request_total")
        and re.search(r'endpoint="/(adapt|act|metadata)"', line)
        and 'http_response_code="5' in line
        and not line.endswith(" 0.0")
    ]
    assert not errors, errors
