"""The service's front door over real HTTP: bearer-token auth, body limits that count the bytes
actually received (chunked or not), stalled bodies, the bound on queued adaptations, strict
types, and the OpenAPI document; plus the guard middleware alone (deterministic queueing)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.client import AdaptationClient, ServiceError
from serving.guard import RequestGuard
from serving.launch import ServiceProcess
from serving.probe import chunks, send_body

HORIZON = 10
TOKEN = "test-token-0123456789abcdef"
LIMITS = {
    "METARL_MAX_BODY_BYTES": "100000",
    "METARL_READ_TIMEOUT_S": "1",
    "METARL_MAX_PENDING": "1",
    "METARL_MAX_EPISODES": "8",
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from metarl_tf.bundle import save_bundle
    from metarl_tf.envs import Navigation2D
    from metarl_tf.policy import GaussianMLPPolicy

    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(64, 64), init_log_std=-1.0)
    path = tmp_path_factory.mktemp("bundles") / "tiny-guard"
    adaptation = dict(steps=1, gamma=0.99, gae_lambda=1.0, baseline="linear")
    return save_bundle(path, policy, 0.1, Navigation2D(horizon=HORIZON), adaptation=adaptation)


@pytest.fixture(scope="module")
def service(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "guard.log"
    env = {**LIMITS, "METARL_API_TOKEN": TOKEN}
    with ServiceProcess(bundle=bundle, env=env, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, timeout=30, headers=AUTH) as client:
        yield client


def episodes(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "observations": rng.uniform(-0.5, 0.5, (HORIZON, 2)).tolist(),
            "actions": rng.normal(0, 0.1, (HORIZON, 2)).tolist(),
            "rewards": rng.uniform(-1, 0, HORIZON).tolist(),
        }
        for _ in range(n)
    ]


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/act", "/adapt", "/metadata", "/export"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", "Basic abc", TOKEN])
def test_api_routes_need_the_bearer_token(service, path, auth):
    headers = {} if auth is None else {"Authorization": auth}
    r = httpx.post(f"{service.url}{path}", json={}, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["field"] == "Authorization" and "bearer token" in body["error"]
    assert "wrong-token" not in r.text  # what was sent is never echoed


def test_token_opens_the_routes_and_health_stays_open(service, http):
    assert httpx.get(f"{service.url}/livez").status_code == 200
    assert httpx.get(f"{service.url}/readyz").status_code == 200
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    assert http.get("/metrics").status_code == 200
    r = http.post("/act", json={"observations": [[0.1, 0.2]], "deterministic": True})
    assert r.status_code == 200, r.text
    with AdaptationClient(service.url, token=TOKEN) as client:
        adapted = client.adapt(episodes(2))
        assert client.act(adapted, [[0.0, 0.0]]).shape == (1, 2)
    with AdaptationClient(service.url) as client, pytest.raises(ServiceError) as err:
        client.metadata()
    assert err.value.status_code == 401 and err.value.field == "Authorization"
    meta = http.post("/metadata", json={}).json()
    assert meta["settings"]["api_token"] is True and TOKEN not in json.dumps(meta)
    assert TOKEN not in service.log_path.read_text(errors="replace")


def test_openapi_declares_the_bearer_scheme_and_nullable_policy_id(service):
    spec = httpx.get(f"{service.url}/docs.json").json()  # open: clients generate code from it
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "METARL_API_TOKEN of the service",
    }
    for path in ("/act", "/adapt", "/metadata", "/export"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"]
    ok = spec["paths"]["/act"]["post"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["properties"]["policy_id"] == {
        "type": "string",
        "nullable": True,
        "title": "Policy Id",
        "description": "The policy used: 'meta' or an id; null when inline weights were given.",
    }
    for status in ("400", "404", "408", "413", "503"):
        error = spec["paths"]["/act"]["post"]["responses"][status]["content"]["application/json"]
        assert error["schema"] == {"$ref": "#/components/schemas/ServiceError"}


# -- limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_body_over_the_limit_is_413_when_chunked_or_announced(service, chunked):
    size = 20_000_000  # 200x the limit, and more than the loopback's socket buffers hold
    answer = send_body(
        service.url, "/act", chunks(size), chunked=chunked,
        content_length=None if chunked else size, headers=AUTH,
    )  # fmt: skip
    assert answer.status == 413, answer
    body = answer.json()
    assert body["field"] == "body" and "100000" in body["expected"]
    assert answer.sent < size  # the server stopped reading: the rest was never sent


def test_chunked_body_within_the_limit_is_served(service):
    body = json.dumps({"observations": [[0.1, 0.2]] * 8, "deterministic": True}).encode()
    answer = send_body(service.url, "/act", [body[:10], body[10:]], chunked=True, headers=AUTH)
    assert answer.status == 200, answer
    assert len(answer.json()["actions"]) == 8


@pytest.mark.parametrize("chunked", [True, False])
def test_stalled_body_is_408(service, chunked):
    part = b'{"observations": [[0.1, '
    answer = send_body(
        service.url, "/act", [part], chunked=chunked, content_length=len(part) + 20,
        headers=AUTH, stall_s=30,
    )  # fmt: skip
    assert answer.status == 408, answer
    assert "METARL_READ_TIMEOUT_S" in answer.json()["error"]


def test_queued_adaptations_beyond_the_bound_get_503_with_retry_after(http):
    """METARL_MAX_PENDING=1: of concurrent /adapt calls, those arriving while one runs are
    refused at once with Retry-After (never queued without bound); the others are served."""
    body = {"episodes": episodes(8, seed=1), "steps": 1}
    statuses: list[int] = []
    for _ in range(10):  # concurrency is up to the scheduler: repeat until a call overlapped
        with cf.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: http.post("/adapt", json=body), range(12)))
        statuses += [r.status_code for r in answers]
        refused = [r for r in answers if r.status_code == 503]
        if refused:
            break
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert refused, f"no /adapt overlapped in 10 rounds: {statuses}"
    assert refused[0].headers["retry-after"] == "1"
    assert "METARL_MAX_PENDING=1" in refused[0].json()["error"]


# -- strict types and empty ids -------------------------------------------------------------------

OBS = [[0.1, 0.2]]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/act", {"observations": [["0.1", "0.2"]]}, "observations[0][0]"),
        ("/act", {"observations": [[True, False]]}, "observations[0][0]"),
        ("/act", {"observations": OBS, "deterministic": "yes"}, "deterministic"),
        ("/act", {"observations": OBS, "deterministic": 1}, "deterministic"),
        ("/act", {"observations": OBS, "seed": "3"}, "seed"),
        ("/act", {"observations": OBS, "seed": True}, "seed"),
        ("/act", {"observations": OBS, "policy_id": ""}, "policy_id"),
        ("/act", {"observations": OBS, "policy_id": 5}, "policy_id"),
        ("/adapt", {"episodes": episodes(1), "parent": ""}, "parent"),
        ("/adapt", {"episodes": episodes(1), "steps": "1"}, "steps"),
        ("/adapt", {"episodes": episodes(1), "steps": 1.0}, "steps"),
        ("/adapt", {"episodes": episodes(1), "return_weights": "true"}, "return_weights"),
        ("/adapt", {"episodes": [{**episodes(1)[0], "rewards": ["1"] * HORIZON}]}, None),
        ("/export", {"policy_id": ""}, "policy_id"),
    ],
)
def test_no_coercion_and_no_empty_ids(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    got = r.json()
    if field is not None:
        assert got["field"] == field, got
    else:
        assert got["field"].startswith("episodes[0].rewards"), got


def test_noop_exists_only_with_the_benchmark_setting(http):
    assert http.post("/noop", json={}).status_code == 404


# -- the middleware alone -------------------------------------------------------------------------


def test_guard_bounds_pending_adaptations_deterministically():
    """Two /adapt calls held inside the app and a third refused at once; after they finish,
    the next is served again."""

    release = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = RequestGuard(
        app, ("/adapt",), max_body_bytes=1000, read_timeout_s=5, max_pending=2, token=None
    )

    async def call():
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/adapt", "headers": []}
        await guard(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario():
        first = asyncio.create_task(call())
        second = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        assert guard.pending == 2
        status, headers = await call()
        assert status == 503 and headers[b"retry-after"] == b"1"
        release.set()
        assert [(await t)[0] for t in (first, second)] == [200, 200]
        assert guard.pending == 0
        assert (await call())[0] == 200

    asyncio.run(scenario())


# -- the deployment checks (bench/load.py, bench/limits.py, make fuzz) against this service --------

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_load_check_counts_requests_errors_and_latency(service, tmp_path):
    out = tmp_path / "load.json"
    proc = _run(
        "bench/load.py", "--url", service.url, "--token", TOKEN, "--clients", "4",
        "--seconds", "3", "--episodes", "2", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["errors"] == 0 and result["unknown_id"] == 0
    assert result["routes"]["/act"]["n"] > 0 and "p99_ms" in result["routes"]["/act"]
    assert result["server_rss_mb"]["before"] > 0  # the server's process tree, found by its port


def test_load_check_fails_without_the_token(service):
    proc = _run("bench/load.py", "--url", service.url, "--seconds", "1", "--token", "")
    assert proc.returncode == 2 and "401" in proc.stderr


def test_limits_check_sees_413_and_408(service, tmp_path):
    out = tmp_path / "limits.json"
    proc = _run(
        "bench/limits.py", "--url", service.url, "--token", TOKEN, "--size-mb", "2",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["chunked_body"]["status"] == 413
    assert result["chunked_body"]["rss_growth_mb"] < 100
    assert result["stalled_body_chunked"]["status"] == 408
    assert result["stalled_body_content_length"]["status"] == 408


@pytest.mark.slow
def test_fuzz_check_passes_on_this_service(service, tmp_path):
    out = tmp_path / "fuzz.json"
    proc = _run(
        "scripts/fuzz.py", "--url", service.url, "--token", TOKEN, "--max-time", "20",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["generated"] > 0 and result["generated"] == result.get("passed"), result


def test_demo_sends_the_token_from_the_environment(service):
    env = {**os.environ, "METARL_API_TOKEN": TOKEN, "METARL_API_TOKEN_FILE": ""}
    cmd = [sys.executable, "examples/demo.py", "--url", service.url, "--tasks", "1"]
    cmd += ["--episodes", "2", "--plot", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mean return after" in proc.stdout


def test_token_settings(monkeypatch, tmp_path):
    from serving.client import token_from_env
    from serving.settings import ServiceSettings, SettingsError

    for name in ("METARL_API_TOKEN", "METARL_API_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert ServiceSettings.from_env().api_token is None and token_from_env() is None
    monkeypatch.setenv("METARL_API_TOKEN", "")  # empty: no authentication
    assert ServiceSettings.from_env().api_token is None and token_from_env() is None
    monkeypatch.setenv("METARL_API_TOKEN", "short")
    with pytest.raises(SettingsError, match="at least 16 printable characters"):
        ServiceSettings.from_env()
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    monkeypatch.setenv("METARL_API_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(SettingsError, match="set only one of them"):
        ServiceSettings.from_env()
    monkeypatch.delenv("METARL_API_TOKEN")
    assert ServiceSettings.from_env().api_token == TOKEN == token_from_env()
    assert TOKEN not in repr(ServiceSettings.from_env())
    monkeypatch.setenv("METARL_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="cannot be read"):
        ServiceSettings.from_env()
