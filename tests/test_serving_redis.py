"""The shared store of adapted policies (``METARL_STORE_URL=redis://...``): its record format, the
store against a private redis-server, and the service over real HTTP with two workers — every id
works on every worker (and the contrast without Redis), ids survive a restart, and Redis going
away mid-run gives 503s with ``Retry-After``, then recovery without a restart."""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from numerics import assert_exact
from redis_helper import RedisServer, require_redis_server

from serving.launch import ServiceProcess, free_port
from serving.store import (
    PolicyNotFound,
    RedisPolicyStore,
    StoreUnavailable,
    decode_policy,
    encode_policy,
)

HORIZON = 10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from metarl_tf.bundle import save_bundle
    from metarl_tf.envs import Navigation2D
    from metarl_tf.policy import GaussianMLPPolicy

    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(16,), init_log_std=-1.0)
    path = tmp_path_factory.mktemp("bundles") / "tiny-redis"
    adaptation = dict(steps=1, gamma=0.99, gae_lambda=1.0, baseline="linear")
    return save_bundle(path, policy, 0.1, Navigation2D(horizon=HORIZON), adaptation=adaptation)


def episodes(seed: int, n: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "observations": rng.uniform(-0.5, 0.5, (HORIZON, 2)).tolist(),
            "actions": rng.normal(0, 0.1, (HORIZON, 2)).tolist(),
            "rewards": rng.uniform(-1, 0, HORIZON).tolist(),
        }
        for _ in range(n)
    ]


# -- the record format ---------------------------------------------------------------------------


def test_policy_record_round_trips_exactly_without_pickle():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s).astype(np.float32) for s in [(2, 3), (3,), (3, 1), (1,), ()]]
    header = {"parent": "meta", "steps": 2, "extra": {"depth": 2, "num_episodes": 5}}
    blob = encode_policy(params, header)
    assert b"pickle" not in blob and blob.startswith(b"MRLP1")
    got, got_header = decode_policy(blob)
    assert got_header == header
    for g, p in zip(got, params, strict=True):
        assert g.dtype == np.float32 and g.shape == p.shape and g.flags.writeable
        assert_exact(g, p)
    with pytest.raises(ValueError, match="truncated"):
        decode_policy(blob[:-1])
    with pytest.raises(ValueError, match="trailing"):
        decode_policy(blob + b"\0")
    with pytest.raises(ValueError, match="MRLP1"):
        decode_policy(b"\x80\x04pickle")


# -- the store against redis-server ---------------------------------------------------------------


def test_redis_store_keeps_weights_provenance_and_expiry(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        store = RedisPolicyStore(server.url, "a" * 64, ttl_s=30)
        params = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
        added = store.add(params, "meta", 2, depth=2, num_episodes=4, inner_losses=[0.5, 0.25])
        got = store.get(added.policy_id)
        assert (got.parent, got.steps) == ("meta", 2)
        assert got.extra == {"depth": 2, "num_episodes": 4, "inner_losses": [0.5, 0.25]}
        for g, p in zip(got.parameters, params, strict=True):
            assert_exact(g, p)
        key = f"metarl:{'a' * 64}:policy:{added.policy_id}"
        assert store._redis.exists(key) == 1
        assert 0 < store._redis.pttl(key) <= 30_000  # Redis expires it; every get renews it
        # Another bundle (another checksum) never sees this bundle's policies.
        other = RedisPolicyStore(server.url, "b" * 64, ttl_s=30)
        with pytest.raises(PolicyNotFound, match="not in the shared store"):
            other.get(added.policy_id)
        assert len(store) == 1 and len(other) == 0
        assert store.stats()["reachable"] is True
    with pytest.raises(StoreUnavailable, match="Redis at redis://127.0.0.1"):
        store.get(added.policy_id)
    assert store.stats()["reachable"] is False


def test_redis_store_unreachable_is_store_unavailable():
    require_redis_server()
    store = RedisPolicyStore(f"redis://127.0.0.1:{free_port()}/0", "c" * 64, ttl_s=5)
    with pytest.raises(StoreUnavailable, match="could not store the policy"):
        store.add([np.zeros(2, np.float32)], "meta", 1)


def test_store_url_password_is_never_shown(monkeypatch):
    from serving.settings import ServiceSettings, SettingsError

    monkeypatch.setenv("METARL_STORE_URL", "redis://user:s3cret@cache:6380/2")
    settings = ServiceSettings.from_env()
    assert settings.to_json()["store_url"] == "redis://user:***@cache:6380/2"
    assert "s3cret" not in repr(settings.to_json())
    monkeypatch.setenv("METARL_STORE_URL", "http://cache:6379")
    with pytest.raises(SettingsError, match="expected redis://host:port/db"):
        ServiceSettings.from_env()


# -- over HTTP, two workers -----------------------------------------------------------------------


def _fresh_connections(url: str) -> httpx.Client:
    """Every request on a new connection, so consecutive requests reach any of the workers."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=url, timeout=60, limits=limits, headers={"Connection": "close"})


def _exercise(url: str, ids_wanted: int, uses: int, parent_uses: int = 1, seed: int = 0) -> dict:
    """Adapts ``ids_wanted`` policies, then uses each ``uses`` times in ``/act`` and
    ``parent_uses`` times as a ``parent``, 16 requests at a time on fresh connections. Returns
    status counts and pids."""
    counts: dict[str, dict[int, int]] = {"adapt": {}, "act": {}, "parent": {}}
    pids: set[int] = set()

    def count(kind, status):
        counts[kind][status] = counts[kind].get(status, 0) + 1

    with _fresh_connections(url) as http, cf.ThreadPoolExecutor(16) as pool:

        def adapt(i, parent="meta"):
            body = {"episodes": episodes(seed + i), "steps": 1, "parent": parent}
            return http.post("/adapt", json=body)

        ids = []
        for r in pool.map(adapt, range(ids_wanted)):
            count("adapt", r.status_code)
            assert r.status_code == 200, r.text
            ids.append(r.json()["policy_id"])

        def act(policy_id):
            r = http.post("/act", json={"observations": [[0.1, -0.2]], "policy_id": policy_id})
            return r.status_code

        for status in pool.map(act, [p for p in ids for _ in range(uses)]):
            count("act", status)
        parents = [p for p in ids for _ in range(parent_uses)]
        for r in pool.map(adapt, range(len(parents)), parents):
            count("parent", r.status_code)
        for r in pool.map(lambda _: http.post("/metadata", json={}), range(64)):
            pids.add(r.json()["worker_pid"])
    return {"counts": counts, "ids": ids, "pids": pids}


@pytest.mark.slow
def test_two_workers_share_ids_through_redis_and_survive_restart(bundle, tmp_path):
    """200 ids adapted over fresh connections to 2 workers, each used 5 times by /act and 3 times
    as parent: zero 404s with Redis; then a new service on the same Redis serves the same ids."""
    env = {"METARL_WORKERS": "2", "METARL_MAX_EPISODES": "2", "METARL_MAX_PENDING": "64"}
    with RedisServer(tmp_path / "redis") as redis_server:
        env["METARL_STORE_URL"] = redis_server.url
        with ServiceProcess(bundle=bundle, env=env, log_path=tmp_path / "a.log") as service:
            run = _exercise(service.url, ids_wanted=200, uses=5, parent_uses=3)
        assert len(run["pids"]) == 2, "both workers must have answered (fresh connections)"
        assert run["counts"] == {"adapt": {200: 200}, "act": {200: 1000}, "parent": {200: 600}}
        with (
            ServiceProcess(bundle=bundle, env=env, log_path=tmp_path / "b.log") as service,
            _fresh_connections(service.url) as http,
        ):
            for policy_id in run["ids"][:20]:
                r = http.post("/act", json={"observations": [[0, 0]], "policy_id": policy_id})
                assert r.status_code == 200, r.text


@pytest.mark.slow
def test_two_workers_without_redis_lose_ids_across_workers(bundle, tmp_path):
    """The contrast: the in-process store of one worker does not know the other's ids."""
    env = {"METARL_WORKERS": "2", "METARL_MAX_EPISODES": "2", "METARL_MAX_PENDING": "64"}
    env["METARL_STORE_URL"] = ""
    with ServiceProcess(bundle=bundle, env=env, log_path=tmp_path / "c.log") as service:
        run = _exercise(service.url, ids_wanted=60, uses=4)
    assert len(run["pids"]) == 2, ("both workers must have answered", run["counts"])
    assert run["counts"]["act"].get(404, 0) > 0, run["counts"]
    assert set(run["counts"]["act"]) <= {200, 404}, run["counts"]


@pytest.mark.slow
def test_redis_going_away_gives_503_then_recovers(bundle, tmp_path):
    port = free_port()
    redis_server = RedisServer(tmp_path / "redis", port=port).start()
    env = {"METARL_STORE_URL": redis_server.url}
    try:
        with (
            ServiceProcess(bundle=bundle, env=env, log_path=tmp_path / "d.log") as service,
            httpx.Client(base_url=service.url, timeout=60) as http,
        ):
            r = http.post("/adapt", json={"episodes": episodes(1)})
            assert r.status_code == 200, r.text
            policy_id = r.json()["policy_id"]
            redis_server.kill()
            for path, body in [
                ("/act", {"observations": [[0, 0]], "policy_id": policy_id}),
                ("/adapt", {"episodes": episodes(2)}),
                ("/adapt", {"episodes": episodes(2), "parent": policy_id}),
            ]:
                r = http.post(path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert r.headers["retry-after"] == "1"
                assert "Redis at redis://127.0.0.1" in r.json()["error"], r.text
            meta = http.post("/metadata", json={}).json()
            assert meta["store"]["reachable"] is False
            # "meta" needs no store: still served.
            assert http.post("/act", json={"observations": [[0, 0]]}).status_code == 200
            redis_server = RedisServer(tmp_path / "redis", port=port).start()  # empty again
            r = http.post("/adapt", json={"episodes": episodes(3)})
            assert r.status_code == 200, r.text
            body = {"observations": [[0, 0]], "policy_id": r.json()["policy_id"]}
            assert http.post("/act", json=body).status_code == 200
            assert http.post("/metadata", json={}).json()["store"]["reachable"] is True
            assert "Traceback" not in service.log_tail(400)
    finally:
        redis_server.stop()


def test_redis_tests_run_in_ci():
    """CI installs redis-server (.ci/run), so the tests above never skip there."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "redis-server" in ci and "apt-get" in ci
    if os.environ.get("CI"):
        require_redis_server()
